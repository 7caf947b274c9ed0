"""The HF backend on tiny float64 models loaded through the real loading path (on ``--device``)."""

from __future__ import annotations

import inspect

import pytest
import torch

from dsi_mpi.backends import Cancelled, load_backend
from dsi_mpi.backends.base import ContextRunner
from dsi_mpi.backends.hf import cache_keyword, load_config, resolve_dtype
from dsi_mpi.verify import SamplingParams
from tests.engines import ENGINES, load_engine

GREEDY = SamplingParams()
PROMPT = [5, 17, 42, 8, 99, 3, 250]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_incremental_forwards_match_one_full_forward(tiny_suite: dict[str, str], arch: str,
                                                     engine: str, device: str) -> None:
    backend = load_engine(tiny_suite[arch], engine, device)
    assert backend.model.dtype == torch.float64
    full = backend.forward(PROMPT, GREEDY).tokens.tolist()
    backend.reset()
    pieces = backend.forward(PROMPT[:3], GREEDY).tokens.tolist()
    pieces += backend.forward(PROMPT[3:4], GREEDY).tokens.tolist()
    pieces += backend.forward(PROMPT[4:], GREEDY).tokens.tolist()
    assert pieces == full
    # Rollback then a different continuation equals a fresh run of that sequence.
    backend.crop(2)
    rolled = backend.forward([7, 7, 7], GREEDY).tokens.tolist()
    backend.reset()
    assert backend.forward(PROMPT[:2] + [7, 7, 7], GREEDY).tokens[2:].tolist() == rolled


