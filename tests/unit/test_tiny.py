"""The tiny-model builder: real save/load round trip, EOS probe, tokenizer."""

from __future__ import annotations

from transformers import AutoConfig, AutoTokenizer

from dsi_mpi.tiny import EOS_PROBE_PROMPT, build_suite


def test_suite_round_trips_through_the_loading_path(tiny_suite: dict[str, str]) -> None:
    assert set(tiny_suite) >= {"llama", "gpt2", "llama/perturbed", "gpt2/unrelated"}
    types = {AutoConfig.from_pretrained(tiny_suite[a]).model_type for a in ("llama", "gpt2")}
    assert types == {"llama", "gpt2"}
    tokenizer = AutoTokenizer.from_pretrained(tiny_suite["llama"])
    ids = tokenizer(EOS_PROBE_PROMPT)["input_ids"]
    assert tokenizer.decode(ids) == EOS_PROBE_PROMPT
    # All models of a suite share one vocabulary, so any drafter fits any target.
    sizes = {AutoConfig.from_pretrained(path).vocab_size for path in tiny_suite.values()}
    assert sizes == {len(tokenizer)}


def test_suite_is_reused_not_rebuilt(tiny_suite: dict[str, str]) -> None:
    import os

    root = os.path.dirname(tiny_suite["llama"])
    assert build_suite(root) == tiny_suite
