# shellcheck shell=bash
# launch.sh -- what the job scripts in slurm/ share; each one sources it, places its ranks
# (place_node or place_nodes) and hands its arguments to run_dsi, which adds the output
# place, builds the srun line (MPI plugin, CPUs, binding check), prints it and runs
#
#   srun ... python -m mpi4py -m dsi_mpi run --output DSI_OUTPUT_DIR/JOB.jsonl ARGS...
#
# The run's settings are `dsi-mpi run` flags, passed through as they are: dsi-mpi's argparse
# holds the only defaults (`python -m dsi_mpi run --help`). Flags the launcher adds come
# first, so yours win (argparse takes the last). The job's settings are environment
# variables, which sbatch hands to the job:
#
#   DSI_PYTHON [python]       the interpreter with dsi_mpi installed (a venv's bin/python)
#   DSI_MPI_PLUGIN [pmix]     srun --mpi=...: pmix, or pmi2 for the pip mpich and other MPICH
#                             builds without PMIx; empty: the site's MpiDefault
#   DSI_SRUN_ARGS             more srun flags, e.g. "--cpu-bind=cores"
#   DSI_CHECK_BINDING [0]     1: first print each rank's node and GPU (a dry run, no model)
#   DSI_MPI_SHARE_GPUS [0]    1: let model ranks share a node's GPUs (dsi_mpi/devices.py)
#   DSI_OUTPUT_DIR [$SLURM_SUBMIT_DIR/dsi-out]   where the JSONL goes when --output is not given
#   DSI_SMOKE [0]             1: a CPU check of the setup: the first row of bench/table2.csv as
#                             emulated models, all three modes, prompt ids 1..8 (unless a
#                             --prompt* flag is given)
#
# Whatever every job step needs is done here and nowhere else: requeueing, a signal before
# the time limit, resuming (their #SBATCH lines must stay in each script, as sbatch reads
# only the file it is given: `--requeue` and `--signal=B:TERM@120`). Bash runs a trap only
# between commands, so the step runs in the background and is waited for (`srun ... & wait`):
# a TERM to this shell (120 s before the time limit) is passed to every rank of the step
# (`scancel --signal=TERM`: srun itself would kill the step); dsi-mpi stops within 2 s,
# keeping every record written, and the job requeues itself. A requeued job (SLURM_RESTART_COUNT > 0; Slurm also requeues after a preemption or
# a node failure) runs with --resume (an --overwrite is dropped): it appends the missing
# records to the same output, and the file ends equal to one uninterrupted run's.

DSI_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TABLE2=$DSI_REPO/bench/table2.csv
EMULATED_PROMPT=(--prompt-ids "1,2,3,4,5,6,7,8")
job=${SLURM_JOB_NAME:-dsi}
python=${DSI_PYTHON:-python}
out_dir=${DSI_OUTPUT_DIR:-$SLURM_SUBMIT_DIR/dsi-out}
ntasks=${SLURM_NTASKS:?run this under sbatch (SLURM_NTASKS is not set)}
place=() hostfile=""

die() { echo "$job: error: $*" >&2; exit 2; }

