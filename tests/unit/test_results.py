"""The output file: streamed records, torn lines, and what --resume accepts (no MPI)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dsi_mpi.config import ConfigError
from dsi_mpi.preflight import is_hub_id
from dsi_mpi.results import ResultsFile, check_flags, open_output, read_records

PLAN = {("dsi", i, 0): {"prompt_tokens": 3, "lookahead": 2, "target": "t"} for i in range(3)}


def _record(index: int, **extra: object) -> dict:
    return {
        "mode": "dsi",
        "prompt_index": index,
        "repeat": 0,
        "tokens": [index],
        "prompt_tokens": 3,
        "lookahead": 2,
        "target": "t",
    } | extra


def test_each_record_is_on_disk_as_it_is_appended_and_no_file_before(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    out = ResultsFile(str(path))
    assert not path.exists()  # nothing finished: no file
    out.append(_record(0))
    assert json.loads(path.read_text()) == _record(0)  # readable before close
    out.append(_record(1))
    out.close()
    assert [r["prompt_index"] for r in read_records(str(path))[0]] == [0, 1] and out.written == 2


def test_an_existing_output_needs_resume_or_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    check_flags(str(path), False, False)  # no file: fine
    path.write_text("")
    with pytest.raises(ConfigError, match="--resume .* --overwrite"):
        check_flags(str(path), False, False)
    with pytest.raises(ConfigError, match="is a directory"):
        check_flags(str(tmp_path), True, False)


def test_overwrite_removes_the_old_file_before_the_run(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(_record(0)) + "\n")
    out, resumed = open_output(str(path), False, True, PLAN)
    assert (
        not path.exists() and not resumed.done
    )  # a failed run leaves nothing that looks like its own
    out.close()


def test_resume_skips_what_is_there_and_cuts_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    good = json.dumps(_record(0)) + "\n" + json.dumps(_record(2)) + "\n"
    path.write_text(good + '{"mode": "dsi", "prompt_in')
    assert (
        len(read_records(str(path))[0]) == 2 and read_records(str(path))[1] == 1
    )  # a reader skips it
    out, resumed = open_output(str(path), True, False, PLAN)
    assert resumed.done == {("dsi", 0, 0), ("dsi", 2, 0)} and resumed.dropped_tail
    assert path.read_text() == good
    out.append(_record(1))
    out.close()
    assert [r["prompt_index"] for r in read_records(str(path))[0]] == [0, 2, 1]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([_record(0, lookahead=5)], "written with lookahead 5, this run has 2"),
        ([_record(7)], "prompt 7, repeat 0, which this run does not make"),
        (["not json", _record(1)], ":1 is not a record .* and records follow it"),
    ],
)
def test_resume_refuses_a_file_of_another_run(tmp_path: Path, lines: list, message: str) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    with pytest.raises(ConfigError, match=message):
        open_output(str(path), True, False, PLAN)


def test_org_name_is_a_hub_id_unless_such_a_path_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M") and is_hub_id("gpt2")
    (tmp_path / "HuggingFaceTB" / "SmolLM2-135M").mkdir(parents=True)
    assert not is_hub_id("HuggingFaceTB/SmolLM2-135M")
    assert not is_hub_id("/abs/path") and not is_hub_id("../x/y") and not is_hub_id("a/b/c")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt_ids": [1, "abc", 3]}', "'prompt_ids' must be a non-empty list of integers"),
        ('{"prompt_ids": 5}', "'prompt_ids' must be a non-empty list of integers, got 5"),
        ('{"prompt": 7}', "'prompt' must be a string, got 7"),
    ],
)
def test_malformed_prompt_lines_are_bad_input(tmp_path: Path, line: str, message: str) -> None:
    from dsi_mpi.preflight import read_prompts

    path = tmp_path / "p.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"p.jsonl:1: {message}")):
        read_prompts(None, str(path), None, None)


def test_a_run_s_identity_is_planned_for_every_record_it_writes() -> None:
    """What --resume matches on, from one definition: per mode (nonsi has no lookahead and no
    drafter), per prompt (its length, its own seed), per repeat."""
    from dataclasses import replace

    from dsi_mpi.config import RunConfig
    from dsi_mpi.preflight import Prompt
    from dsi_mpi.results import identity, planned
    from dsi_mpi.roles import make_layout
    from dsi_mpi.verify import SamplingParams

    dsi = RunConfig(target="emulated:tpot_ms=2", drafter="emulated:tpot_ms=1,acceptance=0.9",
                    lookahead=3, max_new_tokens=8, sampling=SamplingParams(seed=5))
    configs = [dsi, replace(dsi, mode="nonsi")]
    prompts = [Prompt([1, 2, 3]), Prompt([4, 5], seed=9)]
    plan = planned(configs, make_layout(5, ["dsi", "nonsi"]), prompts, repeats=2)
    assert sorted(plan) == sorted((m, i, r) for m in ("dsi", "nonsi") for i in (0, 1)
                                  for r in (0, 1))
    assert plan[("dsi", 1, 1)] == identity(dsi, 3, 2, 9)
    assert plan[("dsi", 1, 1)] | {"sp": 3} == {
        "prompt_tokens": 2, "lookahead": 3, "min_drafts": 1, "sp": 3, "tp_size": 1,
        "verify": "exact",
        "temperature": 0.0, "seed": 9, "target": dsi.target, "drafter": dsi.drafter,
        "max_new_tokens": 8, "engine": None}  # emulated models run no engine
    assert plan[("nonsi", 0, 0)]["lookahead"] == 0 and plan[("nonsi", 0, 0)]["drafter"] is None
    assert plan[("nonsi", 0, 0)]["seed"] == 5 and plan[("nonsi", 0, 0)]["sp"] == 1


def test_the_modes_of_one_run_load_the_same_models_and_sampling() -> None:
    from dataclasses import replace

    from dsi_mpi.config import RunConfig
    from dsi_mpi.verify import SamplingParams

    base = RunConfig(target="emulated:tpot_ms=2", drafter="emulated:tpot_ms=1,acceptance=0.9")
    same = [replace(base, mode="si", lookahead=1, sp=None), replace(base, mode="nonsi"),
            replace(base, sampling=SamplingParams(seed=3))]
    assert all(c.loads_as(base) for c in same)
    other = [replace(base, dtype="float64"), replace(base, reuse_cache=True),
             replace(base, sampling=SamplingParams(temperature=0.5)),
             replace(base, target="emulated:tpot_ms=3")]
    assert not any(c.loads_as(base) for c in other)


def test_records_from_before_min_drafts_resume_as_min_drafts_1(tmp_path: Path) -> None:
    """Files written before --min-drafts existed ran every task with any number of drafts."""
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(_record(0)) + "\n")  # no min_drafts field
    ones = {key: {**fields, "min_drafts": 1} for key, fields in PLAN.items()}
    out, resumed = open_output(str(path), True, False, ones)
    out.close()
    assert resumed.done == {("dsi", 0, 0)}
    twos = {key: {**fields, "min_drafts": 2} for key, fields in PLAN.items()}
    with pytest.raises(ConfigError, match="written with min_drafts 1, this run has 2"):
        open_output(str(path), True, False, twos)
