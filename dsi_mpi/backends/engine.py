"""How an HF backend runs its model: the engine seam behind :class:`~dsi_mpi.backends.hf.HFBackend`.

An engine owns the model's KV cache and runs its forwards. Three implement one small protocol
(:class:`Engine`): ``cached_length``, ``crop`` and ``logits(tokens, num_outputs,
should_cancel)``, and after :class:`Cancelled` the cache is back at its starting length.

- ``eager`` (:class:`EagerEngine`, here): a croppable ``DynamicCache`` that grows with the
  sequence, and the model's own forward; cancellation is probed by the gate between decoder
  layers (``gate.py``). What the backend always did.
- ``static`` (``static.py``): one ``StaticCache`` allocated once for the run's longest sequence
  and kept for the rank's life; the cached length is counted on the host; a rollback is a
  length decrement, never a copy. The same gate between layers.
- ``cudagraph`` (``graphs.py``): the static engine, with its short forwards (1 .. lookahead + 1
  new tokens) replayed as CUDA graphs captured over static input buffers, as G segments with
  the CANCEL probe (and the gate's run-ahead bound) between segments. CUDA only.

``auto`` is ``cudagraph`` on a CUDA device and ``eager`` elsewhere (``choice.py``: the
choice and its options, torch-free, so a command line is checked before torch loads).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from dsi_mpi.backends.base import Cancelled
from dsi_mpi.backends.gate import LayerGate


class Engine(Protocol):
    """The forward path of one model and its KV cache (one sequence)."""

    name: str  # eager, static or cudagraph: what the records say ran
    cache: Any  # the transformers Cache the forwards append to
    gate: LayerGate  # CANCEL probes and bounded run-ahead between decoder layers

    def cached_length(self) -> int:
        """Positions in the KV cache."""

    def crop(self, length: int) -> None:
        """Keep the first ``length`` cached positions; no-op if already shorter."""

    def logits(self, tokens: Sequence[int], num_outputs: int | None,
               should_cancel: Callable[[], bool] | None) -> torch.Tensor:
        """Append ``tokens``; the logits of the last ``num_outputs`` positions (all: None),
        ``[n, vocab]`` on the model's device. When ``should_cancel`` says so the forward stops,
        the cache is back at its starting length and :class:`Cancelled` is raised."""


class EagerEngine:
    """A croppable ``DynamicCache`` and the model's own forward (the path before engines)."""

    name = "eager"

    def __init__(self, model: torch.nn.Module, device: torch.device, gate: LayerGate,
                 cache_keyword: str) -> None:
        from dsi_mpi.backends.hf import croppable_cache

        self.model = model
        self.device = device
        self.gate = gate
        self.cache_keyword = cache_keyword
        self.cache = croppable_cache(model.config)

    def cached_length(self) -> int:
        return int(self.cache.get_seq_length())

    def crop(self, length: int) -> None:
        # Layer by layer: after an interrupted forward the layers hold different lengths. A
        # negative count removes tokens alike in 5.17 and 5.24 (a positive one was 5.17's
        # deprecated absolute length, an error in 5.24); a layer never reached is skipped.
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", True):
                current = int(layer.get_seq_length())
                if current > length:
                    layer.crop(length - current)

    def logits(self, tokens: Sequence[int], num_outputs: int | None = None,
               should_cancel: Callable[[], bool] | None = None) -> torch.Tensor:
        start = self.cached_length()
        n = len(tokens) if num_outputs is None else min(num_outputs, len(tokens))
        input_ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)  # [1, m]
        with self.gate.forward(should_cancel, lambda: self.crop(start)):
            if should_cancel is not None and should_cancel():
                raise Cancelled()
            with torch.inference_mode():
                out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=n,
                                 **{self.cache_keyword: self.cache})
        return out.logits[0, -n:, :]
