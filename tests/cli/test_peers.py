"""bench/peers.py in a small CPU configuration: transformers' generate() and assisted
generation beside dsi_mpi's non-SI, SI and DSI, on the tiny Llama and its perturbed drafter in
float32, 4 ranks (SP 2). Every method must give generate()'s tokens (greedy decoding), and the
JSON lines must say so and carry a time for each method."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.jobs import MPIEXEC

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpich)")


def test_peers_bench_runs_five_methods_with_identical_tokens(tmp_path: Path) -> None:
    out = tmp_path / "peers.jsonl"
    cmd = [MPIEXEC, "-n", "4", sys.executable, "-m", "mpi4py", str(REPO / "bench" / "peers.py"),
           "--model", "tiny", "--workdir", str(tmp_path), "--num-prompts", "2",
           "--max-new-tokens", "12", "--lookahead", "3", "--timeout", "60", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["generate", "assisted", "nonsi", "si", "dsi"]
    for r in rows:
        assert r["prompts"] == 2 and r["tokens"] == 24, r
        assert r["identical"] == 2 and r["first_difference"] == [None, None], r
        assert r["wall_s"] > 0 and r["tokens_per_s"] > 0, r
        assert (r["dtype"], r["sp"], r["lookahead"]) == ("float32", 2, 3)
        assert r["device"].startswith("CPU")
    assert rows[0]["generate_over_method"] == 1.0
    assert "| assisted | 2/2 |" in proc.stdout and "| dsi | 2/2 |" in proc.stdout
