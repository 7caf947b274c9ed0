"""``dsi-mpi profile``: latencies and acceptance measured as the paper's appendix F says, and
``plan``/``simulate`` fed from the profile."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from dsi_mpi.backends import Backend, StepOutput, load_backend
from dsi_mpi.cli import main
from dsi_mpi.preflight import read_prompts
from dsi_mpi.profile import block_acceptance, measure


@pytest.mark.parametrize(
    ("matches", "lookahead", "per_position", "mean_length"),
    [
        ([[1, 1, 1, 1]], 2, [1.0, 1.0], 2.0),  # every block fully accepted
        ([[0, 0, 0]], 2, [0.0, None], 0.0),  # all rejected: position 2 never reached
        ([[1, 0, 1, 1]], 2, [2 / 3, 1 / 2], 1.0),  # blocks 10, 01, 11 -> lengths 1, 0, 2
        ([[1, 0], [1, 1, 1]], 3, [1.0, 1.0, 1.0], 3.0),  # rows shorter than a block are left out
        ([[1]], 2, [None, None], None),
    ],
)
def test_block_acceptance(matches: list, lookahead: int, per_position: list,
                          mean_length: float | None) -> None:
    rates, length = block_acceptance([[bool(m) for m in row] for row in matches], lookahead)
    if None in per_position:
        assert rates == per_position
    else:
        assert rates == pytest.approx(per_position)
    assert length == mean_length


class _VirtualClock:
    """``time`` for the profiler, virtual: it moves only when a recorded forward runs."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def _recorded(spec: str, clock: _VirtualClock) -> Backend:
    """An emulated model that does not sleep: each forward moves ``clock`` by the latency its
    spec records (TTFT on an empty cache, TPOT otherwise), as a sleeping one would take."""
    backend = load_backend(spec, sleep=False)
    forward = backend.forward

    def timed(tokens: Sequence[int], *args: Any, **kwargs: Any) -> StepOutput:
        first = backend.cached_length() == 0
        clock.now += (backend.spec.ttft_ms if first else backend.spec.tpot_ms) / 1e3
        return forward(tokens, *args, **kwargs)

    backend.forward = timed  # type: ignore[method-assign]
    return backend


def test_profile_measures_what_emulated_models_take(monkeypatch: pytest.MonkeyPatch) -> None:
    """TTFT and TPOT of each model, from the forwards' recorded latencies (a virtual clock:
    nothing is timed), and the acceptance of the drafter."""
    from dsi_mpi import profile

    clock = _VirtualClock()
    monkeypatch.setattr(profile, "time", clock)
    target = _recorded("emulated:tpot_ms=4,ttft_ms=12,vocab=300", clock)
    drafter = _recorded("emulated:tpot_ms=1,ttft_ms=2,acceptance=0.6,vocab=300", clock)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12]]
    result = measure(target, drafter, prompts, max_new_tokens=60, lookahead=4)
    assert result["prompts"] == 5 and result["tokens"] == 300
    assert result["target"]["ttft_ms"] == pytest.approx(12)
    assert result["target"]["tpot_ms"] == pytest.approx(4)
    assert result["drafter"]["ttft_ms"] == pytest.approx(2)
    assert result["drafter"]["tpot_ms"] == pytest.approx(1)
    assert abs(result["acceptance"] - 0.6) < 0.1  # i.i.d. per position: 300 draws
    assert all(abs(a - 0.6) < 0.2 for a in result["acceptance_per_position"][:2])
    row = result["per_prompt"][2]
    assert row["new_tokens"] == 60 and len(row["matches"]) == 60 and row["prompt_tokens"] == 4


