"""A rank's clock against rank 0's, by ping-pong (Cristian's method): what aligns the ranks'
events on one clock in a trace (``trace.py``)."""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from dsi_mpi.liveness import WaitTimeout, wait_until
from dsi_mpi.protocol import Tag


def offset(comm: MPI.Comm, timeout_s: float, rounds: int = 20) -> tuple[float, float]:
    """This rank's ``time.perf_counter`` against rank 0's (collective over ``comm``): the
    offset to add to a local time to get rank 0's, and its uncertainty, half the shortest of
    ``rounds`` round trips. Rank 0 gets (0, 0). Ranks wait for their turn asleep, so the ones
    being measured have the cores."""
    rank, size = comm.Get_rank(), comm.Get_size()
    buf = np.zeros(1, dtype=np.float64)
    if rank == 0:
        for peer in range(1, size):
            best, measured = float("inf"), 0.0
            for _ in range(rounds):
                sent = time.perf_counter()
                comm.Send([buf, MPI.DOUBLE], dest=peer, tag=Tag.CLOCK)
                comm.Recv([buf, MPI.DOUBLE], source=peer, tag=Tag.CLOCK)
                back = time.perf_counter()
                if back - sent < best:
                    best, measured = back - sent, (sent + back) / 2 - float(buf[0])
            comm.Send([np.array([measured, best / 2]), MPI.DOUBLE], dest=peer, tag=Tag.CLOCK)
        return 0.0, 0.0
    wait_until(lambda: comm.Iprobe(source=0, tag=Tag.CLOCK) or None, timeout_s,
               lambda _: WaitTimeout(f"rank {rank} waited {timeout_s:.0f} s "
                                     "for the clock alignment"), max_sleep_s=1e-4)
    for _ in range(rounds):
        comm.Recv([buf, MPI.DOUBLE], source=0, tag=Tag.CLOCK)
        buf[0] = time.perf_counter()
        comm.Send([buf, MPI.DOUBLE], dest=0, tag=Tag.CLOCK)
    result = np.zeros(2, dtype=np.float64)
    comm.Recv([result, MPI.DOUBLE], source=0, tag=Tag.CLOCK)
    return float(result[0]), float(result[1])
