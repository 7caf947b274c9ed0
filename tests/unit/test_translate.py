"""Drafting across vocabularies (dsi_mpi/translate.py): the hard cases one by one, then real
tiny models whose tokenizers differ.

Most cases use an *oracle* drafter: a model that recites a known text in its own tokens. Its
drafts, translated, must then be the target's own tokens for that text, one by one, whatever
the cut between prompt and drafts; each hard case is a text and a pair of tokenizers where a
naive translation gets a token wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dsi_mpi.backends.base import Backend, Cancelled, ContextRunner
from dsi_mpi.tiny import (
    build_sentencepiece_tokenizer,
    build_tokenizer,
    corpus_lines,
    unrelated_lines,
)
from dsi_mpi.translate import (
    MIN_SHARED_FRACTION,
    TranslatingDrafter,
    Vocabulary,
    check_intersection,
    incomplete_tail,
    shared_tokens,
)
from dsi_mpi.verify import SamplingParams
from tests.engines import ENGINES, load_engine, loadable, replayed

GREEDY = SamplingParams()


class Oracle(Backend):
    """A drafter model that recites ``text`` in its own tokens: after a context that spells a
    prefix of the text, its next token is the first of the rest (its EOS at the end or off the
    text). ``fed`` records every forward's tokens, i.e. what the drafter (re)computed."""

    def __init__(self, vocab: Vocabulary, text: bytes) -> None:
        self.vocab, self.text = vocab, text
        self.vocab_size, self.eos_token_ids, self.max_positions = vocab.size, vocab.eos_ids, None
        self.cache: list[int] = []
        self.fed: list[list[int]] = []

    def cached_length(self) -> int:
        return len(self.cache)

    def crop(self, length: int) -> None:
        del self.cache[length:]

    def forward(self, *args, **kwargs):
        raise NotImplementedError("a translating drafter asks for logits")

    def forward_logits(self, tokens, num_outputs=1,
                       should_cancel=None) -> torch.Tensor:
        if should_cancel is not None and should_cancel():
            raise Cancelled()
        self.cache += list(tokens)
        self.fed.append(list(tokens))
        spelled = self.vocab.spell(self.cache)
        token = min(self.vocab.eos_ids)
        if self.text.startswith(spelled) and len(spelled) < len(self.text):
            rest = self.text[len(spelled):]
            token = self.vocab.encode_after(self.vocab.piece(self.cache[-1]), rest)[0]
        logits = torch.full((1, self.vocab.size), -10.0, dtype=torch.float64)
        logits[0, token] = 10.0
        return logits


def draft(adapter: TranslatingDrafter, prompt: list[int], limit: int = 300,
          want_probs: bool = False) -> list[int]:
    """Drafts as the DrafterWorker makes them: each appended to the context of the next."""
    runner, seq, drafts = ContextRunner(adapter), list(prompt), []
    for _ in range(limit):
        out = runner.run(seq, GREEDY, want_probs=want_probs)
        drafts.append(int(out.tokens[0]))
        seq.append(drafts[-1])
        if drafts[-1] in adapter.eos_token_ids:
            break
    return drafts


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tokenizers")
    # Two kinds, two sizes, two sets of merges: Gemma's kind (sentencepiece, byte fallback, a
    # BOS) and SmolLM2's (byte-level BPE).
    return {"sentencepiece": build_sentencepiece_tokenizer(root / "sp"),
            "byte_level": build_tokenizer(root / "bl")}


def _byte_level(merges: list[tuple[str, str]], cleanup: bool = False):
    """A byte-level BPE tokenizer with exactly these merges (GPT-2's spelling: Ġ is a space);
    ``cleanup``: its ``decode`` drops spaces before punctuation (transformers 5.2x does that to
    a BPE tokenizer only when forced)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<s>": 0, "</s>": 1}
    for ch in bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    force = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
    forced = {force: True} if cleanup else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=cleanup, **forced)


def _check_every_cut(target_tok, drafter_tok, text: str) -> None:
    """For every prompt/draft cut of the target's tokens of ``text``: the oracle's drafts are
    the target's tokens of the rest, then its EOS."""
    target, source = Vocabulary.of(target_tok), Vocabulary.of(drafter_tok)
    ids = list(target_tok(text)["input_ids"])
    assert target.spell(ids) == text.encode()
    for k in range(1, len(ids)):
        adapter = TranslatingDrafter(Oracle(source, text.encode()), source, target)
        got = draft(adapter, ids[:k])
        expected = ids[k:] + [target_tok.eos_token_id]
        assert got == expected, (k, target_tok.convert_ids_to_tokens(got))


