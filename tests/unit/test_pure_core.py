"""The pure core imports without torch and without mpi4py (the style guide's layering).

Checked in a fresh interpreter in which importing either raises ImportError, so neither a
stray top-level import nor one hidden in a module the core imports can slip in.
"""

from __future__ import annotations

import subprocess
import sys

PURE = ("policy", "rules", "tasks", "dispatch", "ledger", "protocol", "verify", "simulate",
        "plan", "metrics", "roles", "worker", "sequences", "config", "exits", "results", "trace",
        "progress", "report", "timeline", "vocabulary", "liveness", "backends.choice", "cli")

SCRIPT = """
import sys
for name in ("torch", "mpi4py", "transformers"):
    sys.modules[name] = None  # any import of them fails ("import of ... halted")
import importlib
for module in {modules!r}:
    importlib.import_module("dsi_mpi." + module)
from dsi_mpi.simulate import Latencies, simulate
assert simulate("dsi", Latencies(20.0, 5.0), 0.8, 3, 4, 20).mean_ms > 0
print("ok")
"""


def test_pure_modules_import_without_torch_or_mpi() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(modules=PURE)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_guard_itself_works() -> None:
    """A module that does import torch must fail under the same guard."""
    script = SCRIPT.format(modules=("backends.hf",))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "import of torch halted" in out.stderr


def test_bad_run_arguments_are_reported_before_torch_or_mpi_is_imported() -> None:
    """Every rank parses and checks its arguments first (docs/reliability.md), so a bad flag costs a
    fraction of a second at any rank count, not a torch import per rank."""
    script = """
import sys
for name in ("torch", "mpi4py", "transformers"):
    sys.modules[name] = None
from dsi_mpi.cli import main
sys.exit(main(["run", "--target", "emulated:tpot_ms=1", "--drafter", "emulated:tpot_ms=1",
               "--lookahead", "0", "--prompt-ids", "1,2", "--output", "o.jsonl"]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip() == ("dsi-mpi: error: --lookahead must be >= 1, got 0: a task "
                                  "verifies at least one draft")
