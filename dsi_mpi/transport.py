"""Point-to-point messaging over one duplicated communicator, with every request tracked.

Sends are nonblocking (``Isend`` on numpy buffers: mpi4py's buffer interface, no pickle).
Receives poll with ``Iprobe``, in one of two ways (``poll``):

- ``spin``: probe again at once. A message is seen within one probe (about a microsecond)
  of its arrival, at the price of a busy core per waiting rank: right when every rank has a
  core of its own (a cluster node with one rank per GPU), wrong when ranks outnumber cores.
- ``backoff``: sleep between probes, each sleep a quarter of the time waited so far
  (``BACKOFF_FRACTION``), from ``BACKOFF_MIN_S`` up to ``poll_max_s``, so idle ranks leave
  the cores to the ranks that compute (9 ranks on 2 cores stay fair). A message is seen at
  most a quarter of the wait, and never more than ``poll_max_s``, plus a wake-up after it
  arrives. Sleeps wake within microseconds: the transport sets the thread's timer slack to
  1 us (Linux; the default 50 us makes a 10 us sleep last about 70 us).
- ``auto`` (made when the transport is made, collectively): ``spin`` on nodes where every
  rank has a core of its own, ``backoff`` elsewhere (:func:`dsi_mpi.devices.poll_strategy`).

Either way every wait has a deadline and raises the ERROR a failing rank sends (and a
worker's SIGNALLED as :class:`~dsi_mpi.exits.Stopped`). Every poll raises ``Stopped`` when a
signal asked this rank to stop (``exits.py``).

Liveness, both ways, while a run is active: every rank sends a HEARTBEAT to its peers (rank 0
to every worker, a worker to rank 0) each ``every_s`` seconds from its waits, which is where
an idle rank spends its time; poll swallows heartbeats (the role loops never see them) and
notes when each rank was last heard from. A worker that watches rank 0 raises
:class:`CoordinatorLost` from a wait once rank 0 has been silent for its bound; the
coordinator names a silent worker itself (``coordinator.py``).

``close`` completes what is left and frees the communicator, and reports how many requests
were still open, which tests assert to be zero. It never cancels a send: cancelling a send
to a rank that is hung or gone crashes MPICH (a segfault in ``MPI_Cancel``); a job with sends
left open is aborted instead.
"""

from __future__ import annotations

import ctypes
import sys
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from mpi4py import MPI

from dsi_mpi import exits
from dsi_mpi.devices import poll_strategy
from dsi_mpi.exits import Stopped
from dsi_mpi.protocol import (
    Error,
    Heartbeat,
    Message,
    Signalled,
    Tag,
    decode,
    encode,
    probs_of,
    with_probs,
)

IDLE = float("inf")  # a worker waiting for its next request from the coordinator (see wait)
# An Iprobe that finds nothing may only have advanced MPI's progress engine: MPICH reports a
# message that arrived long ago at the 2nd to 5th call (measured with the pip MPICH, 2 to 17
# ranks). A busy rank that probes once between forwards (the drafter, a target checking for
# CANCEL) would see every message one forward late; so a poll probes up to this many times.
PROBES = 8
BACKOFF_MIN_S = 1e-5  # shortest sleep of a backoff wait
BACKOFF_FRACTION = 0.25  # each sleep: this fraction of the time waited so far ...
# ... but at most this long (the default; a message is seen this late at worst)
BACKOFF_MAX_S = 5e-4
PR_SET_TIMERSLACK = 29  # prctl(2)


