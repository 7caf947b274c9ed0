"""The translating drafter: a drafter's model behind the target's vocabulary.

A :class:`TranslatingDrafter` is a :class:`Backend` whose positions and tokens are the
target's; the drafter's model, cache and tokenizer live inside it. How it drafts (SLEM, TLI)
and syncs is :mod:`dsi_mpi.translate`'s description; the vocabularies are
:mod:`dsi_mpi.vocabulary`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dsi_mpi.backends.base import Backend, StepOutput
from dsi_mpi.backends.clock import ForwardClock
from dsi_mpi.verify import SamplingParams, sample_from
from dsi_mpi.vocabulary import (
    Spelled,
    Vocabulary,
    incomplete_tail,
    last_word_start,
    shared_tokens,
)

MAX_DRAFTER_FORWARDS = 16  # drafter tokens per target draft, at most (a bound, not a tuning knob)


class TranslatingDrafter(Backend):
    """The drafter's model behind the target's vocabulary (:mod:`dsi_mpi.translate` describes
    the method).

    Its cache, as the :class:`Backend` interface sees it, holds target tokens
    (``self.context``); the drafter's own tokens (``self.own``, a :class:`DrafterSide`) are what
    its model's cache holds, plus at most one chosen token not yet fed. The drafter's text may
    run ahead of the target's context: that is the text not yet turned into drafts.

    ``drafter`` must offer ``forward_logits`` (the HF backend does). ``forward`` returns one
    target token (a draft) per call, with its distribution over the target's vocabulary when
    ``want_probs`` (TLI)."""

    def __init__(self, drafter: Backend, source: Vocabulary, target: Vocabulary,
                 target_eos: frozenset[int] = frozenset(),
                 max_forwards: int = MAX_DRAFTER_FORWARDS) -> None:
        self.drafter = drafter
        self.source, self.target = source, target
        self.vocab_size = target.size
        self.eos_token_ids = frozenset(target_eos) or target.eos_ids
        self.max_positions = drafter.max_positions
        self.max_forwards = max_forwards
        eos = getattr(target.tokenizer, "eos_token_id", None)
        self._eos = eos if eos in self.eos_token_ids else min(self.eos_token_ids, default=0)
        self._shared: tuple[np.ndarray, np.ndarray] | None = None  # TLI's map, made on first use
        self.context = Spelled(target)  # the target's side: the context the Backend holds
        self.own = DrafterSide(drafter, source)  # the drafter's side: its cache and tokens

    # ----------------------------------------------------------------- what profile reads

    @property
    def drafter_forwards(self) -> int:
        return self.own.clock.forwards

    @drafter_forwards.setter
    def drafter_forwards(self, value: int) -> None:
        self.own.clock.forwards = value

    @property
    def model_seconds(self) -> float:
        return self.own.clock.seconds

    @model_seconds.setter
    def model_seconds(self, value: float) -> None:
        self.own.clock.seconds = value

    @property
    def timed(self) -> bool:
        return self.own.clock.timed

    @timed.setter
    def timed(self, value: bool) -> None:
        self.own.clock.timed = value

    # ----------------------------------------------------------------- Backend

    @property
    def device(self) -> Any:  # what profile synchronises on
        return getattr(self.drafter, "device", None)

    @property
    def config(self) -> Any:  # the drafter's model config (its layer count, for profile)
        return getattr(self.drafter, "config", None)

    def cached_length(self) -> int:
        return len(self.context)

    def crop(self, length: int) -> None:
        """Keep the first ``length`` target tokens; the drafter's cache syncs lazily, at the next
        forward, to whatever the context then is."""
        if length >= len(self.context):
            return
        self.context.crop(length)
        self.own.agree = min(self.own.agree, self.own.drafted.inside(len(self.context.text)))

    def reset(self) -> None:
        self.crop(0)
        self.drafter.reset()
        self.own.crop(0)

    def forward(self, tokens: Sequence[int], params: SamplingParams, num_outputs: int | None = None,
                want_probs: bool = False,
                should_cancel: Callable[[], bool] | None = None) -> StepOutput:
        if not tokens:
            raise ValueError("forward needs at least one token")
        if (num_outputs if num_outputs is not None else len(tokens)) != 1:
            raise ValueError("a translating drafter drafts one token per forward (num_outputs=1)")
        tokens = [int(t) for t in tokens]
        text = self.context.text + self.target.spell(tokens)
        anchor = self.target.piece(tokens[-1])
        position = len(self.context) + len(tokens)
        self.own.sync(text, len(self.context.text), exact=want_probs, should_cancel=should_cancel)
        probs = None
        if want_probs:
            token, probs = self._draft_shared(params, position)
        else:
            token = self._draft_text(text, anchor, params, should_cancel)
        # Only now is the context the backend's: a cancelled forward leaves it as it was.
        self.context.extend(tokens)
        self.own.agree = self.own.drafted.inside(len(text))
        return StepOutput(position, np.asarray([token], dtype=np.int64), probs)

    # ----------------------------------------------------------------- drafting

    def _draft_text(self, text: bytes, anchor: bytes, params: SamplingParams,
                    should_cancel: Callable[[], bool] | None) -> int:
        """SLEM: the first target token of the drafter's text beyond ``text``, once it is stable:
        it ends where the last run of whitespace in that text begins (words before it are
        complete; a target token ending inside a word can still merge with what comes, as
        ``" spec"`` does into ``" speculative"``), or the drafter's text ended with its EOS, or
        :attr:`max_forwards` drafter tokens were drafted for it."""
        from dsi_mpi.backends.logits import select_tokens

        own, ids = self.own, []
        for forwards in range(self.max_forwards + 1):
            if own.next is None:
                own.next = int(select_tokens(own.logits[None], len(own.drafted), params)[0])
            final = own.next in self.source.eos_ids
            ahead = own.drafted.text + (b"" if final else self.source.piece(own.next))
            if len(ahead) < len(text):
                return self._eos  # bytes the drafter has no token for: it cannot follow this text
            ahead = ahead[len(text):]
            if not final:
                ahead = ahead[: len(ahead) - incomplete_tail(ahead)]
            ids = self.target.encode_after(anchor, ahead) if ahead else []
            if final:
                return ids[0] if ids else self._eos
            if ids and len(self.target.piece(ids[0])) <= last_word_start(ahead):
                return ids[0]
            if forwards < self.max_forwards:
                own.feed([own.next], should_cancel)
        return ids[0] if ids else self._eos

    def _draft_shared(self, params: SamplingParams, position: int) -> tuple[int, np.ndarray]:
        """TLI: a sample of the drafter's distribution over the shared tokens, as target ids;
        returns the token and that distribution, ``[1, target vocabulary]``."""
        import torch

        from dsi_mpi.backends.logits import distributions

        if self._shared is None:
            d_ids, t_ids = shared_tokens(self.source, self.target)
            # The end of the text is shared too: the drafter's EOS drafts the target's.
            ends = sorted(e for e in self.source.eos_ids if 0 <= e < self.source.size)
            self._shared = (np.concatenate([d_ids, np.asarray(ends, dtype=np.int64)]),
                            np.concatenate([t_ids, np.full(len(ends), self._eos, dtype=np.int64)]))
        d_ids, t_ids = self._shared
        own = self.own
        logits = own.logits.detach().to("cpu", torch.float64)
        masked = torch.full_like(logits, float("-inf"))
        index = torch.from_numpy(d_ids)
        masked[index] = logits[index]  # the drafter's tokens the target lacks get no mass
        q_d = distributions(masked[None], params)[0].numpy()  # [vocab_d]
        q = np.zeros(self.target.size, dtype=np.float64)
        np.add.at(q, t_ids, q_d[d_ids])
        token = int(np.argmax(q)) if params.greedy else sample_from(q, params.seed, position)
        # The drafter's text goes on with a token that spells the draft: its most likely one.
        candidates = d_ids[t_ids == token]
        own.next = int(candidates[np.argmax(q_d[candidates])])
        return token, q[None]


class DrafterSide:
    """The drafter's own model and tokens: what its cache holds (``drafted``), its logits after
    them, the token it chose next (``next``, not fed yet), and how many of its leading tokens
    lie inside the target's text and spell it (``agree``)."""

    def __init__(self, model: Backend, source: Vocabulary) -> None:
        self.model, self.source = model, source
        self.drafted = Spelled(source)
        self.logits: Any = None  # torch [vocab_d], after self.drafted
        self.next: int | None = None
        self.agree = 0
        self.clock = ForwardClock()  # the model's forwards (profile times them)

    def crop(self, length: int) -> None:
        """Keep the drafter's first ``length`` tokens, and no chosen token."""
        self.next = None
        if length < len(self.drafted):
            self.model.crop(length)
            self.drafted.crop(length)
            self.logits = None
            self.agree = min(self.agree, length)

    def feed(self, tokens: list[int], should_cancel: Callable[[], bool] | None) -> None:
        """Append ``tokens`` to the drafter's cache and keep its logits after them."""
        forward_logits = self.model.forward_logits  # type: ignore[attr-defined]
        logits = self.clock.run(
            lambda: forward_logits(tokens, num_outputs=1, should_cancel=should_cancel))
        self.drafted.extend(tokens)
        self.logits = logits[-1]
        self.next = None

    def _agrees(self, index: int, token: int, start: int, text: bytes) -> bool:
        """Whether drafter token ``token``, the ``index``-th, spelling from byte ``start``, agrees
        with the target's ``text``: it starts beyond it, or spells what the text has there."""
        if start >= len(text):
            return True
        piece = self.source.pieces[token] if 0 <= token < self.source.size else None
        if piece is None:  # a special token: the tokenizer's own BOS at the start, nothing else
            return index < len(self.source.prefix) and token == self.source.prefix[index]
        return text.startswith(piece[: len(text) - start], start)

    def sync(self, text: bytes, known: int, exact: bool,
             should_cancel: Callable[[], bool] | None) -> None:
        """Make the drafter's tokens spell ``text``, and maybe more: keep the leading ones that
        agree with it (crop the drafter's cache after them), encode the rest of the text after
        them and feed it. ``exact`` (TLI) drops the tokens that run past the text too, and
        leaves no chosen token unfed: the drafter's logits must follow the text exactly.
        ``known``: the bytes of ``text`` the target's context held before (agreed on already)."""
        drafted = self.drafted
        chosen = drafted.tokens + ([self.next] if self.next is not None else [])
        ends = drafted.ends + ([len(drafted.text) + len(self.source.piece(self.next))]
                               if self.next is not None else [])
        m = min(self.agree, drafted.inside(known))
        while m < len(chosen) and self._agrees(m, chosen[m], ends[m - 1] if m else 0, text):
            m += 1
        if exact:
            while m and ends[m - 1] > len(text):
                m -= 1
        covered = ends[m - 1] if m else 0
        pending = chosen[len(drafted)] if m == len(chosen) > len(drafted) else None
        self.crop(min(m, len(drafted)))  # drops the chosen token too
        feed: list[int] = []
        if pending is not None:
            if covered < len(text) or exact:
                feed.append(pending)
            else:
                self.next = pending  # the drafter's text reaches the end of the context or beyond
        if not drafted.tokens and not feed:
            feed = list(self.source.prefix)
        if covered < len(text):
            last = feed[-1] if feed else drafted.tokens[-1] if drafted.tokens else None
            anchor = b"" if last is None else self.source.piece(last)
            feed += self.source.encode_after(anchor, text[covered:])
        if feed:
            self.feed(feed, should_cancel)
        elif self.logits is None and self.next is None:
            self._refeed(should_cancel)
        self.agree = drafted.inside(known)

    def _refeed(self, should_cancel: Callable[[], bool] | None) -> None:
        """Logits after the drafter's tokens when none are kept: feed the last token again."""
        if self.drafted.tokens:
            last = self.drafted.tokens[-1]
            self.crop(len(self.drafted) - 1)
            self.feed([last], should_cancel)
        else:  # nothing to feed at all (an empty text, no BOS): start from the drafter's EOS
            self.feed([min(self.source.eos_ids, default=0)], should_cancel)