@pytest.mark.parametrize("direction", ["sentencepiece<-byte_level", "byte_level<-sentencepiece"])
def test_recited_text_becomes_the_targets_own_tokens(tokenizers: dict, direction: str) -> None:
    target, drafter = (tokenizers[name] for name in direction.split("<-"))
    text = corpus_lines()[3] + "\n" + corpus_lines()[7] + "  two spaces, then more"
    _check_every_cut(target, drafter, text)


def test_a_boundary_that_moves_is_held_back() -> None:
    """After the drafter's " hel" the target's tokens would be [" hel"], but the target spells
    " hello" as one token: the first token is drafted only once the word is complete."""
    target = _byte_level([("Ġ", "h"), ("Ġh", "e"), ("Ġhe", "l"), ("l", "o"), ("Ġhel", "lo")])
    drafter = _byte_level([("Ġ", "h"), ("Ġh", "e"), ("Ġhe", "l"), ("w", "o")])
    assert target.convert_ids_to_tokens(target(" hel")["input_ids"]) == ["Ġhel"]
    assert target.convert_ids_to_tokens(target(" hello")["input_ids"]) == ["Ġhello"]
    assert drafter.convert_ids_to_tokens(drafter(" hello")["input_ids"])[0] == "Ġhel"
    _check_every_cut(target, drafter, "x hello world hello")


def test_no_bos_is_inserted_mid_stream(tokenizers: dict) -> None:
    """The target's tokenizer puts a BOS before every text it encodes; the drafts, encoded from
    text mid-stream, carry none. A BOS inside the context (two documents) spells nothing."""
    target, drafter = tokenizers["sentencepiece"], tokenizers["byte_level"]
    bos = target.bos_token_id
    assert target(" rest")["input_ids"][0] == bos  # what a naive re-tokenization would insert
    first, second = corpus_lines()[0][:30], corpus_lines()[1]
    ids = target(first)["input_ids"] + target(second)["input_ids"]  # [BOS] first [BOS] second
    assert ids.count(bos) == 2
    source, vocab = Vocabulary.of(drafter), Vocabulary.of(target)
    assert vocab.prefix == (bos,) and source.prefix == ()
    cut = len(target(first)["input_ids"]) + 4
    adapter = TranslatingDrafter(Oracle(source, (first + second).encode()), source, vocab)
    got = draft(adapter, ids[:cut])
    assert bos not in got and got == ids[cut:] + [target.eos_token_id]


def test_whitespace_that_decode_cleans_up_is_kept(tokenizers: dict) -> None:
    """``decode`` with clean-up drops the space before "," and "'s", and a sentencepiece
    decoder that strips the text's leading space (Llama 2's) drops it from a lone token; the
    translation spells tokens as bytes and keeps every space."""
    import copy

    from tokenizers import decoders
    from transformers import PreTrainedTokenizerFast

    target = _byte_level([("Ġ", ","), ("Ġ", "'"), ("'", "s")], cleanup=True)
    drafter = _byte_level([("Ġ", "w"), ("o", "r")])
    text = "a , b 's c ,d"
    ids = target(text)["input_ids"]
    assert target.decode(ids) == "a, b's c,d"  # the hazard
    assert Vocabulary.of(target).spell(ids) == text.encode()
    _check_every_cut(target, drafter, text)

    backend = copy.deepcopy(tokenizers["sentencepiece"].backend_tokenizer)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    stripping = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    word = stripping(" verifies")["input_ids"][1:]
    assert stripping.decode(word) == "verifies"
    assert Vocabulary.of(stripping).spell(word) == b" verifies"
    _check_every_cut(stripping, tokenizers["byte_level"], corpus_lines()[6])


def test_byte_fallback_tokens_and_a_context_that_ends_inside_a_character(tokenizers: dict) -> None:
    """Characters outside the sentencepiece tokenizer's alphabet are UTF-8 bytes, one token
    each; a cut between them leaves the committed text inside a character, which the
    byte-level drafter (one token for several bytes, or one per byte) must still follow."""
    target, drafter = tokenizers["sentencepiece"], tokenizers["byte_level"]
    text = "The target é🙂 verifies ü"
    names = target.convert_ids_to_tokens(target(text)["input_ids"])
    assert {"<0xC3>", "<0xA9>", "<0xF0>", "<0x9F>"} <= set(names)
    _check_every_cut(target, drafter, text)
    _check_every_cut(drafter, target, text)  # and a byte-level target for a byte-fallback drafter
    assert incomplete_tail("é".encode()[:1]) == 1 and incomplete_tail("🙂".encode()[:3]) == 3
    assert incomplete_tail("aé".encode()) == 0


