"""Model backends behind one interface (:class:`Backend`): Hugging Face and emulated.

Model specs: ``emulated:...`` (sleep-timed synthetic language), a local folder made by
``save_pretrained``, a hub id, a ``.gguf`` file, and for a drafter ``self:layers=N`` (the
target's own first N decoder layers).
"""

from __future__ import annotations

from dsi_mpi.backends.base import Backend, Cancelled, StepOutput
from dsi_mpi.backends.choice import ENGINES, EngineOptions
from dsi_mpi.backends.emulated import PREFIX as EMULATED_PREFIX
from dsi_mpi.backends.emulated import EmulatedBackend, EmulatedSpec
from dsi_mpi.backends.gguf import is_gguf

__all__ = ["Backend", "Cancelled", "StepOutput", "EmulatedBackend", "EmulatedSpec", "ENGINES",
           "EngineOptions", "is_emulated",
           "is_gguf", "is_self_drafter", "load_backend", "self_drafter_layers"]

SELF_PREFIX = "self:"


def is_emulated(spec: str) -> bool:
    return spec.startswith(EMULATED_PREFIX)


def is_self_drafter(spec: str) -> bool:
    return spec.startswith(SELF_PREFIX)


def self_drafter_layers(spec: str) -> int:
    """N of ``self:layers=N``; ValueError for any other form (the target checks the range)."""
    body = spec[len(SELF_PREFIX):] if is_self_drafter(spec) else ""
    key, _, value = body.partition("=")
    try:
        if key.strip() != "layers":
            raise ValueError
        return int(value)
    except ValueError:
        raise ValueError(f"malformed self-drafter spec {spec!r}: write self:layers=N "
                         "(the target's first N decoder layers)") from None


def load_backend(spec: str, dtype: str = "auto", device: str = "cpu", sleep: bool = True,
                 target: str | None = None, engine: EngineOptions | str = "eager",
                 tp_size: int = 1) -> Backend:
    """A backend from a spec: ``emulated:...``, a local directory, a hub id or a ``.gguf`` file;
    ``self:layers=N`` builds a drafter from ``target``'s spec. ``engine`` (a model's: eager,
    static, cudagraph or auto; a run passes ``--engine``'s) says how its forwards run; an
    emulated backend has none."""
    if is_emulated(spec):
        return EmulatedBackend(EmulatedSpec.parse(spec), sleep=sleep)
    from dsi_mpi.backends.hf import HFBackend

    if is_self_drafter(spec):
        if target is None or is_emulated(target) or is_self_drafter(target):
            raise ValueError(f"{spec!r} needs a model target (a folder, hub id or .gguf file)")
        return HFBackend(target, dtype=dtype, device=device, layers=self_drafter_layers(spec),
                         engine=engine)
    return HFBackend(spec, dtype=dtype, device=device, engine=engine, tp_size=tp_size)
