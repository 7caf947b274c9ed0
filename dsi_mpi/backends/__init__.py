"""Model backends behind one interface (:class:`Backend`): Hugging Face and emulated."""

from __future__ import annotations

from dsi_mpi.backends.base import Backend, Cancelled, StepOutput
from dsi_mpi.backends.emulated import PREFIX as EMULATED_PREFIX
from dsi_mpi.backends.emulated import EmulatedBackend, EmulatedSpec

__all__ = ["Backend", "Cancelled", "StepOutput", "EmulatedBackend", "EmulatedSpec", "is_emulated", "load_backend"]


def is_emulated(spec: str) -> bool:
    return spec.startswith(EMULATED_PREFIX)


def load_backend(spec: str, dtype: str = "auto", device: str = "cpu", sleep: bool = True) -> Backend:
    """A backend from a spec: ``emulated:...``, a local directory, or a hub id."""
    if is_emulated(spec):
        return EmulatedBackend(EmulatedSpec.parse(spec), sleep=sleep)
    from dsi_mpi.backends.hf import HFBackend

    return HFBackend(spec, dtype=dtype, device=device)
