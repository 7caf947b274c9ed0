"""Exact cases and statistical tests of the verification math (no MPI)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsi_mpi.backends.logits import distributions, processed_scores, select_tokens
from dsi_mpi.verify import SamplingParams, exact_match, rejection_sample, sample_from


@pytest.mark.parametrize(
    ("drafts", "target", "accepted", "commit"),
    [
        ([5, 6, 7], [5, 6, 7, 8], 3, [5, 6, 7, 8]),  # all accepted, bonus token
        ([5, 6, 7], [5, 6, 7], 3, [5, 6, 7]),  # all accepted, no bonus given
        ([5, 6, 7], [9, 6, 7, 8], 0, [9]),  # first position rejected
        ([5, 6, 7], [5, 1, 7, 8], 1, [5, 1]),  # middle rejected: correction, rest dropped
        ([5, 6, 7], [5, 6, 2, 8], 2, [5, 6, 2]),  # last rejected
        ([], [4], 0, [4]),  # no drafts: the target's token alone (non-SI step)
    ],
)
def test_exact_match_table(drafts: list[int], target: list[int], accepted: int,
                           commit: list[int]) -> None:
    assert exact_match(drafts, target) == (accepted, commit)


def test_exact_match_rejects_misaligned_blocks() -> None:
    with pytest.raises(ValueError, match="one target token per draft"):
        exact_match([1, 2, 3], [1])


@given(st.lists(st.integers(0, 4), max_size=12),
       st.lists(st.integers(0, 4), min_size=13, max_size=13))
def test_exact_match_properties(drafts: list[int], target_pool: list[int]) -> None:
    target = target_pool[: len(drafts) + 1]
    accepted, commit = exact_match(drafts, target)
    # accepted is the first mismatch, the commit is the accepted drafts plus one target token
    assert drafts[:accepted] == target[:accepted]
    assert accepted == len(drafts) or drafts[accepted] != target[accepted]
    assert commit == target[: accepted + 1]
    assert len(commit) == accepted + 1


def test_sampling_params_validation() -> None:
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-0.1)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-1)


def test_greedy_is_argmax_first_index_on_ties() -> None:
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [2.0, 1.0, 0.0, -1.0]])
    assert select_tokens(logits, 10, SamplingParams()).tolist() == [1, 0]


def test_processing_matches_transformers_warpers() -> None:
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen, dtype=torch.float64) * 3
    for temperature, top_k, top_p in [(0.7, 0, 1.0), (1.3, 5, 1.0), (0.9, 0, 0.8), (1.0, 10, 0.5)]:
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        ours = processed_scores(logits, params)
        theirs = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            theirs = TopKLogitsWarper(top_k)(None, theirs)
        if top_p < 1:
            theirs = TopPLogitsWarper(top_p)(None, theirs)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), params
        finite = ~torch.isinf(ours)
        assert torch.allclose(ours[finite], theirs[finite]), params


def test_shared_noise_is_a_function_of_seed_and_position() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    params = SamplingParams(temperature=1.0, seed=3)
    batch = select_tokens(logits, 100, params)
    one_by_one = [int(select_tokens(logits[i : i + 1], 100 + i, params)[0]) for i in range(6)]
    assert batch.tolist() == one_by_one  # batching does not change a position's noise
    assert select_tokens(logits, 100, params).tolist() == batch.tolist()
    other_seeds = [select_tokens(logits, 100, SamplingParams(temperature=1.0, seed=s)).tolist()
                   for s in range(4, 9)]
    assert any(tokens != batch.tolist() for tokens in other_seeds)


def _tv(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(np.abs(a - b).sum())


@pytest.mark.parametrize(("temperature", "top_k", "top_p"),
                         [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.0, 4, 1.0), (1.2, 0, 0.7)])
def test_shared_noise_sampler_marginal_is_p(temperature: float, top_k: int, top_p: float) -> None:
    """Over seeds, the token chosen at one position is distributed as p (Gumbel-max)."""
    vocab, n = 8, 20_000
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.3]], dtype=torch.float64)
    params0 = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    p = distributions(logits, params0)[0].numpy()
    counts = np.zeros(vocab)
    for seed in range(n):
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        counts[select_tokens(logits, 7, params)[0]] += 1
    empirical = counts / n
    assert empirical[p == 0].sum() == 0  # masked tokens are never drawn
    # TV of an n-sample empirical law from its truth is about sqrt(vocab / n) / 2 ~ 0.01
    assert _tv(empirical, p) < 0.025
    uniform = np.full(vocab, 1 / vocab)
    assert _tv(empirical, uniform) > 0.1  # the test has power: it tells p from another law


def _rejection_outputs(p: np.ndarray, q: np.ndarray, k: int, n: int) -> np.ndarray:
    """First committed token of n rejection-sampled blocks of k drafts drawn from q."""
    first = np.empty(n, dtype=np.int64)
    for seed in range(n):
        drafts = [sample_from(q, seed, pos) for pos in range(k)]  # the drafter's own samples
        _, commit = rejection_sample(drafts, np.tile(q, (k, 1)), np.tile(p, (k + 1, 1)), 0, seed)
        first[seed] = commit[0]
    return first


def test_rejection_sampling_output_is_p_not_q() -> None:
    vocab, n = 6, 20_000
    p = np.array([0.05, 0.4, 0.1, 0.3, 0.1, 0.05])
    q = np.array([0.3, 0.1, 0.3, 0.05, 0.05, 0.2])
    first = _rejection_outputs(p, q, k=3, n=n)
    empirical = np.bincount(first, minlength=vocab) / n
    assert _tv(empirical, p) < 0.025
    assert _tv(empirical, q) > 0.3  # power against the drafter's distribution (TV(p, q) = 0.55)


def test_rejection_sampling_later_positions_are_p() -> None:
    """Every committed position, not only the first, follows p (context-free toy model)."""
    vocab, n, k = 4, 12_000, 3
    p = np.array([0.1, 0.6, 0.2, 0.1])
    q = np.array([0.4, 0.2, 0.2, 0.2])
    counts = np.zeros((k + 1, vocab))
    for seed in range(n):
        drafts = [sample_from(q, seed, pos) for pos in range(k)]
        _, commit = rejection_sample(drafts, np.tile(q, (k, 1)), np.tile(p, (k + 1, 1)), 0, seed)
        for i, token in enumerate(commit):
            counts[i, token] += 1
    for i in range(k + 1):
        empirical = counts[i] / counts[i].sum()
        assert counts[i].sum() > 1000
        assert _tv(empirical, p) < 0.04, (i, empirical)


def test_rejection_sampling_exact_cases() -> None:
    onehot = np.eye(5)
    # Identical one-hot distributions: every draft accepted, bonus from p.
    accepted, commit = rejection_sample([1, 2], onehot[[1, 2]], onehot[[1, 2, 3]], 0, seed=0)
    assert (accepted, commit) == (2, [1, 2, 3])
    # p gives the first draft zero mass: rejected, the residual is p's own token.
    accepted, commit = rejection_sample([1, 2], onehot[[1, 2]], onehot[[4, 2, 3]], 0, seed=0)
    assert (accepted, commit) == (0, [4])
    with pytest.raises(ValueError, match="zero drafter probability"):
        rejection_sample([1], onehot[[2]], onehot[[1, 1]], 0, seed=0)
