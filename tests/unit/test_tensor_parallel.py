"""Target servers of several ranks, the pure parts (issue 23): who is who in the layout, the
rank-count and head checks, the records that keep runs of another ``--target-ranks`` apart,
and the planner weighing SP against TP for a fixed GPU count. The MPI parts are in
``tests/cli/test_tp.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsi_mpi.config import ConfigError, RunConfig
from dsi_mpi.plan import make_plan, weigh_tp
from dsi_mpi.preflight import check_tensor_parallel
from dsi_mpi.results import open_output
from dsi_mpi.roles import make_layout
from dsi_mpi.simulate import Latencies


def test_servers_of_two_ranks_have_leaders_and_followers() -> None:
    layout = make_layout(8, ["dsi", "si"], target_ranks=2)
    assert layout.drafters == (1,) and layout.targets == (2, 4, 6)
    assert layout.followers == (3, 5, 7)
    assert [layout.role(r) for r in range(8)] == [
        "coordinator", "drafter", "target", "follower", "target", "follower", "target",
        "follower"]
    assert layout.describe(5) == "follower of target server 4"
    assert layout.describe(4) == "target"
    assert layout.group(4) == (4, 5) and layout.server_of(7) == 6 and layout.server_of(1) is None
    assert layout.active_targets("dsi", 2) == (2, 4) and layout.active_targets("si", None) == (2,)


def test_one_rank_per_server_is_the_layout_it_always_was() -> None:
    layout = make_layout(5, ["dsi"])
    assert layout.targets == (2, 3, 4) and layout.followers == ()
    assert make_layout(2, ["nonsi"]).targets == (1,)
    assert make_layout(3, ["nonsi"], target_ranks=2).drafters == ()  # nonsi alone: no drafter


@pytest.mark.parametrize(("size", "modes", "sp", "n", "message"), [
    (5, ["dsi"], None, 2, "the 3 ranks after the coordinator and 1 drafter do not make whole "
                          "servers of 2 ranks: launch 1 + 1 + servers x 2 ranks (mpiexec -n 4 or "
                          "-n 6)"),
    (6, ["dsi"], 3, 2, "--sp 3 needs 1 coordinator + 1 drafter + 3 targets x 2 ranks each): "
                       "launch with mpiexec -n 8"),
    (4, ["dsi"], None, 4, "needs at least 6 MPI ranks, got 4"),
    (6, ["dsi"], None, 0, "--target-ranks must be >= 1, got 0"),
])
def test_a_rank_count_that_does_not_add_up_is_one_clear_line(
        size: int, modes: list[str], sp: int | None, n: int, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_layout(size, modes, sp, target_ranks=n)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_heads_must_divide_and_the_model_must_have_a_plan(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    config = {"model_type": "llama", "num_attention_heads": 8, "num_key_value_heads": 2}
    (folder / "config.json").write_text(json.dumps(config))
    check_tensor_parallel(str(folder), 2)
    with pytest.raises(ConfigError, match="must divide the target's 2 key/value heads: use one "
                                          "of 1, 2"):
        check_tensor_parallel(str(folder), 4)
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="no tensor-parallel plan for gpt2"):
        check_tensor_parallel(str(folder), 2)


def test_an_emulated_target_cannot_be_sharded() -> None:
    with pytest.raises(ConfigError, match="needs a model --target"):
        RunConfig(target="emulated:tpot_ms=1", mode="nonsi", target_ranks=2)


def _planned(tp: int) -> dict:
    return {("nonsi", 0, 0): {"prompt_tokens": 3, "sp": 1, "tp_size": tp}}


def test_resume_never_mixes_runs_of_another_target_ranks(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    record = {"mode": "nonsi", "prompt_index": 0, "repeat": 0, "prompt_tokens": 3, "sp": 1}
    path.write_text(json.dumps(record | {"tp_size": 2}) + "\n")
    with pytest.raises(ConfigError, match="was written with tp_size 2, this run has 1"):
        open_output(str(path), True, False, _planned(1))
    output, resumed = open_output(str(path), True, False, _planned(2))
    output.close()
    assert resumed.done == {("nonsi", 0, 0)}
    path.write_text(json.dumps(record) + "\n")  # written before --target-ranks: one rank
    with pytest.raises(ConfigError, match="was written with tp_size 1, this run has 2"):
        open_output(str(path), True, False, _planned(2))


def test_the_planner_weighs_sp_against_tp_for_a_fixed_gpu_count() -> None:
    drafter = dict(drafter_tpot_ms=4.0, drafter_ttft_ms=5.0)
    options = [(1, Latencies(40.0, **drafter), 0.8), (2, Latencies(24.0, **drafter), 0.8),
               (4, Latencies(14.0, **drafter), 0.8), (16, Latencies(5.0, **drafter), 0.8)]
    plans = weigh_tp(options, gpus=9, tokens=30, repeats=5)
    assert plans[16] is None  # 16 GPUs per server do not fit in 8
    assert plans[1].sp <= 8 and plans[2].sp <= 4 and plans[4].sp <= 2
    # each degree is planned as a run with (gpus - 1) // N servers of its own latency
    alone = make_plan(Latencies(24.0, **drafter), 0.8, 1 + 4, tokens=30, repeats=5)
    assert plans[2].as_dict() == alone.as_dict()
    assert plans[4].dsi.mean_ms < plans[1].dsi.mean_ms  # here, faster servers beat more of them


def _profile(path: Path, tp: int, tpot: float) -> str:
    path.write_text(json.dumps({"target": {"tpot_ms": tpot, "ttft_ms": tpot},
                                "drafter": {"tpot_ms": 4.0, "ttft_ms": 5.0},
                                "acceptance": 0.8, "target_ranks": tp}))
    return str(path)


def test_plan_with_tp_profiles_recommends_a_degree_and_its_launch(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dsi_mpi.cli import main

    files = [_profile(tmp_path / f"tp{n}.json", n, t) for n, t in ((1, 40.0), (4, 14.0))]
    args = ["plan", "--gpus", "9", "--tokens", "30", "--repeats", "5"]
    assert main([*args, "--tp-profile", files[0], "--tp-profile", files[1]]) == 0
    out = capsys.readouterr().out
    last = json.loads(out.strip().splitlines()[-1])
    assert last["tp"] == 4 and last["ranks"] == 2 + 4 * last["sp"] and last["sp"] <= 2
    assert f"recommended: --mode dsi --target-ranks 4 --sp {last['sp']}" in out
    assert main([*args, "--tp-profile", files[0], "--tp-profile", files[0]]) == 2
    assert "two profiles of the same --target-ranks" in capsys.readouterr().err
