"""Liveness, in one place (pure: no MPI): heartbeats, who was heard when, and bounded waits.

The transport (``transport.py``) sends and receives; a :class:`Liveness` decides when a
HEARTBEAT is due, remembers when each rank was last heard from, and says when a watched rank
(a worker's watch on rank 0) or the silent-longest worker (the coordinator's check) has been
silent too long. :func:`wait_until` is the one loop every wait of a rank runs: a bound on the
time, and a sleep between polls that grows with the time waited (docs/design.md,
"Liveness and bounded waits").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

BACKOFF_MIN_S = 1e-5  # shortest sleep of a backoff wait
BACKOFF_FRACTION = 0.25  # each sleep: this fraction of the time waited so far ...
# ... but at most this long (the default; a message is seen this late at worst)
BACKOFF_MAX_S = 5e-4
NEVER = float("inf")


class WaitTimeout(TimeoutError):
    """No message came within the configured bound: the job is aborted, never left hanging."""


def wait_until(ready: Callable[[], T | None], timeout_s: float,
               expired: Callable[[float], BaseException], *, spin: bool = False,
               max_sleep_s: float = BACKOFF_MAX_S,
               between: Callable[[float], None] | None = None) -> T:
    """Call ``ready`` until it returns something other than None, and return that. Between
    calls: ``between(now)``, then (unless ``spin``) a sleep of ``BACKOFF_FRACTION`` of the time
    waited so far, from ``BACKOFF_MIN_S`` up to ``max_sleep_s``. Once ``timeout_s`` has passed
    (``inf``: never), raise ``expired(seconds waited)``."""
    result = ready()
    if result is not None:
        return result
    start = time.monotonic()
    deadline = start + timeout_s
    while True:
        now = time.monotonic()
        if now > deadline:
            raise expired(now - start)
        if between is not None:
            between(now)
        if not spin:
            time.sleep(min(max(BACKOFF_FRACTION * (now - start), BACKOFF_MIN_S), max_sleep_s))
        result = ready()
        if result is not None:
            return result


class Liveness:
    """One rank's heartbeats to its peers, and when it last heard from each rank."""

    def __init__(self, size: int, now: float) -> None:
        self._heard = [now] * size
        self._beat_to: tuple[int, ...] = ()
        self._beat_every = 0.0
        self._beat_due = NEVER
        self.watched = -1  # the rank whose silence ends the job (a worker's rank 0), or -1
        self._watch_s = NEVER

    # ----------------------------------------------------------------- heartbeats

    def start_heartbeats(self, ranks: Sequence[int], every_s: float) -> None:
        """A HEARTBEAT to ``ranks`` every ``every_s`` seconds from now on (the first at once)."""
        self._beat_to, self._beat_every, self._beat_due = tuple(ranks), every_s, -NEVER

    def stop_heartbeats(self) -> None:
        """No more heartbeats (before the last message to a peer: nothing may follow it)."""
        self._beat_to, self._beat_due = (), NEVER

    def beats_due(self, now: float) -> tuple[int, ...]:
        """The ranks to send a HEARTBEAT to now (none unless one is due); the next is then due
        ``every_s`` later."""
        if now < self._beat_due:
            return ()
        self._beat_due = now + self._beat_every if self._beat_to else NEVER
        return self._beat_to

    # ----------------------------------------------------------------- who was heard when

    def heard_from(self, rank: int, now: float) -> None:
        self._heard[rank] = now

    def heard(self, rank: int) -> float:
        """When a message (a heartbeat included) from ``rank`` last arrived (monotonic clock)."""
        return self._heard[rank]

    def silent_longest(self, ranks: Sequence[int], now: float) -> tuple[float, int]:
        """(seconds, rank) of the rank among ``ranks`` silent the longest."""
        return max((now - self._heard[r], r) for r in ranks)

    def watch(self, rank: int, silence_s: float, now: float) -> None:
        """A silence of ``rank`` longer than ``silence_s`` from now on ends the job."""
        self.watched, self._watch_s = rank, silence_s
        self._heard[rank] = now

    def unwatch(self) -> None:
        self.watched, self._watch_s = -1, NEVER

    def watched_silent(self, now: float) -> float | None:
        """How long the watched rank has been silent, when longer than its bound; else None."""
        if self.watched < 0:
            return None
        silent = now - self._heard[self.watched]
        return silent if silent > self._watch_s else None
