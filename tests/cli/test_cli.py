"""The command line under a real ``mpiexec``: output contract, bad input, failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.jobs import MPIEXEC, launch

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpich)")
EMU_T = "emulated:tpot_ms=3,ttft_ms=5,vocab=500"
EMU_D = "emulated:tpot_ms=1,ttft_ms=1,acceptance=0.8,vocab=500"


def test_one_line_run_writes_the_documented_records(tiny_suite: dict[str, str],
                                                     tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\nThe coordinator owns the committed sequence\n")
    proc = launch(4, "run", "--target", tiny_suite["gpt2"],
                  "--drafter", tiny_suite["gpt2/perturbed"], "--mode", "dsi,si,nonsi",
                  "--lookahead", "3", "--max-new-tokens", "16", "--dtype", "float64",
                  "--prompt-file", str(prompts), "--output", str(out), "--timeout", "60")
    assert proc.returncode == 0, proc.stderr
    assert "si/dsi" in proc.stdout and "wrote 6 records" in proc.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    required = {"mode", "prompt_index", "tokens", "text", "num_new_tokens", "wall_time_s", "ttft_s",
                "tpot_s", "acceptance_rate", "mean_accepted_length", "verifications_sent",
                "verifications_cancelled", "lookahead", "sp"}
    assert all(required <= set(r) for r in records)
    assert {r["mode"] for r in records} == {"dsi", "si", "nonsi"}
    for index in (0, 1):
        outputs = {tuple(r["tokens"]) for r in records if r["prompt_index"] == index}
        assert len(outputs) == 1, "the three modes must agree token for token"
    assert records[0]["sp"] == 2 and records[0]["lookahead"] == 3


def test_nonsi_runs_on_two_ranks_without_a_drafter(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    proc = launch(2, "run", "--target", EMU_T, "--mode", "nonsi", "--max-new-tokens", "5",
                  "--prompt-ids", "1,2,3", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["num_new_tokens"] == 5


@pytest.mark.parametrize(
    ("ranks", "args", "message"),
    [
        (2, ["--mode", "dsi"], "needs at least 3 MPI ranks"),
        (3, ["--lookahead", "0"], "--lookahead must be >= 1"),
        (3, ["--temperature", "-1"], "--temperature must be >= 0"),
        (3, ["--top-p", "0"], "--top-p must be in (0, 1]"),
        (3, ["--drafter", "emulated:tpot_ms=1,acceptance=2"], "acceptance must be in [0, 1]"),
        (3, ["--target", "/no/such/model", "--drafter", "/no/such/drafter"], "does not exist"),
        (4, ["--sp", "3"], "--sp 3 needs 1 coordinator"),
        (3, ["--mode", "warp"], "--mode must be one or more of"),
        (3, ["--engine", "cudagraph"], "--engine cudagraph needs --device cuda"),
    ],
)
def test_bad_input_is_reported_once_and_every_rank_exits_2(ranks: int, args: list[str],
                                                          message: str, tmp_path: Path) -> None:
    given = dict(zip(args[::2], args[1::2], strict=True))
    flags = {"--target": EMU_T, "--drafter": EMU_D, "--mode": "dsi"} | given
    flat = [x for pair in flags.items() for x in pair]
    proc = launch(ranks, "run", *flat, "--prompt-ids", "1,2", "--output", str(tmp_path / "o.jsonl"),
                  timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.count("dsi-mpi: error:") == 1, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_drafter_sharing_too_few_tokens_fails_before_loading(tiny_suite: dict[str, str],
                                                                tmp_path: Path) -> None:
    """Rejection sampling across vocabularies needs tokens in common; preflight refuses a pair
    that shares too few, with exit code 2 and no model loaded."""
    from dsi_mpi.tiny import build_tiny_model, build_tokenizer, unrelated_lines

    other = build_tiny_model(tmp_path / "other", tokenizer=build_tokenizer(
        tmp_path / "tok", vocab_size=1500, lines=unrelated_lines()))
    proc = launch(3, "run", "--target", tiny_suite["llama"], "--drafter", other, "--prompt", "hi",
                  "--verify", "rejection", "--temperature", "1", "--output",
                  str(tmp_path / "o.jsonl"), timeout=60)
    assert proc.returncode == 2 and "use --verify exact" in proc.stderr, proc.stderr


def test_a_folder_without_weights_is_bad_input(tiny_suite: dict[str, str], tmp_path: Path) -> None:
    """Config present, weights missing: rank 0 says so before any model loads (was a traceback
    from every model rank, 30 s later)."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_suite["llama"], broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    proc = launch(3, "run", "--target", str(broken), "--drafter", str(broken), "--prompt", "hi",
                  "--output", str(tmp_path / "o.jsonl"), "--timeout", "30", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "no weights" in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_a_failing_rank_aborts_the_job_with_its_message(tiny_suite: dict[str, str],
                                                        tmp_path: Path) -> None:
    """Weights present but unreadable: the input checks pass, loading fails on the model ranks;
    the job ends with the failing rank's message and leaves no output file."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_suite["llama"], broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    proc = launch(3, "run", "--target", str(broken), "--drafter", str(broken), "--prompt", "hi",
                  "--output", str(tmp_path / "o.jsonl"), "--timeout", "30", timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "failed:" in proc.stderr, proc.stderr
    assert "(target)" in proc.stderr or "(drafter)" in proc.stderr, proc.stderr
    assert "no prompt had finished" in proc.stderr, proc.stderr
    assert not (tmp_path / "o.jsonl").exists()
