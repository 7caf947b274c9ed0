"""What a drafter and a target server do with each message, written once (pure: no MPI).

The MPI role loops (drafter.py, target.py), the simulator and the randomised policy tests all
drive these two classes, so the four model each worker the same way; only how messages and
time pass differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from dsi_mpi.backends.base import Backend, Cancelled, ContextRunner
from dsi_mpi.protocol import (
    Advance,
    Draft,
    Message,
    ProtocolError,
    Result,
    Rollback,
    Start,
    Stop,
    Verify,
)
from dsi_mpi.protocol import Cancelled as CancelledMsg
from dsi_mpi.verify import SamplingParams

GREEDY = SamplingParams()


def _seeded(params: SamplingParams, seed: int) -> SamplingParams:
    """The sampling parameters with a prompt's seed (the same object when it already has it)."""
    return params if params.seed == seed else replace(params, seed=seed)


class DrafterWorker:
    """The drafter's side of the protocol: what it holds and whether it may draft.

    It drafts position ``p = len(seq)`` only while ``p < limit``, ``p <= max_position`` and it
    has not drafted an end-of-sequence token (the target's EOS ids: the drafter stops where the
    target would end, not where its own tokenizer would).
    """

    def __init__(self, backend: Backend, params: SamplingParams = GREEDY,
                 eos_ids: frozenset[int] = frozenset()) -> None:
        self.runner = ContextRunner(backend)
        self.params = params
        self._params = params  # with the prompt's seed
        self.eos_ids = eos_ids
        self.seq: list[int] = []  # prompt + drafts, as the drafter believes them
        self.epoch = 0
        self.limit = 0
        self.max_position = -1
        self.want_probs = False
        self.seed = 0
        self.reset_cache = False  # the next forward starts from an empty cache
        self.active = False
        self.eos = False
        self.diverged = False  # a committed token differs from our draft: a rollback is coming

    def apply(self, msg: Message) -> None:
        """A message from the coordinator (applied between forwards)."""
        if isinstance(msg, Start):
            self.seq = list(msg.prompt)
            self.limit, self.max_position, self.seed = msg.limit, msg.max_position, msg.seed
            self._params = _seeded(self.params, msg.seed)
            self.want_probs, self.reset_cache = msg.want_probs, msg.reset_cache
            self.active, self.eos, self.diverged = True, False, False
        elif isinstance(msg, Rollback):
            if len(self.seq) < msg.keep:
                raise ProtocolError(f"rollback to {msg.keep} "
                                    f"but the drafter holds {len(self.seq)} tokens")
            self.seq = self.seq[: msg.keep] + list(msg.forced)
            self.limit, self.eos, self.diverged = msg.limit, False, False
        elif isinstance(msg, Advance):
            self.limit = max(self.limit, msg.limit)
            self._learn(msg.start, msg.tokens)
        elif isinstance(msg, Stop):
            self.active = False
        else:
            raise ProtocolError(f"drafter got unexpected {type(msg).__name__}")
        self.epoch = msg.epoch

    def _learn(self, start: int, tokens: Sequence[int]) -> None:
        """Committed target tokens for positions ``start ..``: skip drafting the ones not yet
        drafted, if the drafts we hold agree with the rest. If one disagrees, our later drafts
        build on a wrong token; the coordinator sees that draft and rolls us back, and until
        then nothing more is appended."""
        if not tokens or self.diverged:
            return
        if len(self.seq) < start:
            raise ProtocolError(f"committed tokens from position {start}, "
                                f"but the drafter holds {len(self.seq)}")
        overlap = min(len(self.seq) - start, len(tokens))
        if self.seq[start: start + overlap] != list(tokens[:overlap]):
            self.diverged = True
            return
        if overlap < len(tokens):
            self.seq.extend(int(t) for t in tokens[overlap:])
            self.eos = False  # the last token is a committed one, never EOS (that ends the prompt)

    def can_draft(self) -> bool:
        n = len(self.seq)
        return self.active and not self.eos and n < self.limit and n <= self.max_position

    @property
    def cold(self) -> bool:
        """The next forward fills an empty cache (a prefill: TTFT, not TPOT)."""
        return self.reset_cache or not self.runner.tokens

    def pending(self) -> int:
        """Tokens the next forward feeds: those of ``seq`` past the longest cached prefix that
        agrees with it (at least the last one, whose logits give the draft)."""
        return len(self.seq) - self.runner.reusable(self.seq)

    def step(self, should_cancel: Callable[[], bool] | None = None) -> Draft | None:
        """One forward: the next draft (and its distribution q, under rejection sampling), or
        None when ``should_cancel`` abandoned it (a Rollback, Start or Stop came: the draft
        would be stale; the cache is as before the forward)."""
        if self.reset_cache:
            self.runner.reset()
            self.reset_cache = False
        try:
            out = self.runner.run(self.seq, self._params, want_probs=self.want_probs,
                                  should_cancel=should_cancel)
        except Cancelled:
            return None
        token = int(out.tokens[0])
        self.seq.append(token)
        self.eos = token in self.eos_ids
        return Draft(self.epoch, len(self.seq) - 1, token, out.probs)


class TargetWorker:
    """A target server: verifies a task on its own KV cache, or abandons it when cancelled
    (the cache then holds the task's first ``keep`` positions, as the coordinator assumes)."""

    def __init__(self, backend: Backend, params: SamplingParams = GREEDY) -> None:
        self.runner = ContextRunner(backend)
        self.params = params

    def verify(self, msg: Verify,
               should_cancel: Callable[[], bool] | None = None) -> Result | CancelledMsg:
        if len(self.runner.tokens) < msg.keep:
            raise ProtocolError(f"task {msg.task_id}: keep {msg.keep} "
                                f"but the cache holds {len(self.runner.tokens)}")
        try:
            out = self.runner.extend(msg.keep, msg.tokens, _seeded(self.params, msg.seed),
                                     num_outputs=msg.num_outputs, want_probs=msg.want_probs,
                                     should_cancel=should_cancel)
        except Cancelled:
            return CancelledMsg(msg.epoch, msg.task_id)
        return Result(msg.epoch, msg.task_id, out.first_position, tuple(out.tokens.tolist()),
                      out.probs)
