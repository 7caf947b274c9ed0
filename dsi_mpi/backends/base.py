"""The one small interface every model backend implements.

A backend owns one model and its KV cache for a single sequence. The cache holds the tokens
of positions ``0 .. cached_length() - 1``; ``forward`` appends tokens and returns the model's
choice for the position after each appended token, so appending position ``L`` yields the
token for position ``L + 1``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dsi_mpi.sequences import common_prefix
from dsi_mpi.verify import SamplingParams


class Cancelled(Exception):
    """A forward was abandoned because ``should_cancel`` said so; the cache is as before it."""


@dataclass
class StepOutput:
    """What one forward returns for its last ``len(tokens)`` positions."""

    first_position: int  # absolute position of tokens[0]
    tokens: np.ndarray  # [n] int64, the model's selected token per position
    probs: np.ndarray | None = None  # [n, vocab] float64 sampling distributions, when asked for


class Backend(ABC):
    """One model instance with a croppable KV cache."""

    vocab_size: int
    eos_token_ids: frozenset[int]
    max_positions: int | None  # the model's context length, when it has one

    @abstractmethod
    def cached_length(self) -> int:
        """Number of positions in the KV cache."""

    @abstractmethod
    def crop(self, length: int) -> None:
        """Keep the first ``length`` cached positions (rollback); no-op if already shorter."""

    @abstractmethod
    def forward(
        self,
        tokens: Sequence[int],
        params: SamplingParams,
        num_outputs: int | None = None,
        want_probs: bool = False,
        should_cancel: Callable[[], bool] | None = None,
    ) -> StepOutput:
        """Append ``tokens`` to the cache and select a token for each of the last ``num_outputs``
        next positions (all of them when None).

        ``should_cancel`` is polled during the forward; when it returns True the forward stops,
        the cache is restored to its previous length and :class:`Cancelled` is raised.
        """

    def reset(self) -> None:
        """Forget the cached sequence (start of a new prompt)."""
        self.crop(0)


class ContextRunner:
    """A backend plus the tokens its cache holds: runs a context reusing the cached prefix.

    ``run(context)`` keeps the longest cached prefix that agrees with ``context`` (at most
    ``len(context) - 1`` positions, since the last position must be fed to get its logits),
    crops the rest and feeds only the missing tokens; ``extend(keep, tokens)`` does what a
    coordinator that tracks the cache asks for.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.tokens: list[int] = []

    def reset(self) -> None:
        self.backend.reset()
        self.tokens = []

    def crop(self, length: int) -> None:
        """Keep the first ``length`` cached positions."""
        self.backend.crop(length)
        del self.tokens[length:]

    def extend(
        self,
        keep: int,
        tokens: Sequence[int],
        params: SamplingParams,
        num_outputs: int = 1,
        want_probs: bool = False,
        should_cancel: Callable[[], bool] | None = None,
    ) -> StepOutput:
        """Keep the first ``keep`` cached positions, append ``tokens``, and return the outputs
        for the last ``num_outputs`` positions. If the forward is cancelled, the cache holds
        the kept prefix (what a coordinator that tracks this cache then assumes)."""
        if len(self.tokens) < keep:
            raise ValueError(f"asked to keep {keep} positions, "
                             f"but the cache holds {len(self.tokens)}")
        self.crop(keep)
        out = self.backend.forward(tokens, params, num_outputs=num_outputs, want_probs=want_probs,
                                   should_cancel=should_cancel)
        self.tokens.extend(int(t) for t in tokens)
        return out

    def reusable(self, context: Sequence[int], num_outputs: int = 1) -> int:
        """Cached positions :meth:`run` keeps for ``context``: the longest cached prefix that
        agrees with it, short of the positions whose outputs are wanted."""
        return min(common_prefix(self.tokens, context), len(context) - 1,
                   len(context) - num_outputs)

    def run(
        self,
        context: Sequence[int],
        params: SamplingParams,
        num_outputs: int = 1,
        want_probs: bool = False,
        should_cancel: Callable[[], bool] | None = None,
    ) -> StepOutput:
        """Outputs for the last ``num_outputs`` positions up to ``len(context)``, reusing the
        longest cached prefix that agrees with ``context``."""
        keep = self.reusable(context, num_outputs)
        return self.extend(keep, context[keep:], params, num_outputs, want_probs, should_cancel)