def test_a_rollback_crops_the_drafter_after_its_last_token_in_the_text(tokenizers: dict) -> None:
    """Sync is by text. The target commits the drafted text split into other tokens: nothing is
    recomputed. It commits another word: the drafter keeps its tokens up to the last one wholly
    inside the committed text, and recomputes only the rest of the text."""
    target, drafter = tokenizers["sentencepiece"], tokenizers["byte_level"]
    text = corpus_lines()[2]
    source, vocab = Vocabulary.of(drafter), Vocabulary.of(target)
    oracle = Oracle(source, text.encode())
    runner = ContextRunner(TranslatingDrafter(oracle, source, vocab))
    ids = target(text)["input_ids"]
    seq = ids[:4]
    for _ in range(6):
        seq.append(int(runner.run(seq, GREEDY).tokens[0]))
    assert seq == ids[:10]
    # A rollback to 9 positions, then the drafted word " ever" committed one character a token.
    assert vocab.piece(ids[9]) == b" ever"
    split = [target.convert_tokens_to_ids(ch) for ch in ("\u2581", "e", "v", "e", "r")]
    before, old_cache = len(oracle.fed), list(oracle.cache)
    assert int(runner.run(ids[:9] + split, GREEDY).tokens[0]) == ids[10]
    assert len(oracle.fed) == before  # the drafter's text was already that text
    # A rollback to 9 positions, then another word: " evening" where the drafter had " every".
    context = ids[:9] + target(" evening")["input_ids"][1:]
    committed = vocab.spell(context)
    runner.run(context, GREEDY)  # drafts EOS: the oracle knows no text after "evening"
    assert source.spell(oracle.cache) == committed
    kept = len(oracle.cache) - sum(len(f) for f in oracle.fed[before:])
    assert oracle.cache[:kept] == old_cache[:kept] and kept > len(source.prefix)
    assert committed.startswith(source.spell(old_cache[:kept]))
    dropped = source.spell(old_cache[: kept + 1])  # its first token that the new text contradicts
    assert not committed.startswith(dropped) and not dropped.startswith(committed)
    rest = committed[len(source.spell(old_cache[:kept])):]
    assert oracle.fed[before] == source.encode_after(source.piece(old_cache[kept - 1]), rest)


def test_a_cancelled_forward_leaves_the_context_as_it_was(tokenizers: dict) -> None:
    target, drafter = tokenizers["sentencepiece"], tokenizers["byte_level"]
    text = corpus_lines()[5]
    source, vocab = Vocabulary.of(drafter), Vocabulary.of(target)
    adapter = TranslatingDrafter(Oracle(source, text.encode()), source, vocab)
    ids = target(text)["input_ids"]
    adapter.forward(ids[:5], GREEDY, num_outputs=1)
    with pytest.raises(Cancelled):
        adapter.forward(ids[5:8], GREEDY, num_outputs=1, should_cancel=lambda: True)
    assert adapter.cached_length() == 5
    assert int(adapter.forward(ids[5:8], GREEDY, num_outputs=1).tokens[0]) == ids[8]


def test_token_level_intersection_is_a_distribution_over_shared_tokens(tokenizers: dict) -> None:
    target, drafter = tokenizers["sentencepiece"], tokenizers["byte_level"]
    source, vocab = Vocabulary.of(drafter), Vocabulary.of(target)
    d_ids, t_ids = shared_tokens(source, vocab)
    assert len(d_ids) > 256  # every byte, and the merges both tokenizers learned
    assert all(source.piece(int(d)) == vocab.piece(int(t))
               for d, t in zip(d_ids, t_ids, strict=True))
    # A byte token is never preferred to a plain token that spells the same byte.
    a = vocab.byte_ids[ord("a")]
    assert vocab.piece(a) == b"a" and not target.convert_ids_to_tokens(a).startswith("<0x")
    text = corpus_lines()[4]
    ids = target(text)["input_ids"]
    adapter = TranslatingDrafter(Oracle(source, text.encode()), source, vocab)
    out = adapter.forward(ids[:6], SamplingParams(temperature=1.0, seed=3), num_outputs=1,
                          want_probs=True)
    q = out.probs[0]
    assert q.shape == (vocab.size,) and abs(q.sum() - 1.0) < 1e-12
    # Mass only on shared tokens, and on the target's EOS (the drafter's EOS ends the text too).
    assert set(np.flatnonzero(q)) <= set(t_ids.tolist()) | {target.eos_token_id}
    assert q[out.tokens[0]] > 0
    # Greedy TLI drafts are the drafter's own tokens as target ids (here all shared): they spell
    # the rest of the text, then the target's EOS.
    assert set(drafter(text)["input_ids"]) <= set(d_ids.tolist())
    adapter = TranslatingDrafter(Oracle(source, text.encode()), source, vocab)
    got = draft(adapter, ids[:3], want_probs=True)
    assert vocab.spell(got[:-1]) == text.encode()[len(vocab.spell(ids[:3])):]
    assert got[-1] == target.eos_token_id


