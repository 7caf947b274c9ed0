"""Traces and progress under a real mpiexec (docs/records.md): --trace, the progress lines,
dsi-mpi timeline and report.

One traced run (emulated models, 5 ranks, three modes, three prompts, a warm-up) serves every
check; each test reads its files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.jobs import MPIEXEC, launch

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpich)")
TARGET = "emulated:tpot_ms=4,ttft_ms=6,vocab=500"
DRAFTER = "emulated:tpot_ms=1,ttft_ms=1.5,acceptance=0.6,vocab=500"
PROMPTS = [[1, 2, 3, 4], [9, 8, 7], [5, 5, 6, 7, 8]]
FORWARDS = ("prefill", "verify", "draft")


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("traced")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": ids}) + "\n" for ids in PROMPTS))
    proc = launch(5, "run", "--target", TARGET, "--drafter", DRAFTER, "--mode", "dsi,si,nonsi",
                  "--lookahead", "3", "--max-new-tokens", "24", "--prompt-file", str(prompts),
                  "--warmup", "1", "--output", str(tmp / "out.jsonl"),
                  "--trace", str(tmp / "trace.json"), "--timeout", "60")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (tmp / "out.jsonl").read_text().splitlines()]
    doc = json.loads((tmp / "trace.json").read_text())  # valid JSON
    return {"dir": tmp, "proc": proc, "records": records, "doc": doc}


def _labels(event: dict) -> tuple:
    """(mode, prompt, repeat, warmup) of a trace event."""
    args = event["args"]
    return args["mode"], args["prompt"], args["repeat"], args["warmup"]


def _events(doc: dict) -> list[dict]:
    return [e for e in doc["traceEvents"] if e["ph"] != "M"]


def test_every_rank_is_a_named_process_and_every_event_says_its_generation(traced: dict) -> None:
    doc = traced["doc"]
    names = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"}
    assert names == {0: "coordinator (rank 0)", 1: "drafter (rank 1)", 2: "target 1 (rank 2)",
                     3: "target 2 (rank 3)", 4: "target 3 (rank 4)"}
    events = _events(doc)
    assert {e["pid"] for e in events} == set(names)
    for e in events:
        assert e["args"]["mode"] in ("dsi", "si", "nonsi") and e["args"]["prompt"] in (0, 1, 2), e
    clock = doc["otherData"]["clock"]
    assert [c["rank"] for c in clock] == [0, 1, 2, 3, 4]
    # One node: every rank reads the same monotonic clock, so the measured offsets must be
    # within the measurement's own uncertainty (plus a little for rounding).
    for c in clock:
        assert abs(c["offset_us"]) <= c["uncertainty_us"] + 1.0, c


def test_events_are_well_nested_on_every_rank(traced: dict) -> None:
    by_rank: dict[int, list] = {}
    for e in _events(traced["doc"]):
        if e["ph"] == "X":
            by_rank.setdefault(e["pid"], []).append((e["ts"], e["ts"] + e["dur"], e["name"]))
    for rank, spans in by_rank.items():
        stack: list[tuple[float, float, str]] = []
        for start, end, name in sorted(spans, key=lambda s: (s[0], -s[1])):
            while stack and stack[-1][1] <= start + 1e-3:
                stack.pop()
            assert not stack or end <= stack[-1][1] + 1e-3, (
                f"rank {rank}: {name} overlaps {stack[-1]}")
            stack.append((start, end, name))


def test_the_trace_counts_the_records_forwards(traced: dict) -> None:
    events = _events(traced["doc"])
    records = traced["records"]
    assert len(records) == 9
    aborted = 0
    for r in records:
        labels = (r["mode"], r["prompt_index"], r["repeat"], False)
        mine = [e for e in events if e["pid"] >= 2 and e["ph"] == "X" and e["name"] in FORWARDS
                and _labels(e) == labels]
        finished = [e for e in mine if e["args"]["outcome"] != "cancelled"]
        cancelled = [e for e in mine if e["args"]["outcome"] == "cancelled"]
        assert len(finished) == r["target_forwards"], r["mode"]
        assert len(cancelled) == r["verifications_aborted"], r["mode"]
        outcomes = {e["args"]["outcome"] for e in finished}
        assert outcomes <= {"accepted", "rejected", "unused", "stale"}
        commits = [e for e in events if e["pid"] == 0 and e["name"] == "commit"
                   and _labels(e) == labels]
        assert sum(e["args"]["tokens"] for e in commits) == r["num_new_tokens"]
        aborted += r["verifications_aborted"]
    assert aborted > 0, "no forward was cancelled part-way: the run shows nothing of cancellation"
    assert any(e["name"] == "cancel" and e["pid"] >= 2 and not e["args"]["late"] for e in events)
    assert any(e["name"] == "rollback" and e["pid"] == 1 for e in events)
    warmups = [g for g in traced["doc"]["otherData"]["generations"] if g["warmup"]]
    assert [g["mode"] for g in warmups] == ["dsi", "si", "nonsi"]


def test_records_carry_the_new_metrics(traced: dict) -> None:
    for r in traced["records"]:
        by_outcome = r["target_time_by_outcome_s"]
        assert r["target_time_s"] == pytest.approx(sum(by_outcome.values()))
        wasted = by_outcome["stale"] + by_outcome["cancelled"]
        assert r["wasted_target_time_s"] == pytest.approx(wasted)
        assert (by_outcome["cancelled"] > 0) == (r["verifications_aborted"] > 0)
        assert len(r["target_busy_fraction"]) == len(r["target_ranks"]) == r["sp"]
        assert all(0.0 <= f <= 1.0 for f in r["target_busy_fraction"])
        if r["mode"] == "nonsi":
            assert r["blocks_verified"] == 0 and r["acceptance_per_position"] == []
            assert r["target_busy_fraction"][0] > 0.5  # the one server works all the time
        else:
            assert r["blocks_verified"] > 0
            assert len(r["acceptance_per_position"]) == len(r["blocks_per_position"]) <= 3 * (3 + 1)
            pairs = zip(r["accepted_per_position"], r["blocks_per_position"], strict=True)
            assert all(0 <= a <= b for a, b in pairs)


def test_progress_lines_appear_on_a_non_terminal_stderr(traced: dict) -> None:
    stderr = traced["proc"].stderr
    assert "dsi-mpi: 1/9 records (11%)" in stderr and "ETA" in stderr
    assert "dsi-mpi: 9/9 records (100%)" in stderr


def test_an_untraced_run_survives_its_cancellations(traced: dict, tmp_path: Path) -> None:
    """The traced run's DSI again without --trace: the role loops' hooks are then NO_TRACE's,
    and a target that notices a Cancel mid-forward calls one of them."""
    out = tmp_path / "out.jsonl"
    proc = launch(5, "run", "--target", TARGET, "--drafter", DRAFTER, "--mode", "dsi",
                  "--lookahead", "3", "--max-new-tokens", "24",
                  "--prompt-file", str(traced["dir"] / "prompts.jsonl"), "--output", str(out),
                  "--timeout", "60", "--quiet")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum(r["verifications_aborted"] for r in records) > 0, "no forward was cancelled part-way"
    traced_dsi = [r["tokens"] for r in traced["records"] if r["mode"] == "dsi"]
    assert [r["tokens"] for r in records] == traced_dsi


def test_quiet_silences_the_progress(tmp_path: Path) -> None:
    proc = launch(2, "run", "--target", TARGET, "--mode", "nonsi", "--max-new-tokens", "3",
                  "--prompt-ids", "1,2", "--output", str(tmp_path / "o.jsonl"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "records (" not in proc.stderr


def _dsi_mpi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsi_mpi", *args], capture_output=True, text=True,
                          timeout=120)


def test_timeline_draws_a_generation(traced: dict) -> None:
    out = traced["dir"] / "timeline.png"
    trace = str(traced["dir"] / "trace.json")
    proc = _dsi_mpi("timeline", trace, "--out", str(out), "--mode", "dsi", "--prompt", "1")
    assert proc.returncode == 0, proc.stderr
    assert "dsi prompt 1 repeat 0" in proc.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    bad = _dsi_mpi("timeline", trace, "--out", str(out), "--prompt", "7")
    assert bad.returncode == 2 and "no generation with prompt 7" in bad.stderr
    wrong = _dsi_mpi("timeline", str(traced["dir"] / "out.jsonl"), "--out", str(out))
    assert wrong.returncode == 2 and "dsi-mpi: error:" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_report_writes_tables_and_plots(traced: dict) -> None:
    out = traced["dir"] / "report"
    proc = _dsi_mpi("report", str(traced["dir"] / "out.jsonl"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text()
    for heading in ("## dsi", "## si", "## nonsi", "## DSI's speedups"):
        assert heading in text
    assert "| dsi k=3 sp=3 | si k=3 | 3 |" in text and "| dsi k=3 sp=3 | nonsi | 3 |" in text
    assert "3/3 |" in text  # the modes gave identical tokens on the three prompts
    for name in ("latency.png", "acceptance_by_position.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    missing = _dsi_mpi("report", str(traced["dir"] / "nope.jsonl"), "--out", str(out))
    assert missing.returncode == 2 and "nope.jsonl" in missing.stderr


def test_a_trace_in_a_missing_directory_is_bad_input(tmp_path: Path) -> None:
    proc = launch(2, "run", "--target", TARGET, "--mode", "nonsi", "--prompt-ids", "1,2",
                  "--output", str(tmp_path / "o.jsonl"), "--trace", str(tmp_path / "no" / "t.json"),
                  timeout=60)
    assert proc.returncode == 2 and "--trace: directory" in proc.stderr
