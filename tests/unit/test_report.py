"""dsi-mpi report on hand-made records: the numbers in its tables, and which plots it draws."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsi_mpi.report import ReportError, read, report, speedups


def _record(mode: str, prompt: int, wall: float, lookahead: int = 3, sp: int = 1,
            tokens: tuple = (1, 2, 3, 4), repeat: int = 0) -> dict:
    nonsi = mode == "nonsi"
    return {"mode": mode, "prompt_index": prompt, "repeat": repeat,
            "lookahead": 0 if nonsi else lookahead, "sp": sp, "tokens": list(tokens),
            "num_new_tokens": len(tokens), "wall_time_s": wall,
            "ttft_s": 0.01, "tpot_s": (wall - 0.01) / 3, "accepted": 0 if nonsi else 2,
            "rejected": 0 if nonsi else 1, "forced": 4 if nonsi else 1,
            "blocks_verified": 0 if nonsi else 2, "blocks_per_position": [] if nonsi else [2, 2],
            "accepted_per_position": [] if nonsi else [2, 0], "target_time_s": wall,
            "wasted_target_time_s": wall / 10, "target_busy_fraction": [0.5] * sp}


def _write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_speedups_pair_the_same_prompts_of_one_file(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.jsonl", [_record("dsi", 0, 1.0, sp=3), _record("dsi", 1, 2.0, sp=3),
                                      _record("si", 0, 2.0), _record("si", 1, 3.0),
                                      _record("si", 2, 99.0),
                                      _record("nonsi", 0, 4.0, tokens=(1, 2, 3, 5))])
    b = _write(tmp_path / "b.jsonl", [_record("si", 0, 100.0), _record("si", 1, 100.0)])
    rows = speedups(read([a, b]))
    # nothing from b
    assert [(r["baseline"], r["prompts"]) for r in rows] == [("si k=3", 2), ("nonsi", 1)]
    si, nonsi = rows
    assert si["mean_ratio"] == pytest.approx(2.5 / 1.5)  # prompt 2 ran in SI only: left out
    assert si["median_ratio"] == pytest.approx((2.0 + 1.5) / 2)
    assert si["identical"] == 2 and nonsi["identical"] == 0
    assert nonsi["mean_ratio"] == pytest.approx(4.0)


def test_report_writes_tables_and_the_plots_that_apply(tmp_path: Path) -> None:
    records = [_record("nonsi", p, 3.0) for p in range(3)]
    for k in (1, 3, 5):
        records += [_record("si", p, 2.0 + 0.1 * k, lookahead=k) for p in range(3)]
        for sp in (2, 3):
            records += [_record("dsi", p, 1.0 + 0.1 * k - 0.1 * sp, lookahead=k, sp=sp)
                        for p in range(3)]
    path = _write(tmp_path / "sweep.jsonl", records)
    markdown, written = report([path], str(tmp_path / "out"))
    names = sorted(Path(p).name for p in written)
    assert names == ["acceptance_by_position.png", "latency.png", "latency_vs_lookahead.png",
                     "latency_vs_sp.png", "report.md"]
    assert all(Path(p).stat().st_size > 0 for p in written)
    assert "| dsi k=1 sp=2 | 3 | 0.900 | 0.900 |" in markdown  # median and mean wall time
    # acceptance 2/3, (2 + 2) / 2 rounds, wasted, busy
    assert "| 0.667 | 2.00 | 10.0% | 50% |" in markdown
    # 6 DSI rows, and a speedup per DSI row and baseline
    assert markdown.count("| dsi k=") >= 6 + 6 * 4


def test_bad_records_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"mode": "dsi"}\n')
    with pytest.raises(ReportError, match="bad.jsonl, line 1: not a dsi-mpi run record"):
        read([str(bad)])
    with pytest.raises(ReportError, match="missing.jsonl"):
        read([str(tmp_path / "missing.jsonl")])
