"""Hugging Face backend: any ``AutoModelForCausalLM``, its KV cache rolled back exactly.

A model is a local folder, a hub id or a ``.gguf`` file (converted once to a cached folder,
see ``gguf.py``). ``layers=N`` keeps the first N decoder layers of the model: the
self-drafter ``self:layers=N`` (early-exit self-speculation), whose KV cache has N layers.

How the forwards run and where the cache lives is the engine's (``engine.py``): ``eager``, a
croppable ``DynamicCache`` and the model's own forward; ``static``, one ``StaticCache`` for
the rank's life (``static.py``); ``cudagraph``, the static engine replayed as CUDA graphs
(``graphs.py``). Cancellation is checked by forward pre-hooks on the decoder layers (between
graph segments, for cudagraph), so a stale forward stops within one layer's time; the partly
updated cache is then put back at its previous length.

Written against transformers 5.x: the cache is passed as ``cache=`` and its ``crop`` takes
the (negative) number of tokens to remove. Before 5.2x (5.17, for one) the cache goes as
``past_key_values=`` (:func:`cache_keyword`). The hooks belong to the gate of ``gate.py``,
which on a GPU also keeps the CPU at most W layers ahead of the GPU, so that "between layers"
means between layers the GPU has run.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from dsi_mpi.backends import gguf
from dsi_mpi.backends.base import Backend, StepOutput
from dsi_mpi.backends.choice import EngineOptions, resolve_engine
from dsi_mpi.backends.engine import EagerEngine, Engine
from dsi_mpi.backends.gate import LayerGate
from dsi_mpi.backends.logits import distributions, select_tokens
from dsi_mpi.backends.static import StaticEngine
from dsi_mpi.verify import SamplingParams

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU and float32 on a CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; choose auto or one of {sorted(DTYPES)}") from None


def context_length(config: object) -> int | None:
    """The model's maximum number of positions, where its config states one."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def eos_ids(model_or_config: object) -> frozenset[int]:
    """End-of-sequence ids as ``generate`` uses them: the generation config first."""
    gen = getattr(model_or_config, "generation_config", None)
    value = getattr(gen, "eos_token_id", None) if gen is not None else None
    if value is None:
        config = getattr(model_or_config, "config", model_or_config)
        value = getattr(config, "eos_token_id", None)
    if value is None:
        return frozenset()
    return frozenset([value] if isinstance(value, int) else value)


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword the model's forward takes its cache by: ``cache`` from transformers 5.2x on,
    ``past_key_values`` before (5.17). A wrong keyword is swallowed by ``**kwargs`` and the
    model silently runs without the cache."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of decoder layers (``model.layers`` for Llama, ``transformer.h`` for GPT-2)."""
    n = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} decoder layers of {type(model).__name__}")


def keep_first_layers(model: torch.nn.Module, n: int) -> None:
    """Keep the embedding, the first ``n`` decoder layers, the final norm and the head.

    The config follows (``num_hidden_layers``, and every per-layer list such as
    ``layer_types``), so the forward loop and a ``DynamicCache`` built from it see n layers.
    """
    config = model.config
    total = int(config.num_hidden_layers)
    if not 1 <= n <= total:
        raise ValueError(f"self:layers={n} is out of range: the target has {total} decoder "
                         f"layers (1..{total})")
    del _decoder_layers(model)[n:]
    for name, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == total and name != "architectures":
            setattr(config, name, type(value)(value[:n]))
    config.num_hidden_layers = n


def croppable_cache(config: object):  # a transformers DynamicCache
    """A ``DynamicCache`` whose every layer rolls back exactly.

    transformers gives a sliding-window layer (Gemma 3, Mistral, chunked attention) a cache
    that keeps only the last ``window - 1`` positions, so once a sequence outgrows the window a
    crop cannot bring back what was dropped (it raises). Such a layer gets a plain full-length
    layer here: the model's attention mask, built from absolute positions, still limits the
    layer to its window, so the output is the same, and a crop is exact at any length. The
    cost is memory: the layer keeps every position, as a full-attention layer does. A layer
    that cannot be cropped at all (recurrent state) is refused.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    cache = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicSlidingWindowLayer:  # not its subclasses with recurrent state
            cache.layers[i] = DynamicLayer()
        elif not getattr(layer, "is_croppable", False):
            raise ValueError(f"layer {i} of this model keeps a {type(layer).__name__} cache, "
                             "which cannot be rolled back: speculative decoding needs a "
                             "croppable KV cache")
    return cache


def tp_config(tp_size: int) -> object:
    """What ``from_pretrained`` takes for ``tp_size``-way tensor parallelism: a
    ``DistributedConfig`` (transformers 5.2x)."""
    from transformers.distributed import DistributedConfig

    return DistributedConfig(tp_size=tp_size)


def pretrained_path(spec: str) -> str:
    """What ``from_pretrained`` loads for a spec: a GGUF file's converted folder, else the spec."""
    return gguf.convert(spec) if gguf.is_gguf(spec) else spec


