"""Emulated backend: a synthetic language with sleep-timed forwards, for latency studies.

Design note, section 7. The target's token at position ``j`` is a deterministic function of
``(seed, prefix)``, kept as a rolling 64-bit hash so each token costs O(1). The drafter
reproduces the target's token with probability ``acceptance``, decided by another
deterministic function of ``(seed, prefix)``, and proposes a different token otherwise, so
acceptance is i.i.d. per position given a correct prefix, as in the paper's simulations.
Each forward lasts TTFT when it fills an empty cache (the prompt) and otherwise TPOT, or with
``block_ms`` the cost of its number of new tokens (a cost curve, as a CPU's matrix multiplies
give: a forward of several tokens can cost more than one of a single token): it sleeps
in short slices, so that a cancellation check can interrupt it, until a sleep's wake-up delay
before the end, and waits out the rest by polling the clock (and the cancellation check), so
a forward ends within microseconds of its duration rather than a wake-up delay late.

Spec grammar: ``emulated:tpot_ms=20.6,ttft_ms=27.8`` (target) and
``emulated:tpot_ms=6.8,ttft_ms=8.1,acceptance=0.93`` (drafter); optional ``vocab`` (default
32000) and ``seed`` (default 0); ``ttft_ms`` defaults to ``tpot_ms``. Optional
``block_ms=2:1011/4:937/6:969``: a forward of ``n`` new tokens (``n`` >= 2, not the prompt's)
lasts the listed cost of ``n``, interpolated linearly between listed lengths and the last
listed cost beyond them (between 1 and the first listed length, from ``tpot_ms``); without it
every forward after the prompt's lasts ``tpot_ms``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dsi_mpi.backends.base import Backend, Cancelled, StepOutput
from dsi_mpi.verify import SamplingParams

PREFIX = "emulated:"
_MASK = (1 << 64) - 1
_SLICE_S = 0.0005  # sleep granularity: a cancellation interrupts a forward within this (+ wake-up)
# The last stretch of a forward is spun, not slept: a sleep ends about 65 us late on Linux
# (the default 50 us timer slack plus the wake-up), sometimes more under load.
_SPIN_S = 0.0002
# Salts that separate the independent hash streams derived from one prefix state.
_SALT_TARGET = 0x5A17_7A26_E7D0_0001
_SALT_ACCEPT = 0x5A17_ACCE_97ED_0002
_SALT_OTHER = 0x5A17_07E4_E70C_0003
_SALT_SAMPLE = 0x5A17_5A3D_1E00_0004


def block_cost(tpot_ms: float, block_ms: Sequence[tuple[int, float]], n: int) -> float:
    """The cost of a forward of ``n`` new tokens on a warm cache: ``tpot_ms`` for one token,
    else ``block_ms`` ((length, ms) pairs, lengths >= 2 ascending) interpolated linearly, from
    (1, ``tpot_ms``) to the first pair, and flat after the last."""
    if n <= 1 or not block_ms:
        return tpot_ms
    below_n, below_ms = 1, tpot_ms
    for length, ms in block_ms:
        if n <= length:
            return below_ms + (ms - below_ms) * (n - below_n) / (length - below_n)
        below_n, below_ms = length, ms
    return below_ms


def parse_block_ms(text: str) -> tuple[tuple[int, float], ...]:
    """``2:1011/4:937/6:969`` as ((2, 1011.0), (4, 937.0), (6, 969.0)); ValueError when
    malformed (lengths must be >= 2 and ascending, costs >= 0)."""
    pairs: list[tuple[int, float]] = []
    for item in text.split("/"):
        length, sep, ms = item.partition(":")
        try:
            pair = (int(length), float(ms))
        except ValueError:
            pair = None
        if not sep or pair is None:
            raise ValueError(f"block_ms={text!r}: {item!r} is not LENGTH:MS, "
                             "e.g. block_ms=2:1011/4:937")
        if pair[0] < 2 or pair[1] < 0 or (pairs and pair[0] <= pairs[-1][0]):
            raise ValueError(f"block_ms={text!r}: lengths must be >= 2 and ascending, "
                             "costs >= 0 (the 1-token cost is tpot_ms)")
        pairs.append(pair)
    return tuple(pairs)


def _mix(x: int) -> int:
    """splitmix64 finaliser: a fast, well-mixed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


