"""What the cancellation agreement of a target server of several ranks costs (issue 23).

A server of N ranks (``--target-ranks N``) agrees at every gate point (before a forward and
between decoder layers) whether to go on: one broadcast of one byte from the leader on the
server's MPI sub-communicator (``servergroup.ServerGroup.agree``). In one run, on the ranks
it is launched on (one server):

- the agreement alone: ``agree`` in a loop, microseconds per call (median of repeats);
- a tensor-parallel forward of a tiny float64 Llama (gloo), one token on a cached prefix, with
  no cancellation check (``should_cancel=None``) and with the agreement at every gate point,
  alternated, microseconds per forward and the difference: the agreement's cost per forward;
- the same forward on the leader alone with the probe it has without TP (no agreement), for
  scale.

    flock -x /tmp/dsi-cpu.lock mpiexec -n 2 python -m mpi4py bench/tp_agreement.py [--layers 8]

Prints one JSON line (config, numbers, git commit). CPU only: on GPUs the agreement is a host
collective too, but the forward it interrupts is asynchronous (see docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from mpi4py import MPI

from bench.common import provenance
from dsi_mpi.backends.hf import HFBackend
from dsi_mpi.roles import Layout
from dsi_mpi.servergroup import ServerGroup


def _build(root: str, layers: int) -> str:
    from dsi_mpi.tiny import build_tiny_model

    return build_tiny_model(f"{root}/llama", "llama", layers=layers)


def _time(fn, repeats: int) -> float:
    """Median wall time of ``fn`` in microseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--prefix", type=int, default=32, help="cached positions")
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    root = tempfile.mkdtemp() if rank == 0 else None
    if rank == 0:
        _build(root, args.layers)
    root = world.bcast(root, root=0)
    path = f"{root}/llama"
    layout = Layout(world_size=size, drafters=(), targets=(0,), target_ranks=size)
    group = ServerGroup(world.Dup(), layout, rank, timeout_s=120.0)
    group.start_torch("cpu")
    backend = HFBackend(path, dtype="float64", device="cpu", tp_size=size)
    group.loaded(backend)
    prefix = list(range(3, 3 + args.prefix))
    backend.forward_logits(prefix)

    world.Barrier()
    agree_us = _time(lambda: group.agree(False), args.repeats * 10)

    def forward(check) -> None:
        backend.crop(args.prefix)
        backend.forward_logits([7], should_cancel=check)

    def agreed() -> bool:
        return group.agree(False)

    plain, checked = [], []
    for _ in range(args.repeats):  # alternated, so that load changes hit both alike
        world.Barrier()
        plain.append(_time(lambda: forward(None), 1))
        world.Barrier()
        checked.append(_time(lambda: forward(agreed), 1))
    plain_us, checked_us = statistics.median(plain), statistics.median(checked)
    group.close()
    if rank == 0:
        gate_points = args.layers + 1
        print(json.dumps({
            "bench": "tp_agreement", "ranks": size, "layers": args.layers,
            "prefix": args.prefix, "repeats": args.repeats,
            "agree_us": round(agree_us, 2),
            "forward_us": round(plain_us, 1), "forward_agreed_us": round(checked_us, 1),
            "agreement_per_forward_us": round(checked_us - plain_us, 1),
            "gate_points_per_forward": gate_points,
            "overhead_ratio": round(checked_us / plain_us, 4),
            **provenance(size),
        }), flush=True)


if __name__ == "__main__":
    main()
