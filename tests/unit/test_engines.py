"""The engines of the HF backend (``backends/engine.py``, ``static.py``, ``graphs.py``) beyond
the exactness tests every backend test runs on each engine: the static cache's rollback, a
cancelled forward on each, the graph captures counted, a cache that outgrows its size."""

from __future__ import annotations

import pytest
import torch

from dsi_mpi.backends import Cancelled, EngineOptions, load_backend
from dsi_mpi.backends.base import ContextRunner
from dsi_mpi.backends.choice import graph_refusal, resolve_engine
from dsi_mpi.backends.graphs import split_layers
from dsi_mpi.backends.static import static_cache
from dsi_mpi.reference import generate_nonsi, generate_si
from dsi_mpi.verify import SamplingParams
from tests.engines import load_engine, replayed

GREEDY = SamplingParams()
PROMPT = [5, 17, 42, 8, 99, 3, 250]


def test_auto_is_cudagraph_on_cuda_only_and_cudagraph_needs_cuda() -> None:
    assert resolve_engine("auto", "cpu") == "eager"
    assert resolve_engine("auto", "cuda:1") == "cudagraph"
    assert resolve_engine("static", "cuda") == "static"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_engine("cudagraph", "cpu")


def test_cudagraph_on_a_cpu_is_refused_before_the_model_loads(tiny_suite: dict[str, str],
                                                              monkeypatch) -> None:
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match="--engine cudagraph needs a CUDA device"):
        load_backend(tiny_suite["llama"], engine="cudagraph")


def test_segments_beyond_one_need_a_llama_layout() -> None:
    assert graph_refusal("gemma3_text", 1) is None and graph_refusal("llama", 4) is None
    assert "--graph-segments 1" in graph_refusal("gemma3_text", 2)
    assert split_layers(30, 4) == [range(0, 8), range(8, 15), range(15, 22), range(22, 30)]
    assert split_layers(2, 5) == [range(0, 1), range(1, 2)]


def test_the_static_cache_rolls_back_past_a_sliding_window(tiny_suite: dict[str, str]) -> None:
    """transformers' static sliding-window layer keeps only the window and is not croppable
    once the cache is longer; the static engine's cache has a full-length layer there."""
    from transformers import AutoConfig, StaticCache
    from transformers.cache_utils import StaticLayer

    from dsi_mpi.tiny import SLIDING_WINDOW

    config = AutoConfig.from_pretrained(tiny_suite["gemma3"])
    capacity = 3 * SLIDING_WINDOW
    default = StaticCache(config=config, max_cache_len=capacity)
    assert any(layer.is_sliding and not layer.is_croppable for layer in default.layers)
    ours = static_cache(config, capacity)
    assert all(isinstance(layer, StaticLayer) and not layer.is_sliding and layer.is_croppable
               and layer.max_cache_len == capacity for layer in ours.layers)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_static_rollback_is_a_length_decrement(tiny_suite: dict[str, str], arch: str) -> None:
    backend = load_engine(tiny_suite[arch], "static")
    backend.forward(PROMPT, GREEDY)
    keys = [layer.keys for layer in backend.cache.layers]
    before = [k.clone() for k in keys]
    backend.crop(3)
    assert backend.cached_length() == 3
    assert {int(layer.cumulative_length) for layer in backend.cache.layers} == {3}
    assert all(torch.equal(k, b) for k, b in zip(keys, before, strict=True))  # nothing copied
    backend.forward([1, 2], GREEDY)
    assert [layer.keys for layer in backend.cache.layers] == keys  # the same buffers


@pytest.mark.parametrize(("segments", "cancel_at"), [(1, 1), (2, 2)])
def test_a_cancel_between_graph_segments_takes_back_only_what_ran(tiny_suite: dict[str, str],
                                                                  segments: int,
                                                                  cancel_at: int) -> None:
    """Cancelled before the only segment (G = 1) or after the first (G = 2: layer 0 written):
    the cache gives the same next tokens as one never touched."""
    backend = load_engine(tiny_suite["llama"], "cudagraph", segments=segments)
    assert len(backend.engine._graphs(3).graphs) == segments
    ContextRunner(backend).run(PROMPT, GREEDY)
    polls = []

    def cancel() -> bool:
        polls.append(1)
        return len(polls) >= cancel_at

    with pytest.raises(Cancelled):
        backend.forward([11, 12, 13], GREEDY, should_cancel=cancel)
    assert len(polls) == cancel_at  # probed before each segment, and nowhere else
    assert backend.cached_length() == len(PROMPT)
    assert {int(layer.cumulative_length) for layer in backend.cache.layers} == {len(PROMPT)}
    after = backend.forward([20, 21], GREEDY).tokens.tolist()
    fresh = load_engine(tiny_suite["llama"], "eager")
    assert fresh.forward(PROMPT + [20, 21], GREEDY).tokens[-2:].tolist() == after


def test_graph_captures_do_not_grow_across_prompts(tiny_suite: dict[str, str]) -> None:
    """Every block length is captured once at start-up; prompts, rollbacks and resets replay
    those graphs (the cache is never replaced), and the output is the eager engine's."""
    eager_t, eager_d = (load_engine(tiny_suite[s], "eager") for s in ("llama", "llama/perturbed"))
    target = load_engine(tiny_suite["llama"], "cudagraph", segments=2, max_block=4)
    drafter = load_engine(tiny_suite["llama/perturbed"], "cudagraph", max_block=4)
    assert (target.engine.captures, drafter.engine.captures) == (4 * 2, 4)
    assert target.engine.capturer.captures == 8
    cache, rejected = target.cache, 0
    for prompt in (PROMPT, PROMPT[:3], [9] * 12, PROMPT):
        for t, d in ((target, drafter), (eager_t, eager_d)):
            t.reset()
            d.reset()
        got = generate_si(target, drafter, prompt, 16, 3, GREEDY)
        assert got.tokens == generate_si(eager_t, eager_d, prompt, 16, 3, GREEDY).tokens
        rejected += got.counters.rejected
    assert rejected > 0  # rollbacks happened
    assert (target.engine.captures, drafter.engine.captures) == (8, 4)
    assert target.engine.capturer.captures == 8 and target.cache is cache


@pytest.mark.parametrize("engine", ["static", "cudagraph"])
def test_a_sequence_longer_than_the_cache_grows_it_exactly(tiny_suite: dict[str, str],
                                                           engine: str) -> None:
    backend = load_backend(tiny_suite["llama"], dtype="float64",
                           engine=EngineOptions(kind="static", capacity=9))
    if engine == "cudagraph":
        replayed(backend, EngineOptions(kind="cudagraph", capacity=9, max_block=4))
    expected = generate_nonsi(load_engine(tiny_suite["llama"], "eager"), PROMPT, 20, GREEDY)
    assert generate_nonsi(backend, PROMPT, 20, GREEDY).tokens == expected.tokens
    assert backend.engine.growths >= 1 and backend.engine.capacity >= len(PROMPT) + 20
