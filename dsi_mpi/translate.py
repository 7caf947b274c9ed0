"""A drafter with its own vocabulary, seen by DSI as a drafter of the target's tokens.

Lossless speculative decoding across vocabularies (Timor et al., ICML 2025, arXiv 2502.05202),
on the drafter's side only: the coordinator and the target servers speak target tokens and
never learn that the drafter does not. :class:`TranslatingDrafter` is a :class:`Backend` whose
positions and tokens are the target's; the drafter's model, cache and tokenizer live inside it.

Text is bytes. Every token of either vocabulary spells a byte string (:class:`Vocabulary`:
``Ġ`` and ``▁`` are spaces, ``<0xE2>`` is one byte, a special token spells nothing), so a
committed text that ends inside a UTF-8 character (byte-fallback tokens), spaces before
punctuation (which ``decode`` "cleans up") and a BOS token (which spells nothing) never
disturb the comparison of two texts.

- **Exact matching across vocabularies** (the paper's string-level exact match, SLEM; greedy
  and shared-noise sampling): the drafter drafts text with its own tokens; the text beyond
  the target's context is re-tokenized with the target's tokenizer (no special tokens: no BOS
  mid-stream) and its first token is the draft. The last token of that text is held back,
  since more text can move its boundary (``" hel"`` is not the start of ``" hello"`` for the
  target), so the drafter runs on until the text holds two target tokens. The target verifies
  token ids as always, so the output is the target's exactly.
- **Rejection sampling across vocabularies** (the paper's token-level intersection, TLI): the
  drafter's distribution restricted to the tokens both vocabularies spell alike, renormalised
  and written over the target's vocabulary, is a distribution ``q`` over the target's tokens;
  the draft is a sample of it, and Leviathan et al.'s rule keeps the output distributed as
  the target's. :func:`check_intersection` refuses a pair that shares too little.

After each change of the target's context (a commit, a rollback) the drafter syncs to the
context's text: it keeps its tokens that agree with the text (cropping its cache after the
last one), and encodes the rest of the text with its own tokenizer, after the last kept token.

In layers: :mod:`dsi_mpi.vocabulary` (vocabularies as bytes, spelled sequences, the
intersection: no torch), :mod:`dsi_mpi.backends.translating` (the drafter), and here, what a
pair of model specs gets (:func:`translation`, :func:`load_drafter`).
"""

from __future__ import annotations

from dsi_mpi.backends.base import Backend
from dsi_mpi.backends.choice import EngineOptions
from dsi_mpi.backends.translating import MAX_DRAFTER_FORWARDS, TranslatingDrafter
from dsi_mpi.vocabulary import (
    METHODS,
    MIN_SHARED_FRACTION,
    Spelled,
    Vocabulary,
    check_intersection,
    incomplete_tail,
    method_for,
    same_vocabulary,
    shared_tokens,
)

__all__ = ["MAX_DRAFTER_FORWARDS", "METHODS", "MIN_SHARED_FRACTION", "Spelled",
           "TranslatingDrafter", "Vocabulary", "check_intersection", "incomplete_tail",
           "load_drafter", "method_for", "same_vocabulary", "shared_tokens", "translation",
           "vocabularies_differ"]


# ----------------------------------------------------------------- from model specs


def _tokenizer(spec: str):  # a transformers tokenizer or None
    from dsi_mpi.backends import is_emulated, is_self_drafter

    if is_emulated(spec) or is_self_drafter(spec):
        return None  # an emulated pair shares its vocabulary; a self-drafter is the target's
    from dsi_mpi.backends.hf import load_tokenizer

    return load_tokenizer(spec)


def vocabularies_differ(target: str, drafter: str) -> bool:
    """Whether a drafter spec needs translating to the target spec's vocabulary (both models
    ship tokenizers and their vocabularies differ)."""
    t, d = _tokenizer(target), _tokenizer(drafter)
    return t is not None and d is not None and not same_vocabulary(t, d)


def translation(target: str, drafter: str | None, verify: str) -> str | None:
    """The method a pair of specs gets: None when the drafter speaks the target's vocabulary,
    else ``slem`` (``--verify exact``) or ``tli`` (``--verify rejection``)."""
    if drafter is None or not vocabularies_differ(target, drafter):
        return None
    return method_for(verify)


def load_drafter(spec: str, target: str, dtype: str = "auto", device: str = "cpu",
                 target_eos: frozenset[int] = frozenset(),
                 engine: EngineOptions | str = "eager") -> Backend:
    """The drafter for ``target``: its backend, behind a :class:`TranslatingDrafter` when its
    vocabulary is not the target's. ``target_eos``: the target's end-of-sequence ids (what a
    draft that ends the text becomes), default its tokenizer's. ``engine``: how its forwards
    run (``backends/engine.py``)."""
    from dsi_mpi.backends import load_backend

    backend = load_backend(spec, dtype, device, target=target, engine=engine)
    t_tok, d_tok = _tokenizer(target), _tokenizer(spec)
    if t_tok is None or d_tok is None or same_vocabulary(t_tok, d_tok):
        return backend
    from dsi_mpi.backends.hf import load_config

    config = load_config(target)
    size = int(getattr(config.get_text_config(), "vocab_size", None) or len(t_tok))
    source = Vocabulary.of(d_tok, backend.vocab_size, backend.eos_token_ids)
    return TranslatingDrafter(backend, source, Vocabulary.of(t_tok, size, tuple(target_eos)),
                              target_eos)