@pytest.mark.parametrize("engine", ["eager", "static"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_cancel_between_layers_leaves_no_trace(tiny_suite: dict[str, str], arch: str,
                                               engine: str, device: str) -> None:
    backend = load_engine(tiny_suite[arch], engine, device)
    runner = ContextRunner(backend)
    runner.run(PROMPT, GREEDY)
    assert backend.cached_length() == len(PROMPT)
    polls = []

    def cancel_at_second_layer() -> bool:
        polls.append(1)
        return len(polls) >= 3  # before the forward, before layer 0, before layer 1

    with pytest.raises(Cancelled):
        backend.forward([11, 12, 13], GREEDY, should_cancel=cancel_at_second_layer)
    assert len(polls) == 3  # it stopped inside the forward, between decoder layers
    # Every layer is back at the previous length: the next result equals a fresh model's.
    assert {int(layer.get_seq_length()) for layer in backend.cache.layers} == {len(PROMPT)}
    assert backend.cached_length() == len(PROMPT)
    after = backend.forward([20, 21], GREEDY).tokens.tolist()
    fresh = load_backend(tiny_suite[arch], dtype="float64", device=device)
    assert fresh.forward(PROMPT + [20, 21], GREEDY).tokens[-2:].tolist() == after


def test_runner_reuses_the_cached_prefix(tiny_suite: dict[str, str], device: str) -> None:
    backend = load_backend(tiny_suite["llama"], dtype="float64", device=device)
    runner = ContextRunner(backend)
    a = runner.run(PROMPT, GREEDY, num_outputs=2)
    assert (a.first_position, len(a.tokens)) == (len(PROMPT) - 1, 2)
    fed = []
    forward = backend.forward
    backend.forward = (lambda tokens, *args, **kwargs:
                       fed.append(list(tokens)) or forward(tokens, *args, **kwargs))
    b = runner.run(PROMPT[:5] + [1, 2], GREEDY, num_outputs=3)
    # Five positions agree, three outputs are needed: keep 4, feed only the last three tokens.
    assert fed == [[PROMPT[4], 1, 2]]
    assert backend.cached_length() == 7
    fresh = load_backend(tiny_suite["llama"], dtype="float64", device=device)
    assert fresh.forward(PROMPT[:5] + [1, 2], GREEDY).tokens[-3:].tolist() == b.tokens.tolist()


def test_probabilities_are_the_sampling_distribution(tiny_suite: dict[str, str],
                                                     device: str) -> None:
    backend = load_backend(tiny_suite["gpt2"], dtype="float64", device=device)
    params = SamplingParams(temperature=0.8, top_k=20, seed=1)
    out = backend.forward(PROMPT, params, num_outputs=2, want_probs=True)
    assert out.probs.shape == (2, backend.vocab_size)
    assert abs(out.probs.sum(axis=1) - 1).max() < 1e-9
    assert ((out.probs > 0).sum(axis=1) == 20).all()
    assert all(out.probs[i, t] > 0 for i, t in enumerate(out.tokens))


def test_bad_path_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(str(tmp_path / "no-such-model"))


def test_dtype_resolution() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", "cpu")


def test_the_cache_goes_by_the_keyword_the_forward_takes(tiny_suite: dict[str, str],
                                                         device: str) -> None:
    """transformers 5.17 (the GPU machine's) takes past_key_values=, 5.24 cache=; the other name
    would vanish into **kwargs and the model would run without its cache."""

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return None

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, **kwargs):
            return None

    assert (cache_keyword(Old()), cache_keyword(New())) == ("past_key_values", "cache")
    backend = load_backend(tiny_suite["llama"], dtype="float64", device=device)
    assert backend.engine.cache_keyword in inspect.signature(backend.model.forward).parameters



@pytest.mark.parametrize("engine", ENGINES)
def test_sliding_window_rollback_is_exact_past_the_window(tiny_suite: dict[str, str],
                                                          engine: str, device: str) -> None:
    """Gemma 3's sliding-window layers: the cache transformers builds by default keeps only the
    window and cannot roll back past it; ours keeps every position (the attention mask keeps the
    window), gives the default cache's logits, and crops exactly at any length (the static
    engine's full-length static layers likewise: transformers' static sliding layer is not
    croppable past the window either)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from dsi_mpi.tiny import SLIDING_WINDOW

    backend = load_engine(tiny_suite["gemma3"], engine, device)
    model = backend.model
    assert "sliding_attention" in model.config.layer_types
    assert model.config.sliding_window == SLIDING_WINDOW
    ids = list(range(5, 5 + 3 * SLIDING_WINDOW))  # [1, 24]: three windows long

    def full(context: list[int]) -> torch.Tensor:  # no cache at all: the model's own masks
        with torch.inference_mode():
            ids_ = torch.tensor([context], device=device)
            return model(input_ids=ids_, use_cache=False).logits[0]

    default = DynamicCache(config=model.config)
    assert any(isinstance(layer, DynamicSlidingWindowLayer) for layer in default.layers)
    with torch.inference_mode():
        ours = model(input_ids=torch.tensor([ids], device=device), use_cache=True,
                     **{cache_keyword(model): default}).logits[0]
    with pytest.raises(RuntimeError, match="sliding window"):  # what a rollback would meet
        for layer in default.layers:
            layer.crop(-3)

    logits = backend.forward_logits(ids)
    assert torch.allclose(logits, ours, rtol=0, atol=1e-10)
    assert torch.allclose(logits, full(ids), rtol=0, atol=1e-10)
    # Roll back past the window, several times, and go on: always the full forward's logits.
    for keep, extra in ((2 * SLIDING_WINDOW + 1, [7, 8, 9]), (SLIDING_WINDOW - 2, [3] * 20),
                        (2 * SLIDING_WINDOW + 3, [11, 12])):
        assert keep < backend.cached_length() == len(ids)
        backend.crop(keep)
        ids = ids[:keep] + extra
        got = backend.forward_logits(extra)
        assert torch.allclose(got, full(ids)[keep:], rtol=0, atol=1e-10), keep


@pytest.mark.parametrize("engine", ENGINES)
def test_sliding_window_decoding_equals_generate(tiny_suite: dict[str, str], engine: str,
                                                 device: str) -> None:
    """Decoding far past the window with rollbacks (SI with a drafter that is often wrong)
    equals ``generate``, which decodes with the default sliding-window cache."""
    from transformers import AutoModelForCausalLM

    from dsi_mpi.reference import generate_nonsi, generate_si

    target = load_engine(tiny_suite["gemma3"], engine, device)
    drafter = load_engine(tiny_suite["gemma3/perturbed"], engine, device)
    model = AutoModelForCausalLM.from_pretrained(tiny_suite["gemma3"], dtype=torch.float64)
    with torch.inference_mode():
        out = model.to(device).generate(torch.tensor([PROMPT], device=device), max_new_tokens=40,
                                        do_sample=False)
    expected = out[0, len(PROMPT):].tolist()
    assert generate_nonsi(target, PROMPT, 40, GREEDY).tokens == expected
    gen = generate_si(target, drafter, PROMPT, 40, 4, GREEDY)
    assert gen.tokens == expected and gen.counters.rejected > 0
