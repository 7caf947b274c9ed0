"""The CUDA-graph engine: the static engine's short forwards replayed as captured CUDA graphs.

A forward of a small model in eager PyTorch is a thousand kernel launches from Python; on a
GPU the launches, not the weights, set its time. Replaying a captured graph launches them all
at once. The engine keeps everything a graph reads or writes at fixed addresses: the static
cache (``static.py``, one for the rank's life) and, per block length ``m``, a few buffers
(token ids in, hidden states between segments, logits out). Block lengths ``1 .. max_block``
(lookahead + 1: every drafter step and verification block) each get their graphs at
start-up; a longer block (a prefill) runs eagerly on the same cache.

A forward is ``G`` graph segments replayed one after the other (``--graph-segments``):

- ``G = 1``: the model's own forward in one graph (any model);
- ``G > 1``: segment 0 is the embedding, the positions, the mask and the first group of decoder
  layers; the last ends with the final norm and the head (Llama-layout decoders, written out
  in :func:`llama_segments`).

Between two replays the rank probes for CANCEL and the gate keeps the CPU at most ``W``
segments ahead of the GPU (``gate.py``, segment ``s`` in the place of layer ``s``), so a CANCEL
leaves the GPU idle within ``W`` segments. A CANCEL in the middle takes back only the layers
whose segments were replayed (their length counters, decremented on the device).

Capture is a :class:`Capturer`: :class:`CudaCapturer` on a GPU (``torch.cuda.graph`` into one
memory pool shared by every graph of the model, after warm-up runs on the capture stream, as
transformers' continuous batching does). CUDA graphs cannot be captured on a CPU; the unit
tests hand the engine a capturer whose "graph" runs the segment again eagerly over the same
buffers, which checks the buffers, the segment split, the cancellation and the capture count,
but not CUDA itself: that runs only on a GPU (``bench/gpu_check.sh``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch

from dsi_mpi.backends.choice import EngineOptions, graph_refusal
from dsi_mpi.backends.gate import LayerGate
from dsi_mpi.backends.static import StaticEngine

Buffers = dict  # name -> tensor (or None): a block length's static buffers


class Graph(Protocol):
    def replay(self) -> None: ...


class Capturer(Protocol):
    """Records what a function launches so that it can be replayed (a CUDA graph)."""

    warmups: int  # eager runs before a capture

    def warmup(self, run: Callable[[], None]) -> None:
        """Run ``run`` once eagerly where the capture will happen."""

    def capture(self, run: Callable[[], None]) -> Graph:
        """A graph of what ``run`` launches (a real capture executes nothing)."""


class CudaCapturer:
    """CUDA graphs on one device, every graph of the model in one memory pool."""

    warmups = 2

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()

    def warmup(self, run: Callable[[], None]) -> None:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            run()
        current.wait_stream(self.stream)

    def capture(self, run: Callable[[], None]) -> Graph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream,
                              capture_error_mode="thread_local"):
            run()
        return graph


def cuda_capturer(device: torch.device) -> Capturer:
    if device.type != "cuda":
        raise ValueError(f"--engine cudagraph needs a CUDA device, got {device}")
    return CudaCapturer(device)


@dataclass
class BlockGraphs:
    """The graphs of one block length and the static buffers they read and write."""

    buffers: Buffers
    graphs: list[Graph] = field(default_factory=list)
    layers: list[range] = field(default_factory=list)  # decoder layers each segment writes


def _put(buffers: Buffers, name: str, value: torch.Tensor) -> None:
    """Keep ``value`` in the block's buffer ``name``: allocated at the first (eager) run, copied
    into at every later one, so captured graphs write it at a fixed address."""
    if name not in buffers:
        buffers[name] = value.clone()
    else:
        buffers[name].copy_(value)


def _call(fn: Callable, cache_keyword: str, cache: Any, positions: torch.Tensor | None,
          *args, **kwargs):
    """``fn`` with the cache (and, before 5.2x, the cache positions) in the keywords it takes."""
    params = inspect.signature(fn).parameters
    keyword = "cache" if "cache" in params else cache_keyword
    kwargs[keyword] = cache
    if positions is not None and "cache_position" in params:
        kwargs["cache_position"] = positions
    return fn(*args, **kwargs)


def split_layers(num_layers: int, segments: int) -> list[range]:
    """``segments`` consecutive groups of decoder layers, as even as they come (at most one
    group per layer)."""
    g = max(1, min(segments, num_layers))
    cuts = [round(num_layers * j / g) for j in range(g + 1)]
    return [range(cuts[j], cuts[j + 1]) for j in range(g)]


def _layer_types(config: object, num_layers: int) -> list[str]:
    return list(getattr(config, "layer_types", None) or ["full_attention"] * num_layers)


def block_masks(config: object, cache: Any, cache_keyword: str, like: torch.Tensor,
                position_ids: torch.Tensor, positions: torch.Tensor | None) -> dict:
    """The attention mask of each layer type (full, sliding window) for a block shaped like
    ``like`` (``[1, m, ...]``), always as a tensor: transformers may drop the mask for SDPA's
    ``is_causal``, deciding from the cache's length on the host (a device sync, and a
    decision a graph would freeze), which ``allow_is_causal_skip=False`` rules out."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    types = set(_layer_types(config, len(cache.layers)))
    masks = {}
    for kind, make in (("full_attention", create_causal_mask),
                       ("sliding_attention", create_sliding_window_causal_mask)):
        if kind in types:
            masks[kind] = _call(make, cache_keyword, cache, positions, config=config,
                                inputs_embeds=like, attention_mask=None,
                                position_ids=position_ids, allow_is_causal_skip=False)
    return masks


