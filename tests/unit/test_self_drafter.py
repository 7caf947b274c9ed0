"""Self-drafters (``self:layers=N``): a target's embedding, first N layers, final norm and head."""

from __future__ import annotations

import pytest
import torch

from dsi_mpi.backends import load_backend, self_drafter_layers
from dsi_mpi.backends.base import ContextRunner
from dsi_mpi.backends.hf import keep_first_layers
from dsi_mpi.config import ConfigError, RunConfig
from dsi_mpi.preflight import preflight
from dsi_mpi.reference import generate_nonsi, generate_si
from dsi_mpi.verify import SamplingParams
from tests.engines import ENGINES, load_engine

GREEDY = SamplingParams()
PROMPT = [5, 17, 42, 8, 99, 3, 250]


def _norm_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    if hasattr(model, "transformer"):  # GPT-2
        return model.transformer.ln_f, model.lm_head
    return model.model.norm, model.lm_head


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_self_drafter_is_the_targets_early_exit(tiny_suite: dict[str, str], arch: str) -> None:
    """Drafter logits equal the target's head over its final norm of hidden state N."""
    target = load_backend(tiny_suite[arch], dtype="float64")
    drafter = load_backend("self:layers=1", dtype="float64", target=tiny_suite[arch])
    assert drafter.config.num_hidden_layers == 1 and target.config.num_hidden_layers == 2
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        states = target.model(input_ids=ids, output_hidden_states=True).hidden_states
        hidden = states[1]  # [1, m, d]
        norm, head = _norm_and_head(target.model)
        expected = head(norm(hidden))[0]  # [m, vocab]
        logits = drafter.model(input_ids=ids).logits[0]
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-12)
    # Through the backend: tokens and a KV cache of one layer, cropped like any other.
    out = drafter.forward(PROMPT, GREEDY)
    assert out.tokens.tolist() == expected.argmax(-1).tolist()
    assert len(drafter.cache.layers) == 1 and drafter.cached_length() == len(PROMPT)
    drafter.crop(3)
    assert drafter.forward(PROMPT[3:], GREEDY).tokens.tolist() == out.tokens[3:].tolist()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_all_layers_accept_everything_and_fewer_change_nothing_in_the_output(
        tiny_suite: dict[str, str], arch: str, engine: str) -> None:
    target = load_engine(tiny_suite[arch], engine)
    expected = generate_nonsi(target, PROMPT, 20, GREEDY).tokens
    for layers, all_accepted in ((2, True), (1, False)):
        drafter = load_engine(f"self:layers={layers}", engine, target=tiny_suite[arch])
        assert drafter.engine.name == engine and len(drafter.cache.layers) == layers
        gen = generate_si(target, drafter, PROMPT, 20, 3, GREEDY)
        assert gen.tokens == expected
        assert (gen.counters.rejected == 0) == all_accepted, gen.counters


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_cancellation_still_reaches_every_kept_layer(tiny_suite: dict[str, str],
                                                     engine: str) -> None:
    from dsi_mpi.backends import Cancelled

    drafter = load_engine("self:layers=1", engine, target=tiny_suite["llama"])
    ContextRunner(drafter).run(PROMPT, GREEDY)
    polls = []

    def cancel_at_the_layer() -> bool:
        polls.append(1)
        return len(polls) >= 2  # before the forward, then before layer 0

    with pytest.raises(Cancelled):
        drafter.forward([11, 12], GREEDY, should_cancel=cancel_at_the_layer)
    assert len(polls) == 2 and drafter.cached_length() == len(PROMPT)


def test_per_layer_config_lists_are_cut_too() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True,
                         sliding_window=4, max_window_layers=1)
    model = Qwen2ForCausalLM(config).eval()
    keep_first_layers(model, 2)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    assert len(model.model.layers) == 2
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6]]), cache=cache, use_cache=True)
    assert len(cache.layers) == 2
    with pytest.raises(ValueError, match="out of range: the target has 2 decoder layers"):
        keep_first_layers(model, 3)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("self:layers=0", "N must be between 1 and the target's 2 decoder layers"),
        ("self:layers=3", "N must be between 1 and the target's 2 decoder layers"),
        ("self:layers=-1", "N must be between 1"),
        ("self:layers=two", "malformed self-drafter spec"),
        ("self:depth=1", "malformed self-drafter spec"),
    ],
)
def test_bad_self_drafters_fail_in_preflight(tiny_suite: dict[str, str], spec: str,
                                             message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        preflight(RunConfig(target=tiny_suite["llama"], drafter=spec), prompt="hello")


def test_a_self_drafter_needs_a_model_target() -> None:
    assert self_drafter_layers("self:layers=7") == 7
    with pytest.raises(ConfigError, match="both be emulated"):
        RunConfig(target="emulated:tpot_ms=1", drafter="self:layers=1")
    with pytest.raises(ValueError, match="needs a model target"):
        load_backend("self:layers=1")
