"""The trace's join and clock mapping on rank 0 (pure), and the progress report."""

from __future__ import annotations

import io

import pytest

from dsi_mpi import trace
from dsi_mpi.progress import Progress
from dsi_mpi.protocol import Cancel, Cancelled, Result, Start, Verify


def _sync(offset_start: float, offset_end: float, t_start: float = 100.0, t_end: float = 110.0,
          uncertainty: float = 2e-6) -> dict:
    return {"t_start": t_start, "offset_start": offset_start, "uncertainty_start": uncertainty,
            "t_end": t_end, "offset_end": offset_end, "uncertainty_end": uncertainty}


def _parts() -> list[dict]:
    prompts = [
        {"labels": {"mode": "dsi", "prompt": 0, "repeat": 0, "warmup": False, "generation": 0,
                    "lookahead": 2, "sp": 2},
         "epochs": (1, 3), "tasks": {0: "accepted", 1: "cancelled", 2: "stale"},
         "drafts": {(1, 5): "accepted", (2, 6): "rejected"}, "start": 100.5, "end": 101.0,
         "tokens": 4, "counters": {"target_forwards": 2, "accepted": 3, "rejected": 1}},
        {"labels": {"mode": "si", "prompt": 0, "repeat": 0, "warmup": False, "generation": 1,
                    "lookahead": 2, "sp": 1},
         "epochs": (4, 6), "tasks": {3: "rejected"}, "drafts": {}, "start": 102.0, "end": 103.0,
         "tokens": 4, "counters": {"target_forwards": 1, "accepted": 0, "rejected": 1}},
    ]
    coordinator = {"rank": 0, "role": "coordinator", "prompts": prompts, "sync": _sync(0.0, 0.0),
                   "events": [("X", "generate", 100.5, 0.5, prompts[0]["labels"]),
                              ("X", "commit", 100.6, 0.001, {"epoch": 2, "tokens": 2})]}
    def draft(t: float, epoch: int, position: int) -> tuple:
        return ("X", "draft", t, 0.01, {"epoch": epoch, "position": position, "token": 9,
                                        "outcome": "done"})

    drafter = {"rank": 1, "role": "drafter", "prompts": [], "sync": _sync(1.0, 1.0),
               "events": [draft(99.6, 1, 5), draft(99.7, 2, 6), draft(99.8, 2, 7),
                          ("X", "draft", 99.9, 0.005, {"epoch": 3, "position": 7, "token": None,
                                                       "outcome": "preempted"}),
                          ("i", "rollback", 99.95, 0.0, {"epoch": 5, "keep": 3})]}
    # This rank's clock runs 1 ms slow over the 10 s between the two alignments.
    target = {"rank": 2, "role": "target", "prompts": [], "sync": _sync(-2.0, -2.001),
              "events": [("X", "verify", 105.0, 0.02, {"task": 0, "epoch": 1, "outcome": "done"}),
                         ("X", "verify", 105.1, 0.01,
                          {"task": 1, "epoch": 1, "outcome": "cancelled"}),
                         ("X", "verify", 110.0, 0.02, {"task": 3, "epoch": 4, "outcome": "done"}),
                         ("i", "cancel", 105.1, 0.0, {"task": 1, "epoch": 1, "late": False})]}
    return [coordinator, drafter, target]


def test_events_get_their_generation_outcome_and_rank_0_time() -> None:
    doc = trace.chrome(_parts())
    events = [e for e in doc["traceEvents"] if e["ph"] != "M"]
    names = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"}
    assert names == {0: "coordinator (rank 0)", 1: "drafter (rank 1)", 2: "target 1 (rank 2)"}
    # Rank 0's alignment time is the origin; the drafter's clock is 1 s behind rank 0's.
    drafts = [e for e in events if e["pid"] == 1 and e["name"] == "draft"]
    assert [d["args"]["outcome"] for d in drafts] == ["accepted", "rejected", "stale", "preempted"]
    assert drafts[0]["ts"] == pytest.approx(0.6e6) and drafts[0]["dur"] == pytest.approx(1e4)
    verify = [e for e in events if e["pid"] == 2 and e["name"] == "verify"]
    assert [v["args"]["outcome"] for v in verify] == ["accepted", "cancelled", "rejected"]
    assert [v["args"]["mode"] for v in verify] == ["dsi", "dsi", "si"]
    # The offset is interpolated: -2 s at local 100 s, -2.001 s at local 110 s.
    assert verify[0]["ts"] == pytest.approx((105.0 - 2.0005 - 100.0) * 1e6)
    assert verify[2]["ts"] == pytest.approx((110.0 - 2.001 - 100.0) * 1e6)
    assert all("prompt" in e["args"] and "mode" in e["args"] for e in events)
    rollback = [e for e in events if e["name"] == "rollback"][0]
    assert rollback["args"]["mode"] == "si" and rollback["ph"] == "i"
    clock = {c["rank"]: c for c in doc["otherData"]["clock"]}
    assert clock[2]["drift_us"] == pytest.approx(-1000.0)
    assert clock[2]["uncertainty_us"] == pytest.approx(2.0)
    assert [g["mode"] for g in doc["otherData"]["generations"]] == ["dsi", "si"]


