"""The static engine: one ``StaticCache`` for the rank's life, its length counted on the host.

The cache is allocated once, for the longest sequence the run makes (longest prompt +
``max_new_tokens`` + run-ahead + lookahead + 1, capped by the model's context), and kept: a
new cache object means new addresses, and new CUDA graphs (``graphs.py``). transformers 5.25's
``StaticLayer`` writes a new block at ``cumulative_length`` (a 0-d tensor on the device), and
its attention mask hides every slot at or past it, so:

- the cached length is counted here, on the host: learning it never waits for the device;
- a rollback is a length decrement (one ``_foreach_sub_`` over the layers' counters), never a
  copy: stale keys and values above the new length are masked and overwritten by the next
  write;
- a cancelled forward (the gate's probe raised between two decoder layers, some layers written)
  sets every layer's counter back to the starting length.

A sliding-window layer (Gemma 3, Mistral) gets a full-length ``StaticLayer``, as
``croppable_cache`` does for the dynamic cache: transformers' ``StaticSlidingWindowLayer`` keeps
only the window and cannot roll back past it, while the sliding-window mask, built from absolute
positions, limits a full-length layer to its window all the same (``masking_utils``
``sliding_window_causal_mask_function``: ``kv_idx > q_idx - window``).

A sequence longer than the capacity grows the cache (a copy of what is cached, counted in
``growths``); a run sized right never grows.

Before transformers 5.2x (5.17) the static layers wrote at a ``cache_position`` the caller
passes: where the forward takes one, the positions are passed from the host counter.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch

from dsi_mpi.backends.base import Cancelled
from dsi_mpi.backends.gate import LayerGate

DEFAULT_CAPACITY = 512  # positions, when the run does not say (grown on demand)


class Visible:
    """How many slots of a static cache attention reads: all (None, fixed shapes for a CUDA
    graph) or the first ``n``, the length the host knows the cache will have after the
    forward. Slots past it are masked anyway; not reading them keeps an eager forward's
    attention (and transformers' GQA head expansion, a copy of every slot read) as long as
    the dynamic cache's instead of the capacity's."""

    n: int | None = None


def bounded_layer(capacity: int, visible: Visible):  # a transformers StaticLayer
    """A ``StaticLayer`` of ``capacity`` slots whose attention reads ``visible.n`` of them."""
    from transformers.cache_utils import StaticLayer

    class BoundedStaticLayer(StaticLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            n = visible.n
            return (keys, values) if n is None else (keys[:, :, :n], values[:, :, :n])

        def get_mask_sizes(self, *args, **kwargs):
            kv_length, kv_offset = super().get_mask_sizes(*args, **kwargs)
            return (kv_length if visible.n is None else visible.n), kv_offset

    return BoundedStaticLayer(max_cache_len=capacity)


def static_cache(config: object, capacity: int, visible: Visible | None = None):
    """A transformers ``StaticCache`` of ``capacity`` positions whose every layer rolls back
    exactly (a sliding-window layer becomes a full-length one) and reads ``visible.n`` slots;
    a layer of another kind is refused."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    visible = visible or Visible()
    cache = StaticCache(config=config, max_cache_len=capacity)
    for i, layer in enumerate(cache.layers):
        if type(layer) not in (StaticLayer, StaticSlidingWindowLayer):
            raise ValueError(f"layer {i} of this model keeps a {type(layer).__name__} cache, "
                             "which the static engine cannot roll back: use --engine eager")
        cache.layers[i] = bounded_layer(capacity, visible)
    return cache


class StaticEngine:
    """A ``StaticCache`` kept for the rank's life, the model's own forward, the gate between
    decoder layers."""

    name = "static"

    def __init__(self, model: torch.nn.Module, device: torch.device, gate: LayerGate,
                 cache_keyword: str, capacity: int | None = None) -> None:
        self.model = model
        self.device = device
        self.gate = gate
        self.cache_keyword = cache_keyword
        self.capacity = capacity or DEFAULT_CAPACITY
        self.visible = Visible()  # eager forwards read the slots in use, graphs all of them
        self.cache = static_cache(model.config, self.capacity, self.visible)
        self.length = 0  # positions cached, counted here (the device holds the same per layer)
        self.growths = 0  # times a sequence outgrew the cache (a new cache, a copy)
        # Before 5.2x the caller passes the positions a block is written at.
        self.positional = "cache_position" in inspect.signature(model.forward).parameters

    def cached_length(self) -> int:
        return self.length

    def crop(self, length: int) -> None:
        if length < self.length:
            with torch.inference_mode():
                counters = self._counters()
                if counters:
                    torch._foreach_sub_(counters, self.length - length)
            self.length = length

    def logits(self, tokens: Sequence[int], num_outputs: int | None = None,
               should_cancel: Callable[[], bool] | None = None) -> torch.Tensor:
        if not tokens:
            raise ValueError("forward needs at least one token")
        start, m = self.length, len(tokens)
        n = m if num_outputs is None else min(num_outputs, m)
        self.reserve(start + m)
        input_ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)  # [1, m]
        self.visible.n = start + m
        try:
            with self.gate.forward(should_cancel, lambda: self.rewind(start)):
                if should_cancel is not None and should_cancel():
                    raise Cancelled()
                with torch.inference_mode():
                    out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=n,
                                     **self.cache_kwargs(start, m))
        finally:
            self.visible.n = None
        self.length = start + m
        return out.logits[0, -n:, :]

    # ------------------------------------------------------------------ the cache

    def cache_kwargs(self, start: int, m: int) -> dict:
        """The forward's cache arguments for a block of ``m`` tokens at ``start``."""
        kwargs: dict = {self.cache_keyword: self.cache}
        if self.positional:
            positions = torch.arange(start, start + m, device=self.device)  # [m]
            kwargs.update(cache_position=positions, position_ids=positions[None])
        return kwargs

    def _counters(self) -> list[torch.Tensor]:
        """Each initialized layer's length counter on the device (5.2x's StaticLayer)."""
        return [layer.cumulative_length for layer in self.cache.layers
                if getattr(layer, "is_initialized", False)
                and isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]

    def rewind(self, length: int) -> None:
        """Every layer back at ``length``, however far an interrupted forward wrote each."""
        with torch.inference_mode():
            counters = self._counters()
            if counters:
                torch._foreach_zero_(counters)
                torch._foreach_add_(counters, length)
        self.length = length

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` positions: a larger cache holding what is cached (a copy,
        new addresses), where the run's sizing fell short."""
        if needed <= self.capacity:
            return
        old, self.capacity = self.cache, max(needed, 2 * self.capacity)
        self.cache = static_cache(self.model.config, self.capacity, self.visible)
        with torch.inference_mode():
            for was, now in zip(old.layers, self.cache.layers, strict=True):
                if not getattr(was, "is_initialized", False):
                    continue
                now.lazy_initialization(was.keys[:, :, :0], was.values[:, :, :0])
                now.keys[:, :, :self.length].copy_(was.keys[:, :, :self.length])
                now.values[:, :, :self.length].copy_(was.values[:, :, :self.length])
                if isinstance(getattr(now, "cumulative_length", None), torch.Tensor):
                    now.cumulative_length.fill_(self.length)
        self.growths += 1
        self.on_new_cache()

    def on_new_cache(self) -> None:
        """The cache object changed (a subclass drops what it built over the old one)."""