def test_a_pair_that_shares_too_little_is_refused(tokenizers: dict, tmp_path: Path) -> None:
    """A drafter whose merges were learnt on other text shares little more than the bytes."""
    unrelated = build_tokenizer(tmp_path / "other", vocab_size=1500, lines=unrelated_lines())
    other = Vocabulary.of(unrelated)
    with pytest.raises(ValueError, match="--verify exact"):
        check_intersection(other, Vocabulary.of(tokenizers["sentencepiece"]))
    assert check_intersection(Vocabulary.of(tokenizers["byte_level"]),
                              Vocabulary.of(tokenizers["sentencepiece"])) >= MIN_SHARED_FRACTION


# ----------------------------------------------------------------- tiny models, two tokenizers


def _prompts(path: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = (corpus_lines()[1][:30], corpus_lines()[12][:20], "The drafter", corpus_lines()[25])
    return [tokenizer(text)["input_ids"] for text in texts]


def _generate(path: str, ids: list[int], max_new_tokens: int, device: str) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).to(device).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens=max_new_tokens,
                             do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("engine", ENGINES)
def test_si_across_vocabularies_is_the_targets_output(tiny_mixed: dict, engine: str,
                                                      device: str) -> None:
    """Greedy: SI with the translating drafter equals ``generate``; sampling with shared noise:
    it equals the target alone for each seed. Drafts are both accepted and rejected. On every
    engine (the drafter's model runs behind the translation)."""
    from dsi_mpi.reference import generate_nonsi, generate_si
    from dsi_mpi.translate import load_drafter

    target = load_engine(tiny_mixed["target"], engine, device)
    drafter = load_drafter(tiny_mixed["drafter"], tiny_mixed["target"], dtype="float64",
                           device=device, target_eos=target.eos_token_ids,
                           engine=loadable(engine, device))
    assert isinstance(drafter, TranslatingDrafter) and drafter.vocab_size == target.vocab_size
    if loadable(engine, device) != engine:
        replayed(drafter.drafter)
    assert drafter.drafter.engine.name == engine
    accepted = rejected = 0
    for ids in _prompts(tiny_mixed["target"]):
        for k in (1, 3):
            gen = generate_si(target, drafter, ids, 24, k, GREEDY)
            assert gen.tokens == _generate(tiny_mixed["target"], ids, 24, device)
            accepted, rejected = accepted + gen.counters.accepted, rejected + gen.counters.rejected
        for seed in (0, 1):
            params = SamplingParams(temperature=0.8, top_k=20, seed=seed)
            assert generate_si(target, drafter, ids, 24, 3, params).tokens == \
                generate_nonsi(target, ids, 24, params).tokens
    assert accepted > 0 and rejected > 0


def test_profile_counts_acceptance_in_target_tokens(tiny_mixed: dict[str, str],
                                                    device: str) -> None:
    from dsi_mpi.config import RunConfig
    from dsi_mpi.profile import profile, table

    config = RunConfig(target=tiny_mixed["target"], drafter=tiny_mixed["drafter"], mode="si",
                       lookahead=3, max_new_tokens=12, dtype="float64", device=device)
    prompts = _prompts(tiny_mixed["target"])
    result = profile(config, prompts, warmup=0)
    drafter = result["drafter"]
    assert result["translation"] == "slem" and drafter["model_forwards"] > 0
    assert drafter["model_ms_per_token"] > 0 and drafter["translation_ms_per_token"] > 0
    expected = [_generate(tiny_mixed["target"], ids, 12, device) for ids in prompts]
    assert [p["tokens"] for p in result["per_prompt"]] == expected  # target tokens
    assert result["tokens"] == sum(map(len, expected)) and 0 < result["acceptance"] < 1
    assert "drafts translated (slem)" in table(result)