def _position_ids(b: Buffers, cache: Any) -> torch.Tensor:
    """``[1, m]``: from the buffer (before 5.2x) or the layers' length counter on the device."""
    positions = b.get("positions")
    if positions is not None:
        return positions[None]
    m = b["ids"].shape[1]
    return (torch.arange(m, device=b["ids"].device) + cache.layers[0].cumulative_length)[None]


def whole_forward(model: torch.nn.Module, cache: Any, cache_keyword: str
                  ) -> Callable[[Buffers], None]:
    """The model's own forward over the block's buffers (G = 1, any architecture), its masks
    made here so that none is left to a host-side decision."""
    def run(b: Buffers) -> None:
        position_ids = _position_ids(b, cache)
        like = b.setdefault("like", torch.zeros((1, b["ids"].shape[1], 1), dtype=model.dtype,
                                                device=b["ids"].device))
        masks = block_masks(model.config, cache, cache_keyword, like, position_ids,
                            b.get("positions"))
        mask = masks if len(masks) > 1 else next(iter(masks.values()))
        kwargs = {cache_keyword: cache}
        if "positions" in b:
            kwargs["cache_position"] = b["positions"]
        out = model(input_ids=b["ids"], attention_mask=mask, position_ids=position_ids,
                    use_cache=True, **kwargs)
        _put(b, "logits", out.logits)  # [1, m, vocab]
    return run


def llama_segments(model: torch.nn.Module, cache: Any, cache_keyword: str,
                   groups: list[range]) -> list[Callable[[Buffers], None]]:
    """The forward of a Llama-layout decoder (Llama, Mistral, Qwen2/3) as one function per
    group of decoder layers, the first with the embedding, positions and masks, the last with
    the norm and head, handing hidden states on through the block's buffers."""
    inner, config = model.model, model.config
    types = _layer_types(config, len(inner.layers))

    def prefix(b: Buffers) -> None:
        hidden = inner.embed_tokens(b["ids"])  # [1, m, hidden]
        position_ids = _position_ids(b, cache)
        masks = block_masks(config, cache, cache_keyword, hidden, position_ids,
                            b.get("positions"))
        for kind, mask in masks.items():
            _put(b, kind, mask)
        cos, sin = inner.rotary_emb(hidden, position_ids=position_ids)
        _put(b, "position_ids", position_ids)
        _put(b, "cos", cos)
        _put(b, "sin", sin)
        _put(b, "hidden", hidden)

    def layers(group: range) -> Callable[[Buffers], None]:
        def run(b: Buffers) -> None:
            hidden = b["hidden"]
            for i in group:
                hidden = _call(inner.layers[i], cache_keyword, cache, b.get("positions"), hidden,
                               attention_mask=b[types[i]], position_ids=b["position_ids"],
                               position_embeddings=(b["cos"], b["sin"]), use_cache=True)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            b["hidden"].copy_(hidden)
        return run

    def head(b: Buffers) -> None:
        _put(b, "logits", model.lm_head(inner.norm(b["hidden"])))  # [1, m, vocab]

    def chain(*steps: Callable[[Buffers], None]) -> Callable[[Buffers], None]:
        def run(b: Buffers) -> None:
            for step in steps:
                step(b)
        return run

    runs = [layers(group) for group in groups]
    # The embedding and masks open the first segment, the norm and head close the last.
    runs[0] = chain(prefix, runs[0])
    runs[-1] = chain(runs[-1], head)
    return runs