def test_acceptance_of_self_drafters_rises_with_depth_to_one(smollm2: dict[str, str]) -> None:
    """SmolLM2-135M on 3 HumanEval prompts: its first N of 30 layers agree with all 30 more often
    as N grows, and always when N = 30."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2["folder"])
    prompts = read_prompts(None, smollm2["humaneval"], None, tokenizer, num_prompts=3)
    target = load_backend(smollm2["gguf"], dtype="float32")
    rates = []
    for layers in (10, 20, 30):
        drafter = load_backend(f"self:layers={layers}", dtype="float32", target=smollm2["gguf"])
        result = measure(target, drafter, [p.ids for p in prompts], max_new_tokens=24,
                         lookahead=4, warmup=0)
        assert result["tokens"] == 72
        rates.append(result["acceptance"])
    assert rates[0] < rates[1] < rates[2] == 1.0, rates


def _profile_file(tmp_path: Path, acceptance: float = 0.7) -> Path:
    path = tmp_path / "profile.json"
    args = ["profile", "--target", "emulated:tpot_ms=3,ttft_ms=6,vocab=100",
            "--drafter", f"emulated:tpot_ms=1,acceptance={acceptance},vocab=100",
            "--prompt-ids", "1,2,3",
            "--max-new-tokens", "30", "--lookahead", "3", "--warmup", "0", "--output", str(path)]
    assert main(args) == 0
    return path


def test_profile_command_writes_what_plan_and_simulate_read(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    path = _profile_file(tmp_path)
    out = capsys.readouterr().out
    assert "TTFT ms" in out and "acceptance" in out and f"wrote {path}" in out
    data = json.loads(path.read_text())
    for model in ("target", "drafter"):
        assert {"ttft_ms", "tpot_ms", "spec"} <= set(data[model])
    assert {"acceptance", "prompts", "tokens", "acceptance_per_position", "per_prompt"} <= set(data)
    assert data["prompts"] == 1 and data["tokens"] == 30
    assert len(data["acceptance_per_position"]) == 3

    # The flags below carry no cost curves and no shared latencies: compare with a profile
    # without them (test_cost_curve.py checks that plan and simulate use them).
    assert data["target"]["block_ms"] and data["drafter"]["block_ms"] and data["shared"]
    del data["target"]["block_ms"], data["drafter"]["block_ms"], data["shared"]
    path.write_text(json.dumps(data))
    assert main(["plan", "--profile", str(path), "--gpus", "4", "--repeats", "2"]) == 0
    plan = json.loads(capsys.readouterr().out.splitlines()[-1])
    flags = ["--target-tpot-ms", str(data["target"]["tpot_ms"]),
             "--target-ttft-ms", str(data["target"]["ttft_ms"]),
             "--drafter-tpot-ms", str(data["drafter"]["tpot_ms"]),
             "--drafter-ttft-ms", str(data["drafter"]["ttft_ms"]),
             "--acceptance", str(data["acceptance"])]
    assert main(["plan", *flags, "--gpus", "4", "--repeats", "2"]) == 0
    # the same inputs, the same plan
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == plan

    assert main(["simulate", "--mode", "dsi", "--profile", str(path), "--sp", "2",
                 "--repeats", "2"]) == 0
    from_profile = json.loads(capsys.readouterr().out)
    assert main(["simulate", "--mode", "dsi", *flags, "--sp", "2", "--repeats", "2"]) == 0
    assert json.loads(capsys.readouterr().out) == from_profile


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "--gpus", "4", "--acceptance", "0.5"], "drop --acceptance"),
        (["simulate", "--mode", "si", "--target-tpot-ms", "3"], "drop --target-tpot-ms"),
        (["plan", "--gpus", "4"], None),  # a valid profile: accepted
    ],
)
def test_profile_and_latency_flags_exclude_each_other(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      args: list[str], message: str | None) -> None:
    path = _profile_file(tmp_path)
    capsys.readouterr()
    code = main([*args, "--profile", str(path), "--repeats", "2"])
    err = capsys.readouterr().err
    expected = (0, True) if message is None else (2, True)
    assert (code, message is None or message in err) == expected, err


def test_bad_profiles_and_missing_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"target": {"tpot_ms": 3}}')
    assert main(["plan", "--profile", str(bad), "--gpus", "4"]) == 2
    assert "not a profile" in capsys.readouterr().err
    assert main(["plan", "--profile", str(tmp_path / "none.json"), "--gpus", "4"]) == 2
    assert "--profile" in capsys.readouterr().err
    assert main(["plan", "--gpus", "4"]) == 2
    assert "--target-tpot-ms is required (or --profile FILE" in capsys.readouterr().err
    assert main(["profile", "--target", "emulated:tpot_ms=1", "--drafter", "self:layers=2",
                 "--prompt-ids", "1", "--output", str(tmp_path / "p.json")]) == 2
    assert "both be emulated" in capsys.readouterr().err
