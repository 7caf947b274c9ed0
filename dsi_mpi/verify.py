"""Verification math: exact matching, shared-noise sampling, rejection sampling.

Pure functions over numpy arrays: no torch, no MPI, no I/O (the coordinator and the simulator
import this; turning a model's logits into tokens and distributions is
``backends/logits.py``'s). Notation follows Leviathan et al.
(2023): ``p`` is the target's distribution, ``q`` the drafter's.

Token selection with shared noise (docs/design.md, section 4): every rank that selects a token
for absolute position ``j`` draws the same Gumbel noise from a generator seeded by
``(seed, j)``, and picks ``argmax(processed_logits / T + g_j)``. By the Gumbel-max trick the
pick is an exact sample of ``softmax(processed_logits / T)``, and two models whose logits are
close pick the same token often, which is what makes exact-match verification useful at
temperature > 0 (the paper's Algorithm 1, exact matching).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

# Independent noise streams for one position. The drafter samples its draft with SELECT;
# rejection sampling draws its acceptance coin from ACCEPT and its resample from RESIDUAL,
# so the draft is independent of both (required by Leviathan et al., Theorem 1).
STREAM_SELECT = 0
STREAM_ACCEPT = 1
STREAM_RESIDUAL = 2


class SamplingError(ValueError):
    """A sampling parameter out of range: which field (``field``) and what is wrong with it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


class VerifyMode(str, Enum):
    """How drafts are verified (``--verify``)."""

    EXACT = "exact"  # the draft must equal the target's token (shared noise: token-identical)
    REJECTION = "rejection"  # Leviathan et al.'s rejection sampling over p and q


@dataclass(frozen=True)
class SamplingParams:
    """How a token is chosen from logits; identical on every rank."""

    temperature: float = 0.0  # 0 means greedy (argmax); > 0 samples with shared noise
    top_k: int = 0  # keep the k most likely tokens; 0 disables
    top_p: float = 1.0  # keep the smallest set with cumulative probability >= top_p
    seed: int = 0  # seeds the per-position noise; same seed, same output

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise SamplingError("temperature", f"must be >= 0, got {self.temperature}; "
                                               "use 0 for greedy decoding")
        if self.top_k < 0:
            raise SamplingError("top_k", f"must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError("top_p", f"must be in (0, 1], got {self.top_p}; "
                                         "use 1.0 to disable it")
        if self.seed < 0:
            raise SamplingError("seed", f"must be >= 0, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def noise_generator(seed: int, position: int, stream: int = STREAM_SELECT) -> np.random.Generator:
    """The generator every rank uses for absolute ``position``: a function of its arguments only."""
    return np.random.default_rng(np.random.SeedSequence([seed, position, stream]))


def gumbel_noise(seed: int, position: int, vocab_size: int,
                 stream: int = STREAM_SELECT) -> np.ndarray:
    """Standard Gumbel noise for one position, ``[vocab_size]`` float64."""
    return noise_generator(seed, position, stream).gumbel(size=vocab_size)


def sample_from(p: np.ndarray, seed: int, position: int, stream: int = STREAM_SELECT) -> int:
    """Sample one token from probabilities ``p`` ``[vocab]`` by Gumbel-max with that
    position's noise."""
    with np.errstate(divide="ignore"):
        log_p = np.log(np.asarray(p, dtype=np.float64))
    return int(np.argmax(log_p + gumbel_noise(seed, position, log_p.shape[-1], stream)))


def exact_match(drafts: Sequence[int],
                target_tokens: Sequence[int] | np.ndarray) -> tuple[int, list[int]]:
    """Exact-match verification of a block of drafts.

    ``target_tokens[i]`` is the target's token at the position of ``drafts[i]``; it may hold
    one more entry (the bonus position after the last draft). Returns the number of drafts
    accepted and the tokens to commit: the accepted drafts, then the target's correction at the
    first mismatch, or its bonus token when every draft matched and a bonus is given.
    """
    if len(target_tokens) not in (len(drafts), len(drafts) + 1):
        raise ValueError(
            f"need one target token per draft (plus an optional bonus): "
            f"{len(drafts)} drafts, {len(target_tokens)} target tokens"
        )
    accepted = 0
    for draft, target in zip(drafts, target_tokens, strict=False):  # a bonus may follow
        if int(draft) != int(target):
            break
        accepted += 1
    commit = [int(t) for t in drafts[:accepted]]
    if accepted < len(target_tokens):
        commit.append(int(target_tokens[accepted]))
    return accepted, commit


def rejection_step(draft: int, q: np.ndarray, p: np.ndarray, seed: int,
                   position: int) -> tuple[bool, int]:
    """Leviathan et al. (2023), Algorithm 1, for one position.

    Accept ``draft`` (drawn from ``q``) with probability min(1, p[draft] / q[draft]); on
    rejection return a sample of normalise(max(0, p - q)). The coin and the resample use their
    own noise streams of ``(seed, position)``, independent of the draft. Returns
    ``(accepted, token)``.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    q_d = q[draft]
    if q_d <= 0.0:
        # The drafter cannot have drawn a token it gave zero mass: the caller's q is wrong.
        raise ValueError(f"draft token {draft} has zero drafter probability at position {position}")
    u = noise_generator(seed, position, STREAM_ACCEPT).random()
    if u * q_d < p[draft]:  # u < p/q, without dividing
        return True, int(draft)
    residual = np.maximum(p - q, 0.0)
    total = residual.sum()
    if total <= 0.0:  # p == q up to rounding: any rejection is a rounding artefact; use p
        residual, total = p, p.sum()
    return False, sample_from(residual / total, seed, position, STREAM_RESIDUAL)


def rejection_sample(
    drafts: Sequence[int], q: np.ndarray, p: np.ndarray, first_position: int, seed: int
) -> tuple[int, list[int]]:
    """Rejection-sampling verification of a block (Leviathan et al. 2023; Chen et al. 2023).

    ``q`` is ``[k, vocab]`` (drafter), ``p`` is ``[k, vocab]`` or ``[k + 1, vocab]`` (target,
    the last row for the bonus position). Returns the number accepted and the tokens to commit.
    """
    k = len(drafts)
    if q.shape[0] != k or p.shape[0] not in (k, k + 1):
        raise ValueError(f"shape mismatch: {k} drafts, q {tuple(q.shape)}, p {tuple(p.shape)}")
    commit: list[int] = []
    for i, draft in enumerate(drafts):
        accepted, token = rejection_step(int(draft), q[i], p[i], seed, first_position + i)
        commit.append(token)
        if not accepted:
            return i, commit
    if p.shape[0] == k + 1:
        commit.append(sample_from(p[k], seed, first_position + k))
    return k, commit
