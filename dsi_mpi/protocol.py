"""The messages between ranks: one frozen dataclass per kind, and their wire encoding.

Every message travels as one int64 block ``[tag, fields..., tokens...]``: the kind's tag (also
the MPI tag, so a target server can probe for CANCEL alone), the message's integer fields in
declaration order, then its token tuple if it has one. A message with a ``probs`` field (a
result or a draft under rejection sampling) adds a row count to its header and sends the
distributions, float64 ``[rows, vocab]``, right after as a second message tagged PROBS; MPI's
non-overtaking rule pairs the two. ERROR carries UTF-8 text. The layout is derived from the
dataclass fields, so this module alone knows it; no pickle.

Coordinator -> target:   Verify, Cancel, Shutdown, Heartbeat
Target -> coordinator:   Ready, Result [+ PROBS], Cancelled, Error, Signalled, Bye
Coordinator -> drafter:  Start, Rollback, Advance, Stop, Shutdown, Heartbeat
Drafter -> coordinator:  Ready, Draft [+ PROBS], Error, Signalled, Bye

A Result or Cancelled says how long its forward took (``forward_us``): the coordinator learns
each server's busy time. Heartbeat is the transport's own (``transport.py`` sends and swallows
it): while a run is active a worker hears from rank 0 at least this often, or ends the job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar

import numpy as np


class ProtocolError(RuntimeError):
    """A message that cannot happen under the protocol: a bug, never bad input."""


class Tag(IntEnum):
    VERIFY = 1
    RESULT = 2
    CANCEL = 3
    CANCELLED = 4
    START = 5
    ROLLBACK = 6
    ADVANCE = 7
    STOP = 8
    DRAFT = 9
    SHUTDOWN = 10
    BYE = 11
    ERROR = 12  # payload: UTF-8 text as bytes (not int64)
    PROBS = 13  # payload: float64 [rows, vocab], follows a Result or Draft that has probs
    HEARTBEAT = 14
    SIGNALLED = 15
    READY = 16
    CLOCK = 17  # not a message: the clock alignment of a traced run (clocks.py)


# ----------------------------------------------------------------- coordinator -> target


@dataclass(frozen=True, slots=True)
class Verify:
    """Keep ``keep`` cached positions, append ``tokens``, return the target's token (and
    distribution, if asked) for every position from ``first_position`` to the end."""

    TAG: ClassVar[Tag] = Tag.VERIFY
    epoch: int
    task_id: int
    keep: int  # cached positions the server keeps
    first_position: int  # first position whose target token comes back
    tokens: tuple[int, ...]  # context[keep:]
    want_probs: bool = False
    seed: int = 0  # the prompt's sampling seed

    @property
    def num_outputs(self) -> int:
        """Positions first_position .. keep + len(tokens): one per appended token from there."""
        return self.keep + len(self.tokens) - self.first_position + 1


@dataclass(frozen=True, slots=True)
class Cancel:
    """Abandon the task, if it still runs; either way its one reply still comes."""

    TAG: ClassVar[Tag] = Tag.CANCEL
    epoch: int
    task_id: int


# ----------------------------------------------------------------- target -> coordinator


@dataclass(frozen=True, slots=True)
class Result:
    TAG: ClassVar[Tag] = Tag.RESULT
    epoch: int
    task_id: int
    first_position: int
    tokens: tuple[int, ...]  # the target's token for first_position, first_position + 1, ...
    probs: np.ndarray | None = field(default=None, compare=False)  # [len(tokens), vocab] p
    forward_us: int = 0  # how long the server's forward took (its busy time, for the record)


@dataclass(frozen=True, slots=True)
class Cancelled:
    """The task was abandoned: the server's cache holds the task's first ``keep`` positions."""

    TAG: ClassVar[Tag] = Tag.CANCELLED
    epoch: int
    task_id: int
    forward_us: int = 0  # how long the abandoned forward ran


# ----------------------------------------------------------------- coordinator -> drafter


@dataclass(frozen=True, slots=True)
class Start:
    """A new prompt: draft positions ``< limit`` and ``<= max_position``."""

    TAG: ClassVar[Tag] = Tag.START
    epoch: int
    limit: int
    max_position: int
    want_probs: bool  # send q with each draft (rejection sampling)
    seed: int  # the prompt's sampling seed
    reset_cache: bool  # start from an empty KV cache (else reuse a shared prefix)
    prompt: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Rollback:
    """A draft was wrong: keep the first ``keep`` tokens, then append the target's ``forced``."""

    TAG: ClassVar[Tag] = Tag.ROLLBACK
    epoch: int
    keep: int
    limit: int
    forced: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Advance:
    """More is committed: draft up to ``limit``; ``tokens`` were committed from ``start`` on
    where the coordinator held no draft (skip them if not drafted yet)."""

    TAG: ClassVar[Tag] = Tag.ADVANCE
    epoch: int
    limit: int
    start: int = 0
    tokens: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Stop:
    """The prompt is done: draft nothing more until the next Start."""

    TAG: ClassVar[Tag] = Tag.STOP
    epoch: int


# ----------------------------------------------------------------- drafter -> coordinator


