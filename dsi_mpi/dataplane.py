"""An optional tensor data plane: torch.distributed set up from an MPI communicator.

The default path moves only int64 token blocks and, for ``--verify rejection``, float64
distributions as MPI messages (``transport.py``). Where distributions live on GPUs, moving
them through host memory and MPI costs two copies; this module moves them GPU to GPU with
NCCL instead (gloo between CPU ranks, and to and from the coordinator, which has no GPU).

Setup is collective over the communicator: ranks and size are MPI's; rank 0 opens the
rendezvous store on a free port (or ``MASTER_PORT``) and broadcasts its address and port over
MPI, so no launcher variables are needed. Backends: ``gloo`` when every rank is on the CPU;
``cpu:gloo,cuda:nccl`` when some rank has a GPU, so CUDA tensors between two GPU ranks go
over NCCL and everything else over gloo.

    plane = DataPlane(comm, device)             # collective
    plane.send(q, dest=0)                       # q: [k, vocab] float, bounded wait
    q = plane.recv((k, vocab), source=1)        # arrives on this rank's device
    plane.close()                               # collective

Point-to-point order: under gloo, messages are matched by ``(source, tag)``; NCCL has no
tags, so between two GPU ranks tensors arrive in the order they were sent.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from mpi4py import MPI


class DataPlaneError(RuntimeError):
    """Setup failed on some rank; raised on every rank."""


def _is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def rendezvous_host(single_host: bool) -> str:
    """The address other ranks reach rank 0's store at: ``MASTER_ADDR`` if set, the loopback
    when every rank is on rank 0's host, else this host's first non-loopback address."""
    if os.environ.get("MASTER_ADDR"):
        return os.environ["MASTER_ADDR"]
    if single_host:
        return "127.0.0.1"
    name = socket.gethostname()
    addresses = {info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET)}
    routable = sorted(a for a in addresses if not a.startswith("127."))
    if not routable:
        raise DataPlaneError(f"host {name} resolves only to loopback addresses ({', '.join(sorted(addresses))}): "
                             "set MASTER_ADDR to an address of rank 0's node the other nodes can reach")
    return routable[0]


class DataPlane:
    """A torch.distributed process group over ``comm``'s ranks (the default group of this
    process: one data plane at a time). ``device`` is this rank's (``cpu`` or ``cuda:i``)."""

    def __init__(self, comm: MPI.Comm, device: str = "cpu", timeout_s: float = 60.0) -> None:
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.device = device
        self.timeout_s = timeout_s
        self.devices: list[str] = comm.allgather(device)  # every rank's device, by rank
        self.backend = "cpu:gloo,cuda:nccl" if any(_is_cuda(d) for d in self.devices) else "gloo"
        busy = "torch.distributed is already initialised in this process (one data plane at a time)"
        error: str | None = busy if dist.is_initialized() else None
        errors = [e for e in comm.allgather(error) if e]
        if errors:
            raise DataPlaneError(errors[0])

        # The loopback reaches rank 0 only from its own host (not a shared-memory split: see
        # devices.py for how launchers can hide which ranks share a host from MPI).
        single_host = len(set(comm.allgather(socket.gethostname()))) == 1
        timeout = datetime.timedelta(seconds=timeout_s)
        address: tuple[str, int] | str = ""
        store = None
        if self.rank == 0:
            try:
                host = rendezvous_host(single_host)
                port = int(os.environ.get("MASTER_PORT", "0"))  # 0: the OS picks a free port
                store = dist.TCPStore(host, port, self.size, True, timeout=timeout, wait_for_workers=False)
                address = (host, store.port)
            except Exception as exc:  # noqa: BLE001 - every rank must learn that setup failed
                address = f"rank 0 could not open the rendezvous store: {type(exc).__name__}: {exc}"
        address = comm.bcast(address, root=0)
        if isinstance(address, str):
            raise DataPlaneError(address)
        self.address = address
        error = None
        try:
            if store is None:
                store = dist.TCPStore(address[0], address[1], self.size, False, timeout=timeout)
            if _is_cuda(device):
                torch.cuda.set_device(torch.device(device))
            dist.init_process_group(self.backend, store=store, rank=self.rank, world_size=self.size, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        errors = [e for e in comm.allgather(error) if e]
        if errors:
            if dist.is_initialized():
                dist.destroy_process_group()
            raise DataPlaneError("data plane setup failed: " + "; ".join(errors))
        self._store = store  # rank 0 serves the store; keep it alive with the group
        self.closed = False

    def wire_device(self, peer: int) -> str:
        """Where a tensor to or from ``peer`` travels: this GPU if both ends have one, else the CPU."""
        return self.device if _is_cuda(self.device) and _is_cuda(self.devices[peer]) else "cpu"

    def isend(self, tensor: torch.Tensor, dest: int, tag: int = 0) -> Pending:
        """Start sending ``tensor`` to ``dest``; the returned handle must be waited on."""
        wire = tensor.to(self.wire_device(dest)).contiguous()
        return Pending(dist.isend(wire, dst=dest, tag=tag), wire, f"send to rank {dest}")

    def send(self, tensor: torch.Tensor, dest: int, tag: int = 0, timeout_s: float | None = None) -> None:
        self.isend(tensor, dest, tag).wait(self.timeout_s if timeout_s is None else timeout_s)

    def irecv(self, shape: Sequence[int], source: int, dtype: torch.dtype = torch.float32, tag: int = 0) -> Pending:
        buffer = torch.empty(tuple(shape), dtype=dtype, device=self.wire_device(source))
        return Pending(dist.irecv(buffer, src=source, tag=tag), buffer, f"tensor {tuple(shape)} from rank {source}")

    def recv(self, shape: Sequence[int], source: int, dtype: torch.dtype = torch.float32, tag: int = 0,
             timeout_s: float | None = None) -> torch.Tensor:
        """A tensor of known ``shape`` and ``dtype`` from ``source``, on this rank's device."""
        pending = self.irecv(shape, source, dtype, tag)
        return pending.wait(self.timeout_s if timeout_s is None else timeout_s).to(self.device)

    def channel(self, peer: int, shape: Sequence[int], dtype: torch.dtype = torch.float32, tag: int = 0) -> TensorChannel:
        return TensorChannel(self, peer, tuple(shape), dtype, tag)

    def close(self, timeout_s: float = 30.0) -> None:
        """Collective: meet the other ranks (bounded), then destroy the process group."""
        if self.closed:
            return
        self.closed = True
        request = self.comm.Ibarrier()
        deadline = time.monotonic() + timeout_s
        try:
            while not request.Test():
                if time.monotonic() > deadline:  # (a collective request cannot be cancelled)
                    raise TimeoutError(f"rank {self.rank}: other ranks never closed the data plane ({timeout_s:.0f} s)")
                time.sleep(0.0005)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            self._store = None

    def __enter__(self) -> DataPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Pending:
    """One started send or receive."""

    work: dist.Work
    tensor: torch.Tensor  # the buffer on the wire; the received tensor once waited on
    what: str

    def wait(self, timeout_s: float) -> torch.Tensor:
        """Wait at most ``timeout_s`` seconds; raises TimeoutError (or the backend's error)."""
        try:
            self.work.wait(timeout=datetime.timedelta(seconds=timeout_s))
        except RuntimeError as exc:
            if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
                raise TimeoutError(f"data plane: {self.what} not done after {timeout_s:.1f} s") from exc
            raise
        return self.tensor


@dataclass(frozen=True)
class TensorChannel:
    """Tensors of one shape and dtype between this rank and ``peer``, e.g. a drafter's
    distributions ``[k, vocab]`` for rejection sampling."""

    plane: DataPlane
    peer: int
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    tag: int = 0

    def send(self, tensor: torch.Tensor, timeout_s: float | None = None) -> None:
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            raise ValueError(f"channel to rank {self.peer} carries {self.dtype} {self.shape}, "
                             f"got {tensor.dtype} {tuple(tensor.shape)}")
        self.plane.send(tensor, self.peer, self.tag, timeout_s)

    def recv(self, timeout_s: float | None = None) -> torch.Tensor:
        return self.plane.recv(self.shape, self.peer, self.dtype, self.tag, timeout_s)
