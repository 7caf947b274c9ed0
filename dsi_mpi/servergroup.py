"""A target server over several ranks: transformers' tensor parallelism, one leader, followers.

With ``--target-ranks N`` a target server is N consecutive ranks of one node (``roles.py``).
Everything outside the server sees its first rank, the leader, as the server: the coordinator
sends it every Verify and Cancel, and it alone replies. Inside the server:

- one MPI sub-communicator (``comm.Split`` over the world: :func:`split`) carries everything the
  followers need: the Verify the leader is about to run (the step), the cancellation verdict at
  every gate point, and Stop when the leader stops serving;
- one torch.distributed world made by the server's ranks alone (the leader broadcasts its
  rendezvous address on the sub-communicator; gloo on a CPU, NCCL on GPUs) carries only the
  model's own all-reduces and all-gathers, with transformers' ``DistributedConfig(tp_size=N)``
  sharding the weights (the coordinator and drafter never join torch.distributed);
- every rank runs the same :class:`~dsi_mpi.worker.TargetWorker` on the same Verify: the same
  crop, the same forward; only the leader's result is sent.

Cancellation (``docs/protocol.md``): a Cancel reaches the leader only. At every gate point
(before a forward and between decoder layers, ``backends/gate.py``) the server agrees with one
small collective, the leader's verdict broadcast on the sub-communicator, so every rank stops
at the same layer and crops to the same length (``DSI_MPI_TP_CHECK=1`` asserts it after every
step). No rank waits alone in the model's next all-reduce.

Faults: every wait here has a bound, half of ``--timeout``, so a member that is hung or gone
mid-forward is named by the rank that waited for it before rank 0 would blame that rank; the
model's collectives get the same bound once the model is loaded. A follower that is idle
sends heartbeats to rank 0 like any worker, so rank 0 names it when it stops.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
from mpi4py import MPI

from dsi_mpi.protocol import Shutdown, Tag, Verify, decode, encode
from dsi_mpi.roles import Layout
from dsi_mpi.trace import NO_TRACE, Recorder
from dsi_mpi.transport import Transport
from dsi_mpi.worker import TargetWorker

CHECK_ENV = "DSI_MPI_TP_CHECK"  # 1: every rank of a server checks equal cache lengths per step
LOAD_TIMEOUT_S = 900.0  # the model's collectives while it loads (ranks load at their own pace)
SPINS = 200  # Test() calls before a group wait starts to sleep between them
SLEEP_MAX_S = 5e-4
ADDRESS_BYTES = 256
RELEASE_S = 1.0  # how long the leader's Stop may take to leave (small: sent eagerly)


class GroupLost(RuntimeError):
    """A rank of this server did not reach a collective within the bound: hung or gone."""


def split(comm: MPI.Comm, layout: Layout) -> MPI.Comm | None:
    """The sub-communicator of this rank's server (None: one rank per server, or not a target
    rank). Collective over ``comm``: every rank calls it."""
    if layout.target_ranks == 1:
        return None
    rank = comm.Get_rank()
    leader = layout.server_of(rank)
    sub = comm.Split(MPI.UNDEFINED if leader is None else leader, rank)
    return None if sub == MPI.COMM_NULL else sub


class ServerGroup:
    """This rank's place in a server of several ranks, and the server's messages."""

    def __init__(self, comm: MPI.Comm, layout: Layout, world_rank: int, timeout_s: float) -> None:
        self.comm = comm
        self.layout = layout
        self.leader = layout.server_of(world_rank)
        assert self.leader is not None
        self.ranks = layout.group(self.leader)
        self.is_leader = world_rank == self.leader
        self.bound_s = timeout_s / 2  # named by a member before rank 0 blames the waiting rank
        self.check = os.environ.get(CHECK_ENV) == "1"
        self._flag = np.zeros(1, dtype=np.uint8)
        self._sends: list[tuple[MPI.Request, np.ndarray]] = []
        self.agreements = 0  # gate points agreed on (tests, benchmarks)

    # ------------------------------------------------------------------ set-up

    def start_torch(self, device: str) -> None:
        """Join this server's torch.distributed world (before the model loads): the same node
        for every rank, the leader's address, ``LOCAL_RANK`` the GPU index."""
        import torch.distributed as dist

        node = _fixed(socket.gethostname())
        nodes = np.zeros((len(self.ranks), ADDRESS_BYTES), dtype=np.uint8)
        self._complete(self.comm.Iallgather([node, MPI.UINT8_T], [nodes, MPI.UINT8_T]),
                       "the start of the server")
        names = [_text(row) for row in nodes]
        if len(set(names)) > 1:
            raise RuntimeError(f"target server {self.leader}: its ranks {list(self.ranks)} run on "
                               f"nodes {names}: the ranks of a server must share a node "
                               "(docs/cluster.md)")
        address = _fixed(_free_address() if self.is_leader else "")
        self._complete(self.comm.Ibcast([address, MPI.UINT8_T], root=0), "the server's address")
        index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        os.environ.update(RANK=str(self.comm.Get_rank()), WORLD_SIZE=str(len(self.ranks)),
                          LOCAL_RANK=str(index))
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(
            backend, init_method=f"tcp://{_text(address)}",
            rank=self.comm.Get_rank(), world_size=len(self.ranks),
            timeout=datetime.timedelta(seconds=max(LOAD_TIMEOUT_S, self.bound_s)),
            device_id=_cuda_device(device) if backend == "nccl" else None)

    def loaded(self, backend: object) -> None:
        """The model is loaded: its collectives get the group's bound, and its gate agrees."""
        import torch.distributed.distributed_c10d as c10d

        timeout = datetime.timedelta(seconds=self.bound_s)
        for group in list(c10d._world.pg_map):  # the default group and the mesh's
            try:
                c10d._set_pg_timeout(timeout, group)
            except (ValueError, AssertionError, RuntimeError):
                pass
        gate = getattr(backend, "gate", None)
        if gate is not None:
            gate.collective = True

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ per step

    def agree(self, stop: bool) -> bool:
        """Collective over the server at a gate point: the leader's verdict, on every rank."""
        self._flag[0] = stop
        self._complete(self.comm.Ibcast([self._flag, MPI.UINT8_T], root=0),
                       "a cancellation check")
        self.agreements += 1
        return bool(self._flag[0])

    def announce(self, msg: Verify) -> None:
        """Leader: send the followers the Verify it is about to run (without distributions:
        only the leader's are sent on)."""
        self._send(np.asarray(encode(replace(msg, want_probs=False))), Tag.VERIFY)

    def release(self) -> None:
        """Leader: the followers stop serving (Shutdown, or the leader failed)."""
        self._send(np.asarray(encode(Shutdown())), Tag.SHUTDOWN)
        deadline = time.monotonic() + min(self.bound_s, RELEASE_S)  # a hung follower: no wait
        while self._sends and time.monotonic() < deadline:
            self._sends = [(r, b) for r, b in self._sends if not r.Test()]
            time.sleep(1e-4)

    def check_cache(self, length: int) -> None:
        """With ``DSI_MPI_TP_CHECK=1``: every rank holds ``length`` cached positions."""
        if not self.check:
            return
        mine = np.array([length], dtype=np.int64)
        every = np.zeros(len(self.ranks), dtype=np.int64)
        self._complete(self.comm.Iallgather([mine, MPI.INT64_T], [every, MPI.INT64_T]),
                       "the cache check")
        if len(set(every.tolist())) != 1:
            raise AssertionError(f"target server {self.leader}: the ranks {list(self.ranks)} hold "
                                 f"caches of {every.tolist()} positions")

    def _send(self, payload: np.ndarray, tag: int) -> None:
        for member in range(1, len(self.ranks)):
            self._sends.append((self.comm.Isend([payload, MPI.INT64_T], member, int(tag)),
                                payload))
        self._sends = [(r, b) for r, b in self._sends if not r.Test()]

    # ------------------------------------------------------------------ follower

    def serve(self, transport: Transport | None, worker: TargetWorker,
              trace: Recorder = NO_TRACE) -> None:
        """A follower: run every step the leader sends, until it says Stop."""
        while (step := self.next_step(transport)) is not None:
            self.follow(worker, step)

    def follow(self, worker: TargetWorker, step: Verify) -> None:
        """A follower's part of one step: the leader's forward, on this rank's shard."""
        with self.collectives():
            worker.verify(step, lambda: self.agree(False))
        self.check_cache(worker.runner.backend.cached_length())

    @contextmanager
    def collectives(self) -> Iterator[None]:
        """Around a forward: a failure of the model's collectives (a peer gone, or past the
        bound) says which rank of the server is missing."""
        try:
            yield
        except GroupLost:
            raise
        except RuntimeError as exc:  # torch.distributed's DistBackendError, gloo's timeouts
            if not _is_collective_failure(exc):
                raise
            raise GroupLost(self._blame("the model's collectives") +
                            f" ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc

    def next_step(self, transport: Transport | None) -> Verify | None:
        """The leader's next step, or None once it stopped; meanwhile heartbeats to rank 0.
        Rank 0's Shutdown is noted, but the follower stops on its leader's Stop (a step the
        leader sent before it must still run: the leader waits for it in the forward), or
        when the leader has been silent a bound since."""
        status, start, shutdown_at = MPI.Status(), time.monotonic(), None
        while not self.comm.Iprobe(0, MPI.ANY_TAG, status):
            if transport is None:  # tests: no coordinator
                time.sleep(1e-5)
                continue
            incoming = transport.poll(source=0)
            if incoming is not None and isinstance(incoming.message, Shutdown):
                shutdown_at = time.monotonic()
            now = time.monotonic()
            if shutdown_at is not None and now - shutdown_at > self.bound_s:
                return None  # the leader is gone: rank 0 already ends the job
            transport.pulse.keep_alive()
            time.sleep(min(max(0.25 * (now - start), 1e-5), transport.poll_max_s))
        payload = np.empty(status.Get_count(MPI.INT64_T), dtype=np.int64)
        self.comm.Recv([payload, MPI.INT64_T], 0, status.Get_tag())
        msg, _ = decode(status.Get_tag(), payload)
        return msg if isinstance(msg, Verify) else None

    # ------------------------------------------------------------------ waits

    def _complete(self, request: MPI.Request, what: str) -> None:
        """Wait for ``request`` at most the bound, else raise GroupLost naming who is missing."""
        spins, deadline = 0, time.monotonic() + self.bound_s
        while not request.Test():
            spins += 1
            if spins > SPINS:
                if time.monotonic() > deadline:
                    raise GroupLost(self._blame(what))
                time.sleep(min(1e-5 * (spins - SPINS), SLEEP_MAX_S))

    def _blame(self, what: str) -> str:
        if self.is_leader:
            who = ", ".join(f"rank {r} ({self.layout.describe(r)})" for r in self.ranks[1:])
        else:
            who = f"rank {self.leader} (the leader of target server {self.leader})"
        return (f"{who} did not reach {what} for {self.bound_s:g} s: it is hung or gone "
                "(--timeout / 2)")


def _fixed(text: str) -> np.ndarray:
    out = np.zeros(ADDRESS_BYTES, dtype=np.uint8)
    raw = text.encode()[:ADDRESS_BYTES]
    out[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return out


def _is_collective_failure(exc: RuntimeError) -> bool:
    import torch.distributed as dist

    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(
        word in text for word in ("gloo", "nccl", "timed out", "connection closed",
                                  "connection reset"))


def _text(buffer: np.ndarray) -> str:
    return bytes(buffer).rstrip(b"\0").decode()


def _free_address() -> str:
    """A loopback port free now (every rank of a server is on this node)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _cuda_device(device: str) -> object:
    import torch

    return torch.device(device)
