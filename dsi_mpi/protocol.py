"""Message kinds and their encoding: every message is one int64 block, no pickle.

Layout of a block: ``[kind, epoch, ident, f0, f1, f2, f3, tokens...]``. The MPI tag is the kind,
so a receiver can probe for one kind (a target server probes for CANCEL between layers).
Distributions (rejection sampling) follow their header as a separate float64 message with
tag PROBS from the same sender; MPI's non-overtaking rule pairs them.

Coordinator -> target:   VERIFY(epoch, task, keep, first_position, want_probs, seed, tokens)
                         CANCEL(epoch, task)  SHUTDOWN
Target -> coordinator:   RESULT(epoch, task, first_position, has_probs, tokens) [PROBS]
                         CANCELLED(epoch, task)  ERROR  BYE
Coordinator -> drafter:  START(epoch, limit, max_position, flags, seed, prompt)
                         ROLLBACK(epoch, keep, limit, forced tokens)
                         ADVANCE(epoch, limit, start, committed tokens)
                         STOP(epoch)  SHUTDOWN
Drafter -> coordinator:  DRAFT(epoch, position, has_probs, [token]) [PROBS]  ERROR  BYE
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

HEADER = 7
START_WANT_PROBS = 1  # START flags (f2): send q with each draft
START_RESET_CACHE = 2  # ... and start from an empty KV cache


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
    PROBS = 13  # payload: float64 [n, vocab]


@dataclass
class Message:
    kind: Tag
    source: int
    epoch: int = 0
    ident: int = 0  # task id for task messages
    f0: int = 0
    f1: int = 0
    f2: int = 0
    f3: int = 0
    tokens: np.ndarray | None = None  # int64 [n]
    probs: np.ndarray | None = None  # float64 [n, vocab]
    text: str = ""  # ERROR only


def encode(kind: Tag, epoch: int = 0, ident: int = 0, f0: int = 0, f1: int = 0, f2: int = 0, f3: int = 0,
           tokens: Sequence[int] = ()) -> np.ndarray:
    block = np.empty(HEADER + len(tokens), dtype=np.int64)
    block[:HEADER] = (int(kind), epoch, ident, f0, f1, f2, f3)
    block[HEADER:] = tokens
    return block


_TAGS = {int(tag): tag for tag in Tag}


def decode(block: np.ndarray, source: int) -> Message:
    """The message in a received block (``tokens`` is a view of it: the block is not reused)."""
    kind, epoch, ident, f0, f1, f2, f3 = block[:HEADER].tolist()
    return Message(_TAGS[kind], source, epoch, ident, f0, f1, f2, f3, tokens=block[HEADER:])
