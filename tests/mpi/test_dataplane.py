"""The optional tensor data plane (torch.distributed from the MPI world), on CPU with gloo.

Run under ``mpiexec -n 5 python -m pytest --with-mpi tests/mpi/test_dataplane.py``. Each test
sets up its own process group and destroys it at the end; every rank agrees on pass/fail
(allgather) before asserting, so a failure on one rank never leaves another waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from mpi4py import MPI

from dsi_mpi.dataplane import DataPlane
from tests.mpi.conftest import agree

WORLD = MPI.COMM_WORLD
RANK = WORLD.Get_rank()
K, VOCAB = 5, 1000  # a drafter's block of distributions: [k, vocab]


def _distributions(seed: int, rows: int, dtype: torch.dtype) -> torch.Tensor:
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.softmax(logits, dim=-1).to(dtype)  # [rows, vocab]


def _mpi_recv(comm: MPI.Comm, shape: tuple[int, ...], dtype: torch.dtype, source: int, tag: int) -> torch.Tensor:
    buffer = np.empty(shape, dtype=torch.empty((), dtype=dtype).numpy().dtype)
    comm.Recv(buffer, source=source, tag=tag)
    return torch.from_numpy(buffer)


def _on_plane(comm: MPI.Comm, body: Callable[[DataPlane], tuple[bool, str]]) -> None:
    """Build a plane over ``comm``, run ``body`` on it, close and free everything, then have
    every rank of the world agree on ``body``'s verdict (an exception is a failure)."""
    ok, message = True, ""
    if comm != MPI.COMM_NULL:
        plane = None
        try:
            plane = DataPlane(comm, "cpu", timeout_s=30.0)
            ok, message = body(plane)
        except Exception as exc:  # noqa: BLE001 - reported through the verdict
            ok, message = False, f"rank {RANK}: {type(exc).__name__}: {exc}"
        finally:
            if plane is not None:
                plane.close()
            comm.Free()
    agree(ok, message)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_distributions_move_over_gloo_exactly_as_over_mpi(dtype: torch.dtype) -> None:
    """The drafter (rank 1) sends q [k, vocab] and every target sends p [k + 1, vocab] to the
    coordinator (rank 0), once over the data plane and once as MPI messages; rank 0 compares."""

    def body(plane: DataPlane) -> tuple[bool, str]:
        comm = plane.comm
        ok = plane.backend == "gloo" and plane.devices == ["cpu"] * comm.Get_size()
        message = f"rank {RANK}: backend {plane.backend}, devices {plane.devices}"
        shapes = {r: (K if r == 1 else K + 1, VOCAB) for r in range(1, comm.Get_size())}
        if RANK == 0:
            for source, shape in shapes.items():
                over_plane = plane.channel(source, shape, dtype, tag=3).recv()
                over_mpi = _mpi_recv(comm, shape, dtype, source, tag=3)
                sent = _distributions(source, shape[0], dtype)
                if not (over_plane.dtype == dtype and torch.equal(over_plane, over_mpi) and torch.equal(over_plane, sent)):
                    return False, f"rank {source}'s tensor differs between gloo and MPI"
        else:
            tensor = _distributions(RANK, shapes[RANK][0], dtype)
            plane.channel(0, shapes[RANK], dtype, tag=3).send(tensor)
            comm.Send(np.ascontiguousarray(tensor.numpy()), dest=0, tag=3)
        return ok, message

    _on_plane(WORLD.Dup(), body)


@pytest.mark.mpi(min_size=2)
def test_a_receive_that_never_comes_times_out() -> None:
    def body(plane: DataPlane) -> tuple[bool, str]:
        if RANK != 0:
            return True, ""
        start = time.monotonic()
        try:
            plane.recv((K, VOCAB), source=1, tag=9, timeout_s=0.5)
        except TimeoutError as exc:
            waited = time.monotonic() - start
            return 0.4 < waited < 10 and "rank 1" in str(exc), f"timed out after {waited:.2f} s: {exc}"
        return False, "a receive with no sender returned"

    _on_plane(WORLD.Dup(), body)


@pytest.mark.mpi(min_size=3)
def test_ranks_come_from_the_communicator_it_is_built_on() -> None:
    """A plane over world ranks 1.. numbers them from 0, as MPI does on that communicator."""

    def body(plane: DataPlane) -> tuple[bool, str]:
        ok = (plane.rank, plane.size) == (RANK - 1, WORLD.Get_size() - 1)
        message = f"world rank {RANK} is rank {plane.rank} of {plane.size}"
        expected = _distributions(7, K, torch.float64)
        if plane.rank == 1:
            plane.send(expected, dest=0)
        elif plane.rank == 0:
            got = plane.recv((K, VOCAB), source=1, dtype=torch.float64)
            if not torch.equal(got, expected):
                return False, "tensor from sub-rank 1 differs"
        return ok, message

    _on_plane(WORLD.Split(0 if RANK >= 1 else MPI.UNDEFINED, RANK), body)


@pytest.mark.mpi(min_size=2)
def test_a_channel_refuses_a_tensor_of_another_shape() -> None:
    def body(plane: DataPlane) -> tuple[bool, str]:
        try:
            plane.channel(0, (K, VOCAB), torch.float32).send(torch.zeros(K + 1, VOCAB))
        except ValueError:
            return True, ""
        return False, f"rank {RANK}: a [k + 1, vocab] tensor went down a [k, vocab] channel"

    _on_plane(WORLD.Dup(), body)