# flag_value FLAG ARGS... -- the value ARGS give FLAG last ("FLAG V" or "FLAG=V"), as argparse
# reads it; fails if ARGS do not name FLAG.
flag_value() {
    local flag=$1 value="" found=1
    shift
    while (($#)); do
        case $1 in
        "$flag")
            value=${2-} found=0
            (($# < 2)) || shift
            ;;
        "$flag"=*) value=${1#*=} found=0 ;;
        esac
        shift
    done
    ((found == 0)) && echo "$value"
}

# has_prompt ARGS... -- ARGS name a prompt (--prompt, --prompt-file or --prompt-ids).
has_prompt() {
    local arg
    for arg; do [[ $arg != --prompt* ]] || return 0; done
    return 1
}

# table2_rows -- "NAME TARGET DRAFTER" for each row of bench/table2.csv, as emulated models.
table2_rows() {
    awk -F, '/^#/ {next}
        !seen++ {for (i = 1; i <= NF; i++) col[$i] = i; next}
        {printf "%s emulated:tpot_ms=%s,ttft_ms=%s emulated:tpot_ms=%s,ttft_ms=%s,acceptance=%s\n",
            $col["name"], $col["target_tpot_ms"], $col["target_ttft_ms"], $col["drafter_tpot_ms"],
            $col["drafter_ttft_ms"], $col["acceptance_rate"]}' "$TABLE2"
}

# place_node -- every rank of the allocation on its one node: rank 0 coordinates (no GPU),
# rank 1 drafts, the rest are target servers; each model rank takes its own GPU.
place_node() {
    echo "$job: job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}: $ntasks ranks (coordinator," \
        "drafter, $((ntasks - 2)) targets), CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}"
}

# place_nodes [ARGS...] -- N nodes of G model ranks (--ntasks-per-node=G+1): the coordinator,
# the drafter and G-1 targets on the first node, G targets on each other one. Block or cyclic
# placement cannot put G+1 ranks on one node and G on the rest, so srun gets a host list.
# With --target-ranks T among ARGS (tensor parallelism: a server is T ranks of one node), each
# node gets only whole servers: the first floor((G-1)/T) of them, the others floor(G/T), so
# that no server straddles two nodes; the GPUs left over stay idle (each rank binds the next
# GPU of its node in rank order: a server's GPUs are consecutive).
place_nodes() {
    local per_node nodes node i tp first rest
    per_node=${SLURM_NTASKS_PER_NODE:?submit with --ntasks-per-node=G+1 (G GPUs per node)}
    per_node=${per_node%%(*}  # "9(x2)" on some Slurm versions
    ((per_node >= 2)) || die "--ntasks-per-node must be G+1 >= 2, got $per_node"
    tp=$(flag_value --target-ranks "$@") || tp=1
    [[ $tp =~ ^[1-9][0-9]*$ ]] || die "--target-ranks must be an integer >= 1, got '$tp'"
    first=$(((per_node - 2) / tp * tp)) rest=$(((per_node - 1) / tp * tp))
    ((first + rest > 0)) || die "--target-ranks $tp: no server of $tp GPUs fits a node of" \
        "$((per_node - 1)) GPUs"
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    hostfile=$(mktemp "${TMPDIR:-/tmp}/dsi-hosts.XXXXXX")
    trap 'rm -f "$hostfile"' EXIT
    {
        echo "${nodes[0]}"  # the coordinator
        echo "${nodes[0]}"  # the drafter
        for ((i = 0; i < first; i++)); do echo "${nodes[0]}"; done
        for node in "${nodes[@]:1}"; do
            for ((i = 0; i < rest; i++)); do echo "$node"; done
        done
    } >"$hostfile"
    ntasks=$(wc -l <"$hostfile")
    place=(--distribution=arbitrary)
    export SLURM_HOSTFILE=$hostfile
    # srun would otherwise warn that it cannot honour the allocation's tasks per node.
    unset SLURM_NTASKS_PER_NODE
    echo "$job: job ${SLURM_JOB_ID:-?}: ${#nodes[@]} nodes (${nodes[*]}), $ntasks ranks:" \
        "coordinator and drafter on ${nodes[0]}, $((ntasks - 2)) target ranks" \
        "($(((ntasks - 2) / tp)) servers of $tp), $first on ${nodes[0]} and $rest on each other node"
}

# run_dsi NAME ARGS... -- srun `dsi-mpi run --output DSI_OUTPUT_DIR/NAME ARGS...` on the
# placed ranks; an --output among ARGS wins.
run_dsi() {
    local output=$out_dir/$1 given target name drafter more=()
    shift
    if given=$(flag_value --output "$@"); then output=$given; fi
    mkdir -p "$(dirname "$output")"
    local run=("$python" -m mpi4py -m dsi_mpi run --output "$output")
    if [[ ${DSI_SMOKE:-0} == 1 ]]; then
        read -r name target drafter < <(table2_rows)
        run+=(--target "$target" --drafter "$drafter" --mode "dsi,si,nonsi")
        has_prompt "$@" || run+=("${EMULATED_PROMPT[@]}")
        echo "$job: DSI_SMOKE=1: $name as emulated models"
    fi
    if ((${SLURM_RESTART_COUNT:-0} > 0)); then
        local arg kept=()
        for arg; do [[ $arg == --overwrite ]] || kept+=("$arg"); done
        set -- "${kept[@]}" --resume
        echo "$job: restart ${SLURM_RESTART_COUNT} of job ${SLURM_JOB_ID:-?}: --resume"
    fi
    run+=("$@")
    target=$(flag_value --target "${run[@]}") || true
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} && $target != emulated:* ]] &&
        ! flag_value --device "${run[@]}" >/dev/null; then
        echo "$job: note: the job has GPUs, but no --device flag: the models load on the CPU"
    fi

    # Since Slurm 22.05 a step does not take --cpus-per-task from the allocation: pass it on,
    # and keep torch's CPU threads within it.
    local cpus=${SLURM_CPUS_PER_TASK:-1}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpus} PYTHONUNBUFFERED=1
    local srun=(srun --ntasks="$ntasks" "${place[@]}" --cpus-per-task="$cpus" --kill-on-bad-exit=1)
    local plugin=${DSI_MPI_PLUGIN-pmix}
    [[ -z $plugin ]] || srun+=(--mpi="$plugin")
    read -ra more <<<"${DSI_SRUN_ARGS:-}"
    srun+=("${more[@]}")

    if [[ ${DSI_CHECK_BINDING:-0} == 1 ]]; then
        "${srun[@]}" "$python" -m mpi4py -m dsi_mpi.devices
    fi
    echo "+ ${hostfile:+SLURM_HOSTFILE=$hostfile }$(printf '%q ' "${srun[@]}" "${run[@]}")"
    local status=0
    "${srun[@]}" "${run[@]}" &
    step_pid=$!
    trap stop_step TERM
    while :; do
        wait "$step_pid" && status=0 || status=$?
        kill -0 "$step_pid" 2>/dev/null || break  # still running: a trap cut the wait short
    done
    trap - TERM
    if ((stopping)); then
        requeue_job
        exit "$status"
    fi
    ((status == 0)) || exit "$status"
    echo "$job: wrote $output"
}

stopping=0 step_pid=""

# stop_step -- the TERM trap (Slurm's --signal=B:TERM@120 before the time limit, a preemption,
# scancel --signal=TERM --batch): pass it to the ranks of the job's steps, which stop and keep
# what they wrote. Not to srun itself: srun answers a TERM by killing the step.
stop_step() {
    stopping=1
    echo "$job: SIGTERM: stopping the run (its finished records are kept)"
    scancel --signal=TERM "${SLURM_JOB_ID:?}" ||
        { [[ -z $step_pid ]] || kill -TERM "$step_pid" 2>/dev/null || true; }
}

# requeue_job -- after a TERM: put the job back in the queue; it runs again with --resume.
requeue_job() {
    if scontrol requeue "${SLURM_JOB_ID:?}"; then
        echo "$job: requeued job $SLURM_JOB_ID: it runs again with --resume"
    else
        echo "$job: could not requeue job $SLURM_JOB_ID (submit with --requeue); resubmit with" \
            "the same flags and --resume to finish $output" >&2
    fi
}
