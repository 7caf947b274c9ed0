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
notes when each rank was last heard from (``self.liveness``, a :class:`~dsi_mpi.liveness.
Liveness`); :class:`Pulse` (``transport.pulse``) sends the heartbeats and receives the watched
rank's. A worker that watches rank 0 raises :class:`CoordinatorLost` from a wait once rank
0 has been silent for its bound; the coordinator names a silent worker itself
(``coordinator.py``). Every wait is a :func:`~dsi_mpi.liveness.wait_until`; how a message
becomes a buffer and back is ``protocol.py``'s.

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

from dsi_mpi import clocks, exits
from dsi_mpi.devices import poll_strategy
from dsi_mpi.exits import Stopped
from dsi_mpi.liveness import BACKOFF_MAX_S, Liveness, WaitTimeout, wait_until
from dsi_mpi.protocol import (
    Draft,
    Error,
    Heartbeat,
    Message,
    Result,
    Signalled,
    Tag,
    decode,
    encode,
    payload_buffer,
    probs_of,
    with_probs,
)

IDLE = float("inf")  # a worker waiting for its next request from the coordinator (see wait)
# An Iprobe that finds nothing may only have advanced MPI's progress engine: MPICH reports a
# message that arrived long ago at the 2nd to 5th call (measured with the pip MPICH, 2 to 17
# ranks). A busy rank that probes once between forwards (the drafter, a target checking for
# CANCEL) would see every message one forward late; so a poll probes up to this many times.
PROBES = 8
# MPI's name for each element type a buffer has (protocol.py's payloads, PROBS).
_DATATYPES = {np.dtype(np.int64): MPI.INT64_T, np.dtype(np.uint8): MPI.BYTE,
              np.dtype(np.float64): MPI.DOUBLE}
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
        self._sends: list[tuple[MPI.Request, np.ndarray]] = []
        self.closed = False
        self.liveness = Liveness(self.size, time.monotonic())
        self.pulse = Pulse(self)  # heartbeats sent and the watched rank's received

    # ------------------------------------------------------------------ sending

    def send(self, dest: int, msg: Message) -> None:
        """Nonblocking send of one message (and its distributions, which follow as PROBS)."""
        self._isend(encode(msg), dest, msg.TAG)
        probs = probs_of(msg)
        if probs is not None:
            self._isend(np.ascontiguousarray(probs, dtype=np.float64), dest, Tag.PROBS)
        self.progress()

    def send_error(self, dest: int, text: str) -> None:
        self.send(dest, Error(text))

    def _isend(self, buf: np.ndarray, dest: int, tag: int) -> None:
        request = self.comm.Isend([buf, _DATATYPES[buf.dtype]], dest=dest, tag=int(tag))
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
            self.liveness.heard_from(src, time.monotonic())
            payload = self._recv(status)
            if kind != Tag.HEARTBEAT:
                break
        msg, rows = decode(kind, payload)
        if rows:
            assert isinstance(msg, (Result, Draft))  # the messages that carry distributions
            msg = with_probs(msg, self._recv_probs(src, rows))
        return Incoming(src, msg)

    def _recv(self, status: MPI.Status) -> np.ndarray:
        """Receive the message ``status`` describes (probed, not received yet)."""
        source, tag = status.Get_source(), status.Get_tag()
        payload = payload_buffer(tag, status.Get_count(MPI.BYTE))
        self.comm.Recv([payload, _DATATYPES[payload.dtype]], source=source, tag=tag)
        return payload

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
        wait_until(lambda: self.comm.Iprobe(source=source, tag=Tag.PROBS, status=status) or None,
                   self.timeout_s, lambda _: WaitTimeout(
                       f"rank {self.rank}: distributions from rank {source} never came"))
        probs = self._recv(status)
        return probs.reshape(rows, len(probs) // rows)  # [rows, vocab]

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
        self.pulse.beat(time.monotonic())  # a rank that is never idle must beat too
        if msg is None:
            msg = wait_until(
                lambda: self.poll(source, tag), limit,
                lambda _: WaitTimeout(f"rank {self.rank} waited {limit:.0f} s for {what}; "
                                      "aborting (raise --timeout if forwards are this slow)"),
                spin=self._spin, max_sleep_s=self.poll_max_s, between=self._between_polls)
        if isinstance(msg.message, Error):
            raise RemoteError(msg.message.text)
        if isinstance(msg.message, Signalled):
            raise Stopped(msg.message.signum, rank=msg.source)
        return msg

    def _between_polls(self, now: float) -> None:
        """What a waiting rank does between polls: its sends, its heartbeats, its watch."""
        if self._sends:
            self.progress()
        self.pulse.tick(now)

    # ------------------------------------------------------------------ collective helpers

    def barrier(self, what: str = "the other ranks") -> None:
        """A barrier with a deadline (a plain Barrier would wait forever on a dead rank), that
        also raises the ERROR a failing rank sends (say, a model that does not load)."""
        request = self.comm.Ibarrier()

        def done() -> bool | None:
            if request.Test():
                return True
            exits.take_stop()
            for kind in (Tag.ERROR, Tag.SIGNALLED):
                if self.comm.Iprobe(tag=kind):
                    self.wait(tag=kind, what="a failure report")  # raises it
            return None

        wait_until(done, self.timeout_s, lambda _: WaitTimeout(
            f"rank {self.rank} waited {self.timeout_s:.0f} s for {what}"), max_sleep_s=0.01)

    def clock_offset(self, rounds: int = 20) -> tuple[float, float]:
        """This rank's clock against rank 0's (collective; :func:`dsi_mpi.clocks.offset`)."""
        return clocks.offset(self.comm, self.timeout_s, rounds)

    def gather(self, obj: object) -> list | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere); pickled: for the end of a run, never
        on the message path. Call it after :meth:`barrier`, so every rank is known to be here."""
        return self.comm.gather(obj, root=0)

    # ------------------------------------------------------------------ shutdown

    def flush(self, timeout_s: float = 10.0) -> int:
        """Wait (bounded) for outstanding sends; returns how many are still open."""
        try:
            wait_until(lambda: (not self.pending) or None, timeout_s,
                       lambda waited: WaitTimeout(f"{self.pending} sends open after {waited} s"),
                       max_sleep_s=1e-4)
        except WaitTimeout:
            pass
        return self.pending

    def close(self, timeout_s: float = 10.0) -> int:
        """Complete every request (bounded), free the communicator; returns requests left open.

        Sends still open are never cancelled (MPICH crashes cancelling a send to a rank that
        is hung or gone); their buffers stay referenced, and the caller, seeing them, aborts
        the job rather than finalizing MPI."""
        if self.closed:
            return 0
        self.pulse.stop()
        left = self.flush(timeout_s)
        self.pulse.drain()  # those a wait for one tag left queued
        if not left:
            self.comm.Free()
        self.closed = True
        return left


class Pulse:
    """A transport's liveness on the wire: the heartbeats it sends (from its waits) and those
    of the rank it watches, received even by a wait for another tag (the state, who was heard
    when, is the transport's :class:`~dsi_mpi.liveness.Liveness`)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.liveness = transport.liveness

    def start(self, ranks: Sequence[int], every_s: float) -> None:
        """From now on, send a HEARTBEAT to ``ranks`` every ``every_s`` seconds (from waits)."""
        self.liveness.start_heartbeats(ranks, every_s)
        self.beat(time.monotonic())

    def stop(self) -> None:
        """Before the last message to a peer (Shutdown, Bye): nothing may follow it."""
        self.liveness.stop_heartbeats()

    def beat(self, now: float) -> None:
        for rank in self.liveness.beats_due(now):
            self.transport.send(rank, Heartbeat())

    def watch(self, rank: int, silence_s: float) -> None:
        """Worker: raise CoordinatorLost from a wait once ``rank`` has been silent this long."""
        self.liveness.watch(rank, silence_s, time.monotonic())

    def unwatch(self) -> None:
        self.liveness.unwatch()

    def tick(self, now: float) -> None:
        """Between polls: the heartbeats due, and the watch."""
        self.beat(now)
        if self.liveness.watched_silent(now) is not None:
            self._check_watched(now)

    def keep_alive(self) -> None:
        """For a rank that waits on another communicator (a follower waiting for its leader,
        ``servergroup.py``): what a wait does between polls."""
        self.transport._between_polls(time.monotonic())
        self.transport.progress()

    def drain(self) -> int:
        """Receive the heartbeats queued from the watched rank; how many there were."""
        watched = self.liveness.watched
        if watched < 0:
            return 0
        comm, status, count = self.transport.comm, MPI.Status(), 0
        while comm.Iprobe(source=watched, tag=Tag.HEARTBEAT, status=status):
            self.transport._recv(status)
            count += 1
        return count

    def _check_watched(self, now: float) -> None:
        """The watched rank seems silent: receive the heartbeats a wait for one tag left
        queued, and raise if there were none."""
        if self.drain():
            self.liveness.heard_from(self.liveness.watched, now)
        silent = self.liveness.watched_silent(now)
        if silent is not None:
            raise CoordinatorLost(f"the coordinator (rank {self.liveness.watched}) has sent "
                                  f"nothing, not even a heartbeat, for {silent:.0f} s: it is "
                                  "hung or gone")
