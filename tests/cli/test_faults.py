"""Fault injection on a real ``mpiexec`` job of 5 ranks (emulated models): what the user sees,
how fast the job ends, and what the output keeps (``docs/reliability.md``).

Every job runs through ``tests/jobs.Job``, which kills whatever a test leaves (a stopped rank
too) and removes the MPICH shared memory of the ranks it killed. The faults strike once the
output holds a few records, so "kept" is checked against records seen before the fault.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.jobs import MPIEXEC, Job

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpich)")

RANKS = 5
PROMPTS = 16
EMU_T = "emulated:tpot_ms=2,ttft_ms=4,vocab=500"
EMU_D = "emulated:tpot_ms=0.5,ttft_ms=1,acceptance=0.8,vocab=500"
HANG_TIMEOUT_S = 3.0  # --timeout of the hang tests
GONE_S = 2.0  # every rank gone this soon after a signal, a hang timeout after the hang
BAD_INPUT_S = 3.0  # the message of a bad input at 5 ranks


def _base(prompts: Path) -> list[str]:
    return [
        "run",
        "--target",
        EMU_T,
        "--drafter",
        EMU_D,
        "--mode",
        "dsi",
        "--lookahead",
        "3",
        "--max-new-tokens",
        "60",
        "--prompt-file",
        str(prompts),
        "--timeout",
        "60",
    ]


def _records(path: Path) -> list[dict]:
    """Every line parsed: a torn or invalid line fails the test."""
    if not path.exists():
        return []
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "the last line is torn"
    return [json.loads(line) for line in text.splitlines()]


def _tokens(records: list[dict]) -> dict[tuple, list[int]]:
    return {(r["mode"], r["prompt_index"], r.get("repeat", 0)): r["tokens"] for r in records}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The prompts and one uninterrupted run, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("faults")
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt_ids": [1 + i, 7, 3 + 2 * i, 11, 5 + i % 7]}) + "\n"
            for i in range(PROMPTS)
        )
    )
    out = root / "clean.jsonl"
    with Job(RANKS, [*_base(prompts), "--output", str(out)], root) as job:
        assert job.wait(120) == 0, job.stderr()
    clean = _records(out)
    assert len(clean) == PROMPTS
    return {"root": root, "prompts": prompts, "clean": _tokens(clean)}


def _run_until(
    work: dict, tmp_path: Path, records: int, extra: tuple[str, ...] = ()
) -> tuple[Job, Path]:
    """A job started and waited for until its output holds ``records`` records."""
    out = tmp_path / "out.jsonl"
    job = Job(RANKS, [*_base(work["prompts"]), *extra, "--output", str(out)], tmp_path)
    deadline = time.monotonic() + 120
    while len(_records(out)) < records:
        assert job.poll() is None, f"the job ended before its fault: {job.stderr()}"
        assert time.monotonic() < deadline, "no records after 120 s"
        time.sleep(0.01)
    job.ranks()  # notes the ranks' shared memory, for the clean-up
    return job, out


def _resume_completes(work: dict, out: Path, tmp_path: Path) -> None:
    """``--resume`` finishes the file: equal to the uninterrupted run, token for token."""
    before = len(_records(out))
    with Job(RANKS, [*_base(work["prompts"]), "--output", str(out), "--resume"], tmp_path) as job:
        assert job.wait(120) == 0, job.stderr()
        assert f"wrote {PROMPTS - before} records" in job.stdout(), job.stdout()
    records = _records(out)
    assert len(records) == PROMPTS and _tokens(records) == work["clean"]


def _one_line(job: Job) -> str:
    """The one line that says how the job ended (rank 0's progress lines aside)."""
    lines = [x for x in job.stderr().splitlines()
             if x.strip() and not re.match(r"dsi-mpi: \d+/\d+ records \(", x)]
    assert len(lines) == 1, job.stderr()
    return lines[0]


@pytest.mark.parametrize("rank", [3, 0])
def test_sigkill_keeps_every_finished_prompt_and_resume_completes(
    work: dict, tmp_path: Path, rank: int
) -> None:
    job, out = _run_until(work, tmp_path, 3)
    with job:
        finished = len(_records(out))
        job.signal_rank(rank, signal.SIGKILL)
        assert job.wait(30) not in (None, 0)
        assert job.wait_gone(5) is not None
    kept = _records(out)
    assert len(kept) >= finished
    assert all(work["clean"][k] == v for k, v in _tokens(kept).items())
    _resume_completes(work, out, tmp_path)


@pytest.mark.parametrize(
    ("how", "sig"),
    [
        ("launcher", signal.SIGTERM),
        ("all", signal.SIGTERM),
        ("rank 3", signal.SIGTERM),
        ("launcher", signal.SIGINT),
    ],
)
def test_a_signal_stops_with_one_line_and_resume_completes(
    work: dict, tmp_path: Path, how: str, sig: int
) -> None:
    """mpiexec signalled (Ctrl-C: SIGINT), every process (a Slurm time limit) or one rank."""
    job, out = _run_until(work, tmp_path, 3)
    with job:
        finished = len(_records(out))
        struck = time.monotonic()
        if how == "launcher":
            job.signal_launcher(sig)
        elif how == "all":
            job.signal_all(sig)
        else:
            job.signal_rank(3, sig)
        code = job.wait(30)
        gone = job.wait_gone(10)
        assert code == 128 + sig, job.stderr()
        assert gone is not None and gone - struck < GONE_S, (gone, struck)
        line = _one_line(job)
        kept = len(_records(out))
        name = signal.Signals(sig).name
        where = " on rank 3" if how == "rank 3" else ""
        assert line == (
            f"dsi-mpi: stopped by {name}{where} after {kept} of {PROMPTS} prompts; rerun with "
            "--resume to finish"
        ), line
    assert kept >= finished
    _resume_completes(work, out, tmp_path)


@pytest.mark.parametrize(("rank", "role"), [(3, "target"), (1, "drafter"), (0, None)])
def test_a_hung_rank_is_named_and_the_job_ends(
    work: dict, tmp_path: Path, rank: int, role: str | None
) -> None:
    """SIGSTOP: a hung worker is named by rank 0; a hung coordinator is found by the workers."""
    job, out = _run_until(work, tmp_path, 2, ("--timeout", str(HANG_TIMEOUT_S)))
    with job:
        struck = time.monotonic()
        job.signal_rank(rank, signal.SIGSTOP)
        code = job.wait(HANG_TIMEOUT_S + 30)
        ended = time.monotonic()
        assert code == 1, (code, job.stderr())  # an error, not a signal's exit
        assert ended - struck < HANG_TIMEOUT_S + GONE_S, ended - struck
        stderr = job.stderr()
        assert "Traceback" not in stderr and "signal 11" not in stderr, stderr
        if role is not None:
            assert re.search(
                rf"dsi-mpi: error: rank {rank} \({role}\) has (not answered task \d+|sent nothing)",
                stderr,
            ), stderr
        else:
            assert "the coordinator (rank 0) has sent nothing" in stderr, stderr
    assert all(work["clean"][k] == v for k, v in _tokens(_records(out)).items())


# ------------------------------------------------------------------------- bad input


def _bad(tmp_path: Path, name: str) -> tuple[list[str], dict[str, str]]:
    """Flags (replacing the base ones) and environment of each bad input."""
    if name == "hub id, offline":
        return ["--target", "no-such-org/no-such-model", "--mode", "nonsi"], {"HF_HUB_OFFLINE": "1"}
    if name == "empty folder":
        (tmp_path / "empty").mkdir()
        return ["--target", str(tmp_path / "empty"), "--mode", "nonsi"], {}
    if name in ("ids with text", "ids a number"):
        value = [1, "abc", 3] if name == "ids with text" else 5
        (tmp_path / "p.jsonl").write_text(json.dumps({"prompt_ids": value}) + "\n")
        return ["--prompt-file", str(tmp_path / "p.jsonl")], {}
    if name == "existing output":
        (tmp_path / "out.jsonl").write_text('{"an": "old file"}\n')
        return [], {}
    raise AssertionError(name)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "hub id, offline",
            "is no local path, so it is a hub id, and it is not in the Hugging Face cache",
        ),
        ("empty folder", "is an empty folder"),
        ("ids with text", "'prompt_ids' must be a non-empty list of integers, got [1, \"abc\", 3]"),
        ("ids a number", "'prompt_ids' must be a non-empty list of integers, got 5"),
        ("existing output", "exists: pass --resume to finish it"),
    ],
)
def test_bad_input_one_line_exit_2_fast(
    work: dict, tmp_path: Path, name: str, message: str
) -> None:
    flags, env = _bad(tmp_path, name)
    args = [
        *_base(work["prompts"]),
        *flags,
        "--output",
        str(tmp_path / "out.jsonl"),
    ]  # the last flag wins
    with Job(RANKS, args, tmp_path, env=dict(os.environ) | env) as job:
        code = job.wait(60)
        took = job.ended - job.started
        line = _one_line(job)
    assert code == 2 and line.startswith("dsi-mpi: error: ") and message in line, line
    assert took < BAD_INPUT_S, f"{took:.1f} s to report {line}"
    if name == "hub id, offline":
        assert "HF_HUB_OFFLINE" in line
    if name == "existing output":
        assert (
            tmp_path / "out.jsonl"
        ).read_text() == '{"an": "old file"}\n' and "--overwrite" in line


def test_overwrite_replaces_and_a_complete_file_resumes_to_nothing(
    work: dict, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    shutil.copy(work["root"] / "clean.jsonl", out)
    args = [
        *_base(work["prompts"]),
        "--num-prompts",
        "2",
        "--max-new-tokens",
        "5",
        "--output",
        str(out),
    ]
    with Job(RANKS, [*args, "--overwrite"], tmp_path) as job:
        assert job.wait(60) == 0, job.stderr()
    assert [r["prompt_index"] for r in _records(out)] == [0, 1]
    with Job(RANKS, [*args, "--resume"], tmp_path) as job:
        assert job.wait(60) == 0, job.stderr()
        assert "nothing to do" in job.stdout()
    with Job(
        RANKS, [*args, "--max-new-tokens", "6", "--resume"], tmp_path
    ) as job:  # the last flag wins
        assert job.wait(60) == 2
        assert "was written with max_new_tokens 5, this run has 6" in _one_line(job)
