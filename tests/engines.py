"""Every engine of the HF backend, loadable on the device under test (``backends/engine.py``).

CUDA graphs cannot be captured on a CPU: there, ``cudagraph`` is the real :class:`GraphEngine`
(its buffers, segment split, cancellation between segments and capture count) with a capturer
whose "graph" runs its segment again eagerly over the same static buffers, which is what a
replay computes. On a GPU it is the real thing (``--device cuda``).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

from dsi_mpi.backends import EngineOptions, load_backend
from dsi_mpi.backends.hf import HFBackend

ENGINES = ("eager", "static", "cudagraph")


class ReplayCapturer:
    """A CPU stand-in for CUDA-graph capture: a capture records nothing, a replay re-runs."""

    warmups = 1

    def __init__(self) -> None:
        self.captures = 0

    def warmup(self, run: Callable[[], None]) -> None:
        run()

    def capture(self, run: Callable[[], None]) -> SimpleNamespace:
        self.captures += 1
        return SimpleNamespace(replay=run)


def load_engine(spec: str, engine: str, device: str = "cpu", dtype: str = "float64",
                segments: int = 1, max_block: int = 6, **kwargs) -> HFBackend:
    """An HF backend running ``engine`` (eager, static or cudagraph) on ``device``."""
    options = EngineOptions(kind=engine, segments=segments, max_block=max_block)
    if engine != "cudagraph" or device.startswith("cuda"):
        return load_backend(spec, dtype=dtype, device=device, engine=options, **kwargs)
    backend = load_backend(spec, dtype=dtype, device=device, engine="static", **kwargs)
    return replayed(backend, options)


def loadable(engine: str, device: str) -> str:
    """What to ask a loader for: on a CPU, cudagraph loads as static (then :func:`replayed`)."""
    return "static" if engine == "cudagraph" and not device.startswith("cuda") else engine


def replayed(backend: HFBackend, options: EngineOptions | None = None) -> HFBackend:
    """``backend`` (a static engine) with a :class:`GraphEngine` over a
    :class:`ReplayCapturer` in its place, every block length captured."""
    from dsi_mpi.backends.graphs import GraphEngine

    options = options or EngineOptions(kind="cudagraph", max_block=6)
    static = backend.engine
    backend.engine = GraphEngine(backend.model, backend.device, static.gate, static.cache_keyword,
                                 options, ReplayCapturer())
    backend.engine.prepare()
    return backend
