"""Shared fixtures: the tiny model suite is built once per test session (a few seconds)."""

from __future__ import annotations

import os

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
