"""Shared fixtures: the tiny model suite is built once per test session (a few seconds)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from dsi_mpi.tiny import build_suite

    root = os.environ.get("DSI_TINY_DIR") or str(tmp_path_factory.mktemp("tiny-suite"))
    return build_suite(root)