def _run_all(runs: Sequence[Callable[[Buffers], None]], buffers: Buffers) -> None:
    for run in runs:
        run(buffers)


class GraphEngine(StaticEngine):
    """The static engine with blocks of ``1 .. max_block`` tokens replayed as CUDA graphs."""

    name = "cudagraph"

    def __init__(self, model: torch.nn.Module, device: torch.device, gate: LayerGate,
                 cache_keyword: str, options: EngineOptions, capturer: Capturer) -> None:
        super().__init__(model, device, gate, cache_keyword, options.capacity)
        refusal = graph_refusal(getattr(model.config, "model_type", None), options.segments)
        if refusal:
            raise ValueError(refusal)
        self.max_block = options.max_block
        self.segments = options.segments
        self.capturer = capturer
        self.captures = 0  # graphs captured over the rank's life (one set per block length)
        self._blocks: dict[int, BlockGraphs] = {}
        self._groups = split_layers(len(self.cache.layers), self.segments)

    def prepare(self) -> None:
        """Capture every block length's graphs now (start-up), not at its first forward."""
        for m in range(1, self.max_block + 1):
            self._graphs(m)

    def on_new_cache(self) -> None:
        self._blocks.clear()  # the graphs wrote the old cache's addresses

    def logits(self, tokens: Sequence[int], num_outputs: int | None = None,
               should_cancel: Callable[[], bool] | None = None) -> torch.Tensor:
        m = len(tokens)
        if not 1 <= m <= self.max_block:
            return super().logits(tokens, num_outputs, should_cancel)  # prefill: eager
        start = self.length
        n = m if num_outputs is None else min(num_outputs, m)
        self.reserve(start + m)
        block = self._graphs(m)
        block.buffers["ids"].copy_(torch.as_tensor(list(tokens), dtype=torch.long).view(1, m))
        if "positions" in block.buffers:
            block.buffers["positions"].copy_(self._positions(start, m))
        ran = 0  # segments replayed: what a cancel takes back
        with self.gate.forward(should_cancel, lambda: self._take_back(block.layers[:ran], m)):
            with torch.inference_mode():
                for s, graph in enumerate(block.graphs):
                    self.gate.before_layer(s)  # probe for CANCEL; bounded run-ahead
                    with self.gate.quiet():
                        graph.replay()
                    ran = s + 1
                    self.gate.after_layer(s)
        self.length = start + m
        return block.buffers["logits"][0, -n:, :].clone()  # the next replay overwrites it

    # ------------------------------------------------------------------ capture

    def _positions(self, start: int, m: int) -> torch.Tensor:
        return torch.arange(start, start + m, device=self.device)  # [m]

    def _take_back(self, groups: Sequence[range], m: int) -> None:
        """Undo the ``m`` positions the layers of the replayed segments wrote."""
        with torch.inference_mode():
            counters = [self.cache.layers[i].cumulative_length for g in groups for i in g
                        if isinstance(getattr(self.cache.layers[i], "cumulative_length", None),
                                      torch.Tensor)]
            if counters:
                torch._foreach_sub_(counters, m)

    def _graphs(self, m: int) -> BlockGraphs:
        block = self._blocks.get(m)
        if block is None:
            block = self._blocks[m] = self._capture(m)
        return block

    def _capture(self, m: int) -> BlockGraphs:
        """Warm up, then capture, the segments of a block of ``m`` tokens at the current
        length (a capture writes nothing; each warm-up run is taken back)."""
        start = self.length
        self.reserve(start + m)
        buffers: Buffers = {"ids": torch.zeros((1, m), dtype=torch.long, device=self.device)}
        if self.positional:
            buffers["positions"] = self._positions(start, m)
        runs, groups = self._segment_runs()
        with torch.inference_mode():
            for _ in range(max(1, self.capturer.warmups)):  # also allocates the buffers
                self.capturer.warmup(lambda: _run_all(runs, buffers))
                self.rewind(start)
            graphs = [self.capturer.capture(partial(run, buffers)) for run in runs]
        self.captures += len(graphs)
        return BlockGraphs(buffers, graphs, groups)

    def _segment_runs(self) -> tuple[list[Callable[[Buffers], None]], list[range]]:
        if self.segments == 1:
            return ([whole_forward(self.model, self.cache, self.cache_keyword)],
                    [range(len(self.cache.layers))])
        return (llama_segments(self.model, self.cache, self.cache_keyword, self._groups),
                self._groups)
