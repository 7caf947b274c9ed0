"""From a model's logits to tokens and distributions, as every rank selects them (torch).

Temperature, top-k and top-p as transformers' logits warpers apply them, then greedy argmax or
Gumbel-max with the shared noise of each absolute position (``dsi_mpi.verify``): the drafter
and every target server select a token for position ``j`` the same way, which is what makes
exact-match verification lossless at temperature > 0.
"""

from __future__ import annotations

import numpy as np
import torch

from dsi_mpi.verify import SamplingParams, gumbel_noise


def processed_scores(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p, as transformers' logits warpers apply them.

    ``logits`` is ``[n, vocab]``; returns float64 ``[n, vocab]`` scores whose softmax is the
    sampling distribution, with removed tokens at -inf. Requires temperature > 0.
    """
    scores = logits.detach().to(dtype=torch.float64, device="cpu") / params.temperature
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]  # [n, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        # Sort ascending and drop the tail whose mass is <= 1 - top_p, keeping at least the
        # most likely token (transformers' TopPLogitsWarper).
        sorted_scores, sorted_idx = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1.0 - params.top_p)
        remove_sorted[..., -1] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def distributions(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Sampling distribution per row, float64 ``[n, vocab]``; one-hot argmax when greedy."""
    if params.greedy:
        out = torch.zeros(logits.shape, dtype=torch.float64)
        out.scatter_(-1, logits.detach().cpu().argmax(dim=-1, keepdim=True), 1.0)
        return out
    return processed_scores(logits, params).softmax(dim=-1)


def select_tokens(logits: torch.Tensor, first_position: int, params: SamplingParams) -> np.ndarray:
    """The token each row of ``logits`` ``[n, vocab]`` selects; row i is position
    first_position + i.

    Greedy is argmax (first index on ties, like ``generate``); otherwise Gumbel-max with the
    shared noise of each absolute position. Returns int64 ``[n]``.
    """
    if params.greedy:
        return logits.detach().argmax(dim=-1).cpu().numpy().astype(np.int64)
    scores = processed_scores(logits, params).numpy()  # [n, vocab] float64
    vocab = scores.shape[-1]
    out = np.empty(scores.shape[0], dtype=np.int64)
    for i in range(scores.shape[0]):
        out[i] = int(np.argmax(scores[i] + gumbel_noise(params.seed, first_position + i, vocab)))
    return out