def _precise_sleeps() -> None:
    """Let this thread's sleeps end within 1 us of their time instead of Linux's default 50 us
    timer slack (best effort; elsewhere sleeps keep their platform's precision)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0)
        except (OSError, AttributeError):
            pass


class Incoming(NamedTuple):
    source: int  # the sender's rank
    message: Message


class WaitTimeout(TimeoutError):
    """No message came within the configured bound: the job is aborted, never left hanging."""


class RemoteError(RuntimeError):
    """Another rank reported a failure."""


class CoordinatorLost(TimeoutError):
    """A worker heard nothing from rank 0 (not even a heartbeat) for its bound: rank 0 is hung
    or gone, and nobody else can end the job."""


class Transport:
    def __init__(self, comm: MPI.Comm, timeout_s: float = 600.0, poll: str = "backoff",
                 poll_max_s: float = BACKOFF_MAX_S) -> None:
        """Collective over ``comm`` (it is duplicated; ``poll="auto"`` also gathers placement)."""
        self.comm = comm.Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.timeout_s = timeout_s
        self.poll_mode = poll_strategy(self.comm, poll)  # "spin" or "backoff"
        self.poll_max_s = poll_max_s
        self._spin = self.poll_mode == "spin"
        if not self._spin:
            _precise_sleeps()
        self._status = MPI.Status()  # reused by every probe: no allocation per poll
        self._sends: list[tuple[MPI.Request, np.ndarray | bytes]] = []
        self.closed = False
        # Liveness (see the module docstring): the coordinator's heartbeats ...
        self._beat_to: tuple[int, ...] = ()
        self._beat_every = 0.0
        self._beat_due = float("inf")
        # ... when each rank was last heard from, and a worker's watch on rank 0.
        self._heard = [time.monotonic()] * self.size
        self._watched = -1  # the rank whose silence ends the job (0), or -1
        self._watch_s = float("inf")

    # ------------------------------------------------------------------ sending

    def send(self, dest: int, msg: Message) -> None:
        """Nonblocking send of one message (and its distributions, which follow as PROBS)."""
        payload = encode(msg)
        if isinstance(payload, bytes):
            self._isend(payload, MPI.BYTE, dest, msg.TAG)
        else:
            self._isend(payload, MPI.INT64_T, dest, msg.TAG)
        probs = probs_of(msg)
        if probs is not None:
            self._isend(np.ascontiguousarray(probs, dtype=np.float64), MPI.DOUBLE, dest, Tag.PROBS)
        self.progress()

    def send_error(self, dest: int, text: str) -> None:
        self.send(dest, Error(text))

    def _isend(self, buf: np.ndarray | bytes, datatype: MPI.Datatype, dest: int, tag: int) -> None:
        request = self.comm.Isend([buf, datatype], dest=dest, tag=int(tag))
        self._sends.append((request, buf))  # the buffer must live until the send completes

    def progress(self) -> None:
        """Forget the sends that have completed."""
        if self._sends:
            self._sends = [(r, b) for r, b in self._sends if not r.Test()]

    @property
    def pending(self) -> int:
        self.progress()
        return len(self._sends)

    # ------------------------------------------------------------------ receiving

    def poll(self, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG) -> Incoming | None:
        """The next matching message, or None if none has arrived.

        Probes up to ``PROBES`` times: MPICH's ``Iprobe`` looks for a match before it makes
        progress, so a message that arrived while this rank was busy or asleep is found by a
        later probe only (the 2nd to the 5th, measured with 2 to 17 ranks)."""
        exits.take_stop()  # a signal asked this rank to stop: raise Stopped here
        status, probe = self._status, self.comm.Iprobe
        while True:
            for _ in range(PROBES):
                if probe(source, tag, status):
                    break
            else:
                return None
            src, kind = status.Get_source(), status.Get_tag()
            self._heard[src] = time.monotonic()
            if kind != Tag.HEARTBEAT:
                break
            beat = np.empty(status.Get_count(MPI.INT64_T), dtype=np.int64)
            self.comm.Recv([beat, MPI.INT64_T], source=src, tag=kind)
        if kind == Tag.ERROR:
            payload: np.ndarray | bytearray = bytearray(status.Get_count(MPI.BYTE))
            self.comm.Recv([payload, MPI.BYTE], source=src, tag=kind)
        else:
            payload = np.empty(status.Get_count(MPI.INT64_T), dtype=np.int64)
            self.comm.Recv([payload, MPI.INT64_T], source=src, tag=kind)
        msg, rows = decode(kind, payload)
        if rows:
            msg = with_probs(msg, self._recv_probs(src, rows))
        return Incoming(src, msg)

    def pending_any(self, source: int, tags: Sequence[int]) -> bool:
        """Whether a message with one of ``tags`` has arrived from ``source`` (not received).
        One probe per tag: a caller that checks often (between decoder layers) sees a message a
        check late at worst."""
        if exits.stop_pending():
            return True  # abandon the forward: the next poll raises Stopped
        iprobe = self.comm.Iprobe
        return any(iprobe(source=source, tag=int(tag)) for tag in tags)

    def _recv_probs(self, source: int, rows: int) -> np.ndarray:
        """The PROBS message that the sender sent right after the header just received."""
        status = MPI.Status()
        deadline = time.monotonic() + self.timeout_s
        while not self.comm.Iprobe(source=source, tag=Tag.PROBS, status=status):
            if time.monotonic() > deadline:
                raise WaitTimeout(f"rank {self.rank}: distributions from rank {source} never came")
            time.sleep(1e-5)
        count = status.Get_count(MPI.DOUBLE)
        probs = np.empty(count, dtype=np.float64)
        self.comm.Recv([probs, MPI.DOUBLE], source=source, tag=Tag.PROBS)
        return probs.reshape(rows, count // rows)  # [rows, vocab]

    def wait(self, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG, what: str = "a message",
             timeout_s: float | None = None) -> Incoming:
        """Probe (spinning, or with backoff) until a message comes or the deadline passes.

        Workers idle between requests wait with ``timeout_s=IDLE``: a long phase that does not
        use them (another mode, fewer servers) must not abort the job. The coordinator's waits
        are always bounded, and a failing coordinator aborts the job (CLI) or sends SHUTDOWN
        (library use), so an idle worker is never left waiting on a dead run.
        """
        msg = self.poll(source, tag)
        limit = self.timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        deadline = start + limit
        spin, longest = self._spin, self.poll_max_s
        if start >= self._beat_due:
            self._beat(start)
        while msg is None:
            if self._sends:
                self.progress()
            now = time.monotonic()
            if now > deadline:
                raise WaitTimeout(
                    f"rank {self.rank} waited {limit:.0f} s for {what}; aborting "
                    "(raise --timeout if forwards are this slow)"
                )
            if now >= self._beat_due:
                self._beat(now)
            if now - self._heard[self._watched] > self._watch_s:
                self._check_watched(now)
            if not spin:
                time.sleep(min(max(BACKOFF_FRACTION * (now - start), BACKOFF_MIN_S), longest))
            msg = self.poll(source, tag)
        if isinstance(msg.message, Error):
            raise RemoteError(msg.message.text)
        if isinstance(msg.message, Signalled):
            raise Stopped(msg.message.signum, rank=msg.source)
        return msg

    # ------------------------------------------------------------------ liveness

    def start_heartbeats(self, ranks: Sequence[int], every_s: float) -> None:
        """From now on, send a HEARTBEAT to ``ranks`` every ``every_s`` seconds (from waits)."""
        self._beat_to, self._beat_every = tuple(ranks), every_s
        self._beat(time.monotonic())

    def stop_heartbeats(self) -> None:
        """Before the last message to a peer (Shutdown, Bye): nothing may follow it."""
        self._beat_to, self._beat_due = (), float("inf")

    def _beat(self, now: float) -> None:
        for rank in self._beat_to:
            self.send(rank, Heartbeat())
        self._beat_due = now + self._beat_every if self._beat_to else float("inf")

    def keep_alive(self) -> None:
        """For a rank that waits on another communicator (a follower waiting for its leader,
        ``servergroup.py``): the heartbeats due, and the watch on rank 0, as a wait does them."""
        now = time.monotonic()
        if now >= self._beat_due:
            self._beat(now)
        if now - self._heard[self._watched] > self._watch_s:
            self._check_watched(now)
        self.progress()

    def heard(self, rank: int) -> float:
        """When a message (a heartbeat included) from ``rank`` last arrived (monotonic clock)."""
        return self._heard[rank]

    def watch(self, rank: int, silence_s: float) -> None:
        """Worker: raise CoordinatorLost from a wait once ``rank`` has been silent this long."""
        self._watched, self._watch_s = rank, silence_s
        self._heard[rank] = time.monotonic()

    def _drain_heartbeats(self) -> int:
        """Receive the heartbeats queued from the watched rank; how many there were."""
        if self._watched < 0:
            return 0
        status, count = MPI.Status(), 0
        while self.comm.Iprobe(source=self._watched, tag=Tag.HEARTBEAT, status=status):
            self.comm.Recv([np.empty(status.Get_count(MPI.INT64_T), dtype=np.int64), MPI.INT64_T],
                           source=self._watched, tag=Tag.HEARTBEAT)
            count += 1
        return count

    def unwatch(self) -> None:
        self._watched, self._watch_s = -1, float("inf")

    def _check_watched(self, now: float) -> None:
        """The watched rank seems silent: receive the heartbeats a wait for one tag left
        queued, and raise if there were none."""
        if self._drain_heartbeats():
            self._heard[self._watched] = now
        silent = now - self._heard[self._watched]
        if silent > self._watch_s:
            raise CoordinatorLost(f"the coordinator (rank {self._watched}) has sent nothing, not "
                                  f"even a heartbeat, for {silent:.0f} s: it is hung or gone")

    # ------------------------------------------------------------------ collective helpers

    def barrier(self, what: str = "the other ranks") -> None:
        """A barrier with a deadline (a plain Barrier would wait forever on a dead rank), that
        also raises the ERROR a failing rank sends (say, a model that does not load)."""
        request = self.comm.Ibarrier()
        deadline = time.monotonic() + self.timeout_s
        delay = 0.0
        while not request.Test():
            exits.take_stop()
            for kind in (Tag.ERROR, Tag.SIGNALLED):
                if self.comm.Iprobe(tag=kind):
                    self.wait(tag=kind, what="a failure report")  # raises it
            if time.monotonic() > deadline:
                raise WaitTimeout(f"rank {self.rank} waited {self.timeout_s:.0f} s for {what}")
            delay = min(max(delay * 2, 1e-5), 0.01)
            time.sleep(delay)

    def clock_offset(self, rounds: int = 20) -> tuple[float, float]:
        """This rank's ``time.perf_counter`` against rank 0's, by ping-pong (collective): the
        offset to add to a local time to get rank 0's, and its uncertainty, half the shortest of
        ``rounds`` round trips (Cristian's method). Rank 0 gets (0, 0). Ranks wait for their
        turn asleep, so the ones being measured have the cores."""
        buf = np.zeros(1, dtype=np.float64)
        if self.rank == 0:
            for peer in range(1, self.size):
                best, offset = float("inf"), 0.0
                for _ in range(rounds):
                    sent = time.perf_counter()
                    self.comm.Send([buf, MPI.DOUBLE], dest=peer, tag=Tag.CLOCK)
                    self.comm.Recv([buf, MPI.DOUBLE], source=peer, tag=Tag.CLOCK)
                    back = time.perf_counter()
                    if back - sent < best:
                        best, offset = back - sent, (sent + back) / 2 - float(buf[0])
                self.comm.Send([np.array([offset, best / 2]), MPI.DOUBLE], dest=peer, tag=Tag.CLOCK)
            return 0.0, 0.0
        deadline = time.monotonic() + self.timeout_s
        while not self.comm.Iprobe(source=0, tag=Tag.CLOCK):
            if time.monotonic() > deadline:
                raise WaitTimeout(f"rank {self.rank} waited {self.timeout_s:.0f} s "
                                  "for the clock alignment")
            time.sleep(1e-4)
        for _ in range(rounds):
            self.comm.Recv([buf, MPI.DOUBLE], source=0, tag=Tag.CLOCK)
            buf[0] = time.perf_counter()
            self.comm.Send([buf, MPI.DOUBLE], dest=0, tag=Tag.CLOCK)
        result = np.zeros(2, dtype=np.float64)
        self.comm.Recv([result, MPI.DOUBLE], source=0, tag=Tag.CLOCK)
        return float(result[0]), float(result[1])

    def gather(self, obj: object) -> list | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere); pickled: for the end of a run, never
        on the message path. Call it after :meth:`barrier`, so every rank is known to be here."""
        return self.comm.gather(obj, root=0)

    # ------------------------------------------------------------------ shutdown

    def flush(self, timeout_s: float = 10.0) -> int:
        """Wait (bounded) for outstanding sends; returns how many are still open."""
        deadline = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < deadline:
            time.sleep(1e-4)
        return self.pending

    def close(self, timeout_s: float = 10.0) -> int:
        """Complete every request (bounded), free the communicator; returns requests left open.

        Sends still open are never cancelled (MPICH crashes cancelling a send to a rank that
        is hung or gone); their buffers stay referenced, and the caller, seeing them, aborts
        the job rather than finalizing MPI."""
        if self.closed:
            return 0
        self.stop_heartbeats()
        left = self.flush(timeout_s)
        self._drain_heartbeats()  # those a wait for one tag left queued
        if not left:
            self.comm.Free()
        self.closed = True
        return left