class HFBackend(Backend):
    """A causal LM from a local path, hub id or GGUF file, one sequence, KV cache kept across
    calls; with ``layers``, only its first decoder layers (a self-drafter). ``engine`` picks how
    its forwards run (``engine.py``: eager, static or cudagraph; auto by device)."""

    def __init__(self, name_or_path: str, dtype: str = "auto", device: str = "cpu",
                 layers: int | None = None, engine: EngineOptions | str = "eager",
                 tp_size: int = 1) -> None:
        from transformers import AutoModelForCausalLM

        options = engine if isinstance(engine, EngineOptions) else EngineOptions(kind=engine)
        kind = resolve_engine(options.kind, device)  # refuses cudagraph off CUDA before loading
        # tp_size > 1: this rank's shard of a tensor-parallel model, whose torch.distributed
        # world (its server's ranks) exists already (dsi_mpi/servergroup.py).
        sharded = {"distributed_config": tp_config(tp_size)} if tp_size > 1 else {}
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(
            pretrained_path(name_or_path), dtype=resolve_dtype(dtype, device), **sharded
        )
        if layers is not None:
            keep_first_layers(self.model, layers)
        if not sharded:  # transformers placed the shards on LOCAL_RANK's device
            self.model.to(self.device)
        self.model.eval()
        self.config = self.model.config
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.eos_token_ids = eos_ids(self.model)
        self.max_positions = context_length(self.config)
        if options.capacity and self.max_positions:  # the run's longest sequence, capped
            options = replace(options, capacity=min(options.capacity, self.max_positions))
        gate = LayerGate.for_device(self.device)  # DSI_MPI_GATE: window, hook or sync
        gate.install(_decoder_layers(self.model))
        self.engine = make_engine(kind, self.model, self.device, gate, options)

    @property
    def cache(self):  # the engine's transformers Cache
        return self.engine.cache

    @property
    def gate(self) -> LayerGate:
        return self.engine.gate

    @gate.setter
    def gate(self, gate: LayerGate) -> None:  # another gate in the installed one's place
        self.engine.gate = gate

    def cached_length(self) -> int:
        return self.engine.cached_length()

    def crop(self, length: int) -> None:
        self.engine.crop(length)

    def forward(
        self,
        tokens: Sequence[int],
        params: SamplingParams,
        num_outputs: int | None = None,
        want_probs: bool = False,
        should_cancel: Callable[[], bool] | None = None,
    ) -> StepOutput:
        start = self.cached_length()
        logits = self.forward_logits(tokens, num_outputs, should_cancel)  # [n, vocab]
        first = start + len(tokens) - logits.shape[0] + 1  # logits[i] predicts this position + i
        probs = distributions(logits, params).numpy() if want_probs else None
        tokens_out = select_tokens(logits, first, params)
        return StepOutput(first_position=first, tokens=tokens_out, probs=probs)

    def forward_logits(self, tokens: Sequence[int], num_outputs: int | None = None,
                       should_cancel: Callable[[], bool] | None = None) -> torch.Tensor:
        """:meth:`forward`'s logits for the last ``num_outputs`` positions, ``[n, vocab]``, on the
        model's device (a translating drafter selects its tokens from them itself)."""
        if not tokens:
            raise ValueError("forward needs at least one token")
        return self.engine.logits(tokens, num_outputs, should_cancel)


def make_engine(kind: str, model: torch.nn.Module, device: torch.device, gate: LayerGate,
                options: EngineOptions) -> Engine:
    """The engine ``kind`` (resolved: eager, static or cudagraph) over a loaded model."""
    keyword = cache_keyword(model)
    if kind == "eager":
        return EagerEngine(model, device, gate, keyword)
    if kind == "static":
        return StaticEngine(model, device, gate, keyword, options.capacity)
    from dsi_mpi.backends.graphs import GraphEngine, cuda_capturer

    engine = GraphEngine(model, device, gate, keyword, options, cuda_capturer(device))
    engine.prepare()  # every block length's graphs, at start-up
    return engine


def load_tokenizer(name_or_path: str):  # a transformers tokenizer or None
    """The model's tokenizer, or None when it ships none (token ids only)."""
    from transformers import AutoTokenizer

    path, kwargs = _config_source(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError):
        return None


def _config_source(spec: str) -> tuple[str, dict]:
    """Where configs and tokenizers are read: a GGUF's converted folder once it exists, else
    the GGUF file itself (its header), so preflight needs no conversion to check it."""
    if gguf.is_gguf(spec) and not gguf.is_converted(spec):
        folder, name = os.path.split(os.path.abspath(spec))
        return folder, {"gguf_file": name}
    return pretrained_path(spec), {}


def load_config(name_or_path: str):  # a transformers PretrainedConfig
    """The model's config without its weights: what rank 0 checks before any compute.

    Raises FileNotFoundError for a missing model and ValueError for a GGUF file transformers
    cannot read."""
    from transformers import AutoConfig, GenerationConfig

    if gguf.is_gguf(name_or_path) and not gguf.is_converted(name_or_path):
        config = gguf.read_config(name_or_path)
        config.generation_config = None  # eos_ids() then reads the config's own
        return config
    name_or_path = pretrained_path(name_or_path)
    # Only a path can start so; "org/name" is a hub id unless such a folder exists.
    is_path = name_or_path.startswith((os.path.sep, ".", "~"))
    if is_path and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(
            f"model path {name_or_path!r} does not exist; pass a directory made by "
            "save_pretrained, a hub id, or an emulated: spec"
        )
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as exc:
        raise FileNotFoundError(
            f"cannot load a model config from {name_or_path!r} ({exc.__class__.__name__}); pass a "
            "local directory made by save_pretrained, a reachable hub id, or an emulated: spec"
        ) from None
    try:
        config.generation_config = GenerationConfig.from_pretrained(name_or_path)
    except OSError:
        config.generation_config = None
    return config