@dataclass(frozen=True, slots=True)
class Draft:
    TAG: ClassVar[Tag] = Tag.DRAFT
    epoch: int
    position: int
    token: int
    probs: np.ndarray | None = field(default=None, compare=False)  # [1, vocab] q


# ----------------------------------------------------------------- any direction


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The job is over: answer Bye and return."""

    TAG: ClassVar[Tag] = Tag.SHUTDOWN


@dataclass(frozen=True, slots=True)
class Ready:
    """A worker has loaded its model and serves (the first prompt waits for every worker)."""

    TAG: ClassVar[Tag] = Tag.READY


@dataclass(frozen=True, slots=True)
class Bye:
    TAG: ClassVar[Tag] = Tag.BYE


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The coordinator is alive (sent to a worker that has had no other message for a while)."""

    TAG: ClassVar[Tag] = Tag.HEARTBEAT


@dataclass(frozen=True, slots=True)
class Error:
    """A worker failed; the text is its message (the one case that is not an int64 block)."""

    TAG: ClassVar[Tag] = Tag.ERROR
    text: str


@dataclass(frozen=True, slots=True)
class Signalled:
    """A worker got SIGTERM or SIGINT: the coordinator ends the job (Shutdown to every rank)."""

    TAG: ClassVar[Tag] = Tag.SIGNALLED
    signum: int


# Messages that make a drafter's forward in flight stale: it abandons the forward for them.
PREEMPTS_DRAFT = (Tag.START, Tag.ROLLBACK, Tag.STOP, Tag.SHUTDOWN)

Message = (Verify | Cancel | Result | Cancelled | Start | Rollback | Advance | Stop | Draft
           | Shutdown | Ready | Bye | Heartbeat | Error | Signalled)
DrafterMessage = Start | Rollback | Advance | Stop


# ----------------------------------------------------------------- encoding


@dataclass(frozen=True)
class _Layout:
    cls: type
    ints: tuple[str, ...]  # header fields, in order
    bools: frozenset[str]  # those of them that are flags
    tokens: str | None  # the tuple field, if any
    probs: bool  # a probs field: the header ends with its row count

    @property
    def header(self) -> int:
        return 1 + len(self.ints) + int(self.probs)


def _layout(cls: type) -> _Layout:
    ints, bools, tokens, probs = [], set(), None, False
    for f in dataclasses.fields(cls):
        if f.name == "probs":
            probs = True
        elif f.type.startswith("tuple"):
            tokens = f.name
        else:
            ints.append(f.name)
            if f.type == "bool":
                bools.add(f.name)
    return _Layout(cls, tuple(ints), frozenset(bools), tokens, probs)


_LAYOUTS = {cls.TAG: _layout(cls) for cls in (Verify, Cancel, Result, Cancelled, Start, Rollback,
                                              Advance, Stop, Draft, Shutdown, Ready, Bye, Heartbeat,
                                              Signalled)}


def encode(msg: Message) -> np.ndarray:
    """The first (or only) payload of a message: its int64 block (or, for Error, its UTF-8
    text as uint8)."""
    if isinstance(msg, Error):
        return np.array(bytearray(msg.text.encode("utf-8")[:65536]), dtype=np.uint8)
    layout = _LAYOUTS[msg.TAG]
    tokens = getattr(msg, layout.tokens) if layout.tokens else ()
    block = np.empty(layout.header + len(tokens), dtype=np.int64)
    head = [int(msg.TAG)] + [int(getattr(msg, name)) for name in layout.ints]
    if layout.probs:
        probs = probs_of(msg)
        head.append(0 if probs is None else len(probs))
    block[: layout.header] = head
    block[layout.header:] = tokens
    return block


def probs_of(msg: Message) -> np.ndarray | None:
    """The distributions that follow a message as PROBS (a Result's p, a Draft's q), or None."""
    return getattr(msg, "probs", None)


def payload_buffer(tag: int, nbytes: int) -> np.ndarray:
    """An empty buffer for a received payload of ``nbytes`` bytes with ``tag``: uint8 for
    Error's text, float64 for PROBS, int64 for every other message."""
    dtype = np.uint8 if tag == Tag.ERROR else np.float64 if tag == Tag.PROBS else np.int64
    return np.empty(nbytes // np.dtype(dtype).itemsize, dtype=dtype)


def decode(tag: int, payload: np.ndarray) -> tuple[Message, int]:
    """A received message, and how many rows of distributions (PROBS) follow it (0: none)."""
    if tag == Tag.ERROR:
        return Error(payload.tobytes().decode("utf-8", "replace")), 0
    layout = _LAYOUTS[Tag(tag)]
    head = payload[: layout.header].tolist()
    kwargs = dict(zip(layout.ints, head[1: 1 + len(layout.ints)], strict=True))
    for name in layout.bools:
        kwargs[name] = bool(kwargs[name])
    if layout.tokens:
        kwargs[layout.tokens] = tuple(payload[layout.header:].tolist())
    rows = head[-1] if layout.probs else 0
    return layout.cls(**kwargs), rows


def with_probs(msg: Result | Draft, probs: np.ndarray) -> Result | Draft:
    """The message with the distributions that followed it."""
    return dataclasses.replace(msg, probs=probs)
