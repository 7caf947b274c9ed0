"""Bad GGUF and self-drafter specs under real ``mpiexec``: one message, exit code 2, no compute."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.jobs import MPIEXEC, launch

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpich)")


@pytest.mark.parametrize(
    ("target", "drafter", "message"),
    [
        ("{tmp}/missing.gguf", "self:layers=2",
         "--target: GGUF file '{tmp}/missing.gguf' does not exist"),
        ("{llama}", "self:layers=0",
         "--drafter self:layers=0: N must be between 1 and the target's 2 decoder layers"),
        ("{llama}", "self:layers=3",
         "--drafter self:layers=3: N must be between 1 and the target's 2 decoder layers"),
    ],
)
def test_bad_model_specs_exit_2_before_loading(tiny_suite: dict[str, str], tmp_path: Path,
                                               target: str, drafter: str, message: str) -> None:
    names = {"tmp": str(tmp_path), "llama": tiny_suite["llama"]}
    proc = launch(3, "run", "--target", target.format(**names), "--drafter", drafter,
                  "--prompt", "hi", "--output", str(tmp_path / "o.jsonl"), timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.count("dsi-mpi: error:") == 1, proc.stderr
    assert message.format(**names) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o.jsonl").exists()