def test_the_recorder_hooks_record_what_the_role_did() -> None:
    rec = trace.Recorder(rank=2, role="target")
    verify = Verify(epoch=1, task_id=4, keep=0, first_position=3, tokens=(5, 6, 7))
    rec.target_forward(verify, Result(1, 4, 3, (1,)), 1.0, 1.5)
    rec.target_forward(Verify(1, 5, 3, 4, (8,)), Cancelled(1, 5), 2.0, 2.1)
    (_, name, _, dur, args), (_, name2, _, _, args2) = rec.events
    assert (name, dur, args["fed"], args["outcome"]) == ("prefill", 0.5, 3, "done")
    assert (name2, args2["outcome"], args2["keep"]) == ("verify", "cancelled", 3)
    off = trace.NO_TRACE
    off.target_forward(verify, Result(1, 4, 3, (1,)), 1.0, 1.5)
    off.instant("x")
    assert not off.enabled and off.events == []


def test_tracing_off_takes_every_call_the_role_loops_make() -> None:
    """NO_TRACE answers each hook as the Recorder does (positional and keyword arguments alike):
    the role loops call it in every run without --trace. A hook it lacked, or one whose
    signature differed, once crashed every untraced target that noticed a Cancel mid-forward."""
    verify = Verify(epoch=1, task_id=4, keep=2, first_position=3, tokens=(5, 6))
    calls = [
        ("target_forward", (verify, Result(1, 4, 3, (1,)), 1.0, 1.5), {}),
        ("target_cancel", (Cancel(1, 4),), {"late": False}),
        ("drafter_forward", (False, 1, 3, 9, 1.0, 1.1), {}),
        ("drafter_message", (Start(1, 5, 9, False, 0, True, (1, 2)),), {}),
        ("coordinator_step", (1.0, [(2, Cancel(1, 4))], None, None), {}),
        ("complete", ("commit", 1.0, 2.0), {"epoch": 1}),
        ("instant", ("cancel",), {"when": 1.0, "task": 4}),
    ]
    on = trace.Recorder(rank=2, role="target")
    for name, args, kwargs in calls:
        getattr(on, name)(*args, **kwargs)
        assert getattr(trace.NO_TRACE, name)(*args, **kwargs) is None
    assert len(on.events) == len(calls) and trace.NO_TRACE.events == []
    hooks = {name for name, value in vars(trace.Recorder).items()
             if callable(value) and not name.startswith("_") and name not in ("now", "part")}
    assert hooks == {name for name, _, _ in calls} | {"generation"}
    assert hooks <= set(vars(type(trace.NO_TRACE))), "a hook NO_TRACE does not silence"


def test_progress_prints_plain_lines_off_a_terminal() -> None:
    stream = io.StringIO()
    progress = Progress(4, stream=stream, interval_s=3600.0)
    for i in range(4):
        progress.done({"mode": "dsi", "prompt_index": i, "repeat": 0})
    lines = stream.getvalue().splitlines()
    # the first record, then nothing for an hour, then the last
    assert len(lines) == 2
    assert lines[0].startswith("dsi-mpi: 1/4 records (25%)") and "ETA" in lines[0]
    assert lines[1].startswith("dsi-mpi: 4/4 records (100%)") and lines[1].endswith("ETA 0:00")
    every = io.StringIO()
    progress = Progress(3, stream=every, interval_s=0.0)
    for i in range(3):
        progress.done({"mode": "si", "prompt_index": i})
    assert len(every.getvalue().splitlines()) == 3
    quiet = io.StringIO()
    progress = Progress(3, stream=quiet, quiet=True)
    progress.done({"mode": "si", "prompt_index": 0})
    assert quiet.getvalue() == "" and progress.count == 1


def test_progress_draws_a_bar_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = Progress(2, stream=stream)
    progress.done({"mode": "dsi", "prompt_index": 0})
    progress.done({"mode": "dsi", "prompt_index": 1})
    assert "2/2" in stream.getvalue() and "dsi-mpi" in stream.getvalue()
