#!/usr/bin/env bash
# selftest.sh -- end-to-end check of local_slurm.sh: start, run an mpi4py job
# through sbatch + srun --mpi=pmi2, check it formed ONE world of N ranks (not
# N singletons), stop; twice, to prove restartability. Leaves Slurm stopped.
#
# Usage: selftest.sh [CYCLES]   (default 2). Needs root and the packages
# (run "local_slurm.sh install" first). Honours the DSI_SLURM_* settings.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
LS=$HERE/local_slurm.sh
CYCLES=${1:-2}
NP=4
PYTHON=$(python -c 'import sys; print(sys.executable)')  # not the pyenv shim
WORK=$(mktemp -d /tmp/dsi-slurm-selftest.XXXXXX)

# Whatever happens, do not leave daemons behind.
trap '"$LS" stop >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT

cat >"$WORK/job.sh" <<EOF
#!/bin/bash
#SBATCH --ntasks=$NP
#SBATCH --time=5
#SBATCH --output=$WORK/job-%j.out
srun --mpi=pmi2 -n $NP "$PYTHON" -m mpi4py -c \\
  "from mpi4py import MPI; c=MPI.COMM_WORLD; print(c.Get_rank(), c.Get_size())"
EOF

for cycle in $(seq "$CYCLES"); do
    echo "== cycle $cycle: start"
    t0=$SECONDS
    eval "$("$LS" start)"
    echo "   started in $((SECONDS - t0))s, SLURM_CONF=$SLURM_CONF"
    srun --mpi=list 2>&1 | sed 's/^/   /'

    t0=$SECONDS
    jobid=$(sbatch --parsable "$WORK/job.sh")
    "$LS" wait-job "$jobid" 120 || { cat "$WORK/job-$jobid.out" >&2; exit 1; }
    echo "   job $jobid finished in $((SECONDS - t0))s:"
    sed 's/^/     /' "$WORK/job-$jobid.out"
    expected=$(for r in $(seq 0 $((NP - 1))); do echo "$r $NP"; done)
    got=$(grep -E '^[0-9]+ [0-9]+$' "$WORK/job-$jobid.out" | sort -n)
    if [[ $got != "$expected" ]]; then
        echo "FAIL: expected ranks 0..$((NP - 1)) of size $NP" >&2
        exit 1
    fi

    echo "== cycle $cycle: stop"
    "$LS" stop
    if "$LS" status >/dev/null; then
        echo "FAIL: still running after stop" >&2
        exit 1
    fi
done
echo "selftest OK ($CYCLES cycles)"
