"""Which device each model rank uses: one GPU per model rank of a node, none for rank 0."""

from __future__ import annotations

from mpi4py import MPI

from dsi_mpi.roles import Layout


def model_device(comm: MPI.Comm, layout: Layout, device: str) -> str:
    """``cuda`` becomes ``cuda:i`` with ``i`` this rank's index among the model ranks of its
    node (a shared-memory split), so each model rank gets its own GPU."""
    if device != "cuda":
        return device
    import torch

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        local_ranks = node.allgather(comm.Get_rank())
    finally:
        node.Free()
    model_ranks = [r for r in local_ranks if r != 0]
    index = model_ranks.index(comm.Get_rank())
    count = torch.cuda.device_count()
    if index >= count:
        raise RuntimeError(f"rank {comm.Get_rank()}: node has {count} GPU(s) for {len(model_ranks)} model ranks")
    return f"cuda:{index}"