@dataclass(frozen=True)
class EmulatedSpec:
    """A parsed emulated spec; ``acceptance`` is None for a target."""

    tpot_ms: float
    ttft_ms: float
    acceptance: float | None = None
    vocab: int = 32000
    seed: int = 0
    block_ms: tuple[tuple[int, float], ...] = ()  # (new tokens, ms) of forwards of >= 2 tokens

    def forward_ms(self, cached: int, new_tokens: int) -> float:
        """How long a forward of ``new_tokens`` on a cache of ``cached`` positions lasts."""
        if cached == 0:
            return self.ttft_ms
        return block_cost(self.tpot_ms, self.block_ms, new_tokens)

    @classmethod
    def parse(cls, spec: str) -> EmulatedSpec:
        if not spec.startswith(PREFIX):
            raise ValueError(f"not an emulated spec (must start with {PREFIX!r}): {spec!r}")
        fields: dict[str, str] = {}
        body = spec[len(PREFIX):]
        for item in filter(None, body.split(",")):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or not value.strip():
                raise ValueError(f"malformed emulated spec {spec!r}: {item!r} is not key=value")
            if key in fields:
                raise ValueError(f"malformed emulated spec {spec!r}: {key!r} given twice")
            fields[key] = value.strip()
        known = {"tpot_ms", "ttft_ms", "acceptance", "vocab", "seed", "block_ms"}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(
                f"malformed emulated spec {spec!r}: unknown key(s) {unknown}; "
                f"valid keys are {sorted(known)}, e.g. emulated:tpot_ms=20.6,ttft_ms=27.8"
            )
        if "tpot_ms" not in fields:
            raise ValueError(f"malformed emulated spec {spec!r}: tpot_ms is required, "
                             "e.g. emulated:tpot_ms=20.6")

        def number(key: str, kind: type) -> float | int:
            try:
                return kind(fields[key])
            except ValueError:
                raise ValueError(
                    f"malformed emulated spec {spec!r}: "
                    f"{key}={fields[key]!r} is not {kind.__name__}"
                ) from None

        tpot = float(number("tpot_ms", float))
        ttft = float(number("ttft_ms", float)) if "ttft_ms" in fields else tpot
        acceptance = float(number("acceptance", float)) if "acceptance" in fields else None
        vocab = int(number("vocab", int)) if "vocab" in fields else 32000
        seed = int(number("seed", int)) if "seed" in fields else 0
        try:
            block = parse_block_ms(fields["block_ms"]) if "block_ms" in fields else ()
        except ValueError as exc:
            raise ValueError(f"malformed emulated spec {spec!r}: {exc}") from None
        if tpot < 0 or ttft < 0:
            raise ValueError(f"emulated spec {spec!r}: latencies must be >= 0 ms")
        if acceptance is not None and not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"emulated spec {spec!r}: acceptance must be in [0, 1], "
                             f"got {acceptance}")
        if vocab < 2:
            raise ValueError(f"emulated spec {spec!r}: vocab must be >= 2, got {vocab}")
        if seed < 0:
            raise ValueError(f"emulated spec {spec!r}: seed must be >= 0, got {seed}")
        return cls(tpot_ms=tpot, ttft_ms=ttft, acceptance=acceptance, vocab=vocab, seed=seed,
                   block_ms=block)


class EmulatedLanguage:
    """The synthetic language's token functions over a rolling prefix state (pure, no sleeps)."""

    def __init__(self, seed: int, vocab: int) -> None:
        self.seed = seed
        self.vocab = vocab
        self.initial_state = _mix(seed ^ 0xD51D_0000)

    @staticmethod
    def advance(state: int, token: int) -> int:
        """The prefix state after appending ``token``."""
        return _mix(state ^ _mix(token + 1))

    def target_token(self, state: int, params: SamplingParams) -> int:
        """The target's token after the prefix whose state is ``state``."""
        h = state ^ _SALT_TARGET
        if not params.greedy:  # sampling: a different seed gives a different continuation
            h ^= _mix(params.seed ^ _SALT_SAMPLE)
        return _mix(h) % self.vocab

    def drafter_token(self, state: int, params: SamplingParams, acceptance: float) -> int:
        """The target's token with probability ``acceptance``, a different token otherwise."""
        target = self.target_token(state, params)
        if _mix(state ^ _SALT_ACCEPT) < acceptance * 2.0**64:
            return target
        return (target + 1 + _mix(state ^ _SALT_OTHER) % (self.vocab - 1)) % self.vocab


class EmulatedBackend(Backend):
    """A target (acceptance None) or drafter of the emulated language."""

    def __init__(self, spec: EmulatedSpec, sleep: bool = True) -> None:
        self.spec = spec
        self.language = EmulatedLanguage(spec.seed, spec.vocab)
        self.vocab_size = spec.vocab
        self.eos_token_ids = frozenset()  # the synthetic language never ends a sequence
        self.max_positions = None
        self.sleep = sleep
        self._states = [self.language.initial_state]  # _states[i]: prefix state after i tokens

    def cached_length(self) -> int:
        return len(self._states) - 1

    def crop(self, length: int) -> None:
        del self._states[length + 1:]

    def forward(
        self,
        tokens: Sequence[int],
        params: SamplingParams,
        num_outputs: int | None = None,
        want_probs: bool = False,
        should_cancel: Callable[[], bool] | None = None,
    ) -> StepOutput:
        if want_probs:
            raise ValueError("the emulated backend has no distributions; "
                             "use --verify exact with it")
        if not tokens:
            raise ValueError("forward needs at least one token")
        start = self.cached_length()
        delay_s = self.spec.forward_ms(start, len(tokens)) / 1000.0
        deadline = time.perf_counter() + delay_s  # the forward's computing counts in its time
        if not self.sleep and should_cancel is not None and should_cancel():
            raise Cancelled()
        n = len(tokens) if num_outputs is None else min(num_outputs, len(tokens))
        out = np.empty(n, dtype=np.int64)  # [n]
        state = self._states[-1]
        for i, token in enumerate(tokens):
            state = self.language.advance(state, int(token))
            self._states.append(state)
            j = i - (len(tokens) - n)
            if j >= 0:
                out[j] = self._token(state, params)
        if self.sleep:
            try:
                self._wait_until(deadline, should_cancel)
            except Cancelled:
                self.crop(start)  # an abandoned forward leaves no trace in the cache
                raise
        return StepOutput(first_position=start + len(tokens) - n + 1, tokens=out)

    def _token(self, state: int, params: SamplingParams) -> int:
        if self.spec.acceptance is None:
            return self.language.target_token(state, params)
        return self.language.drafter_token(state, params, self.spec.acceptance)

    @staticmethod
    def _wait_until(deadline: float, should_cancel: Callable[[], bool] | None) -> None:
        """Return at ``deadline`` (``perf_counter`` time), checking ``should_cancel`` at least
        every ``_SLICE_S``: sleep in slices until ``_SPIN_S`` before it, then spin."""
        while True:
            if should_cancel is not None and should_cancel():
                raise Cancelled()
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            if remaining > _SPIN_S:
                time.sleep(min(_SLICE_S, remaining - _SPIN_S))
