"""What the MPI tests share (plain helpers, no tests or fixtures here): run the runtime on the
first ranks of the world, compare tokens, and agree on the verdict on every rank.

Each test runs the real runtime on a sub-communicator of the ranks it needs (the others wait
at the verdict), and every rank agrees on pass/fail with an allreduce before asserting, so a
failure on one rank never leaves another waiting. The fixtures (the tiny models, the
pretrained pairs) are ``tests/mpi/conftest.py``'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeVar

TIMEOUT_S = 120.0

T = TypeVar("T")


def settle(comm) -> None:  # an mpi4py communicator
    """Wait for every rank of ``comm`` without spinning: MPICH's blocking collectives poll at
    full speed, so ranks waiting for rank 0's serial work (a conversion, a reference
    ``generate``) would take the 2 cores from it. A nonblocking barrier, tested with a sleep."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.005)


def on_rank_0(work: Callable[[], T], what: str) -> T:
    """Rank 0 does ``work`` (serial set-up: building, converting) while the others wait without
    spinning; every rank returns its result, or fails with rank 0's error: none is left waiting
    in a collective that rank 0 will never join."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    verdict: tuple[T | None, str | None] = (None, None)
    if comm.Get_rank() == 0:
        try:
            verdict = (work(), None)
        except Exception as exc:  # every rank must learn it
            verdict = (None, f"{type(exc).__name__}: {exc}")
    settle(comm)
    result, error = comm.bcast(verdict, root=0)
    assert error is None, f"rank 0 could not {what}: {error}"
    return result


def run_on(ranks: int, configs: Sequence, prompts: Sequence = (), tokenizer: object | None = None,
           **kwargs):
    """Run the runtime on the first ``ranks`` ranks; returns (records on rank 0, error, pending)."""
    from mpi4py import MPI

    from dsi_mpi.runtime import Rank0, run

    world = MPI.COMM_WORLD
    assert world.Get_size() >= ranks, f"launch the MPI tests with mpiexec -n {ranks} or more"
    color = 0 if world.Get_rank() < ranks else MPI.UNDEFINED
    sub = world.Split(color, world.Get_rank())
    records, error, pending = [], None, 0
    if sub != MPI.COMM_NULL:
        try:
            outcome = run(sub, configs, Rank0(prompts, tokenizer, **kwargs))
            records, pending = outcome.records, outcome.pending_requests
        except Exception as exc:  # reported through the verdict
            error = f"rank {world.Get_rank()}: {type(exc).__name__}: {exc}"
        finally:
            sub.Free()
    return records, error, pending


def mismatch(records: Sequence[dict], expected: Sequence[list[int]]) -> str | None:
    """The first record whose tokens are not its prompt's expected tokens, described; or None."""
    for r in records:
        want = expected[r["prompt_index"]]
        if r["tokens"] != want:
            return (f"{r['mode']} k={r['lookahead']} sp={r['sp']} prompt {r['prompt_index']}: "
                    f"{r['tokens']} != {want}")
    return None


def agree(ok: bool, message: str = "") -> None:
    """Every rank learns whether every rank passed; then each asserts (rank 0 says why)."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    settle(world)
    messages = world.allgather(None if ok else message)
    failures = [m for m in messages if m is not None]
    assert not failures, "; ".join(failures)
