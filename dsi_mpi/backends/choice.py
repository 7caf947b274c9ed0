"""Which engine a model rank runs, and what a run asks of it (pure: no torch).

The command line and the run's config check ``--engine`` and ``--graph-segments`` here, before
torch is imported; the engines themselves are in ``engine.py``, ``static.py`` and ``graphs.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

ENGINES = ("auto", "eager", "static", "cudagraph")
GRAPH_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # decoders graphed in segments


@dataclass(frozen=True)
class EngineOptions:
    """What a run asks of its engines (``--engine``, ``--graph-segments``)."""

    kind: str = "auto"  # auto, eager, static or cudagraph
    capacity: int | None = None  # static cache length: longest sequence the run makes (None: 512)
    max_block: int = 8  # cudagraph: block lengths 1..max_block are graphed (lookahead + 1)
    segments: int = 1  # cudagraph: G graphs per forward, CANCEL probed between them

    def __post_init__(self) -> None:
        if self.kind not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {self.kind!r}")
        if self.segments < 1:
            raise ValueError(f"--graph-segments must be >= 1, got {self.segments}")
        if self.max_block < 1:
            raise ValueError(f"the longest graphed block must be >= 1 token, got {self.max_block}")


def resolve_engine(kind: str, device: str) -> str:
    """The engine ``kind`` names on ``device``: ``auto`` is cudagraph on CUDA, eager elsewhere;
    ValueError for a CUDA-graph engine off CUDA."""
    if kind not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {kind!r}")
    on_cuda = str(device).startswith("cuda")
    if kind == "auto":
        return "cudagraph" if on_cuda else "eager"
    if kind == "cudagraph" and not on_cuda:
        raise ValueError(f"--engine cudagraph needs a CUDA device (--device cuda), got "
                         f"--device {device}: use --engine static or eager on a CPU")
    return kind


def graph_refusal(model_type: str | None, segments: int) -> str | None:
    """Why the CUDA-graph engine cannot run a ``model_type`` model in ``segments`` graphs (None:
    it can). One graph (G = 1) replays the model's own forward, any model; G > 1 runs the
    decoder by hand, segment by segment, which is written for the Llama layout."""
    if segments > 1 and model_type not in GRAPH_MODEL_TYPES:
        return (f"--graph-segments {segments} supports {', '.join(GRAPH_MODEL_TYPES)} decoders, "
                f"not {model_type!r}: use --graph-segments 1 (one graph per forward) or "
                "--engine static")
    return None
