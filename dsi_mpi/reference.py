"""Single-process reference decoders: non-SI (target alone) and SI (draft k, verify, repeat).

They use the same token selection and verification functions as the MPI runtime, and are
what the runtime's output is checked against in tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dsi_mpi.backends.base import Backend, ContextRunner
from dsi_mpi.metrics import Counters
from dsi_mpi.verify import SamplingParams, exact_match, rejection_sample

VERIFY_MODES = ("exact", "rejection")


@dataclass
class Generation:
    """Generated tokens (prompt excluded, EOS included when reached) and what it took."""

    tokens: list[int]
    counters: Counters = field(default_factory=Counters)


def extend_output(output: list[int], tokens: Iterable[int], eos_ids: frozenset[int],
                  max_new_tokens: int) -> bool:
    """Append committed tokens, stopping at EOS or ``max_new_tokens``; True when finished."""
    for token in tokens:
        if len(output) >= max_new_tokens:
            return True
        output.append(int(token))
        if int(token) in eos_ids:
            return True
    return len(output) >= max_new_tokens


def generate_nonsi(target: Backend, prompt: Sequence[int], max_new_tokens: int,
                   params: SamplingParams) -> Generation:
    """Plain autoregressive decoding: one target forward per token."""
    runner = ContextRunner(target)
    runner.reset()
    gen = Generation(tokens=[])
    context = list(prompt)
    while True:
        out = runner.run(context, params)
        gen.counters.target_forwards += 1
        gen.counters.forced += 1
        if extend_output(gen.tokens, out.tokens, target.eos_token_ids, max_new_tokens):
            return gen
        context.append(int(out.tokens[0]))


def generate_si(
    target: Backend, drafter: Backend, prompt: Sequence[int], max_new_tokens: int, lookahead: int,
    params: SamplingParams, verify: str = "exact",
) -> Generation:
    """Classic speculative inference (Leviathan et al. 2023): draft ``lookahead`` tokens, verify
    them in one target forward, commit the accepted drafts and the correction or bonus token."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    rejection = verify == "rejection"
    target_runner, drafter_runner = ContextRunner(target), ContextRunner(drafter)
    target_runner.reset()
    drafter_runner.reset()
    gen = Generation(tokens=[])
    committed = list(prompt)
    while True:
        # At most remaining - 1 drafts: with the bonus, an iteration commits up to k + 1 tokens.
        budget = min(lookahead, max_new_tokens - len(gen.tokens) - 1)
        drafts: list[int] = []
        q_rows: list[np.ndarray] = []
        for _ in range(budget):
            out = drafter_runner.run(committed + drafts, params, want_probs=rejection)
            gen.counters.drafts_received += 1
            drafts.append(int(out.tokens[0]))
            if rejection:
                assert out.probs is not None  # asked for
                q_rows.append(out.probs[0])
            if drafts[-1] in drafter.eos_token_ids:
                break
        out = target_runner.run(committed + drafts, params, num_outputs=len(drafts) + 1,
                                want_probs=rejection)
        gen.counters.target_forwards += 1
        if rejection:
            assert out.probs is not None  # asked for
            q = np.stack(q_rows) if q_rows else np.zeros((0, target.vocab_size))
            accepted, commit = rejection_sample(drafts, q, out.probs, len(committed), params.seed)
        else:
            accepted, commit = exact_match(drafts, out.tokens)
        before = len(gen.tokens)
        finished = extend_output(gen.tokens, commit, target.eos_token_ids, max_new_tokens)
        gen.counters.observe_block(len(drafts), accepted, committed=len(gen.tokens) - before)
        committed.extend(commit)
        if finished:
            return gen
