"""The command-line package: every command's flags and help texts as documented, and rank 0's
checks reaching every rank as one typed verdict (its errors raised alike everywhere)."""

from __future__ import annotations

import argparse
import json
import os
import signal

import pytest

from dsi_mpi.cli import make_parser
from dsi_mpi.cli.launch import Checked, Outcome, Verdict, check_on_rank_0
from dsi_mpi.config import ConfigError
from dsi_mpi.exits import EXIT_FAILED, Stopped, ending_of
from dsi_mpi.results import Resumed

GOLDEN = os.path.join(os.path.dirname(__file__), os.pardir, "data", "cli_help.json")


def _describe(parser: argparse.ArgumentParser) -> dict:
    """Every flag of a parser and of its subcommands: names, help, default, choices."""
    out: dict = {"description": parser.description, "actions": []}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in a._choices_actions}
            out["commands"] = {name: {"help": helps.get(name), **_describe(p)}
                               for name, p in a.choices.items()}
            continue
        simple = isinstance(a.default, (int, float, str, bool, type(None)))
        out["actions"].append({"flags": list(a.option_strings) or [a.dest], "help": a.help,
                               "default": a.default if simple else repr(a.default),
                               "choices": list(a.choices) if a.choices else None,
                               "required": a.required, "nargs": a.nargs, "metavar": a.metavar})
    return out


def test_every_command_keeps_its_flags_and_help_texts() -> None:
    """The flags, defaults and help of every command, as recorded in tests/data/cli_help.json
    (a deliberate change of the command line updates that file in the same commit)."""
    with open(GOLDEN, encoding="utf-8") as fh:
        golden = json.load(fh)
    assert json.loads(json.dumps(_describe(make_parser()))) == golden


class _Comm:
    """The one collective check_on_rank_0 uses, for one rank of a job whose rank 0 said
    ``verdict`` (rank 0 itself broadcasts what it computed)."""

    def __init__(self, rank: int, verdict: Verdict | None = None) -> None:
        self.rank, self.verdict = rank, verdict

    def Get_rank(self) -> int:
        return self.rank

    def bcast(self, value: object, root: int = 0) -> object:
        return value if self.rank == root else self.verdict


def _checked(output: object = "file") -> Checked:
    return Checked(prompts=[], tokenizer=None, output=output, resumed=Resumed(frozenset(), False))


def _verdict_of(check) -> tuple[Verdict, BaseException | None]:
    """The verdict rank 0 broadcasts, and what check_on_rank_0 raised there."""
    sent: list[Verdict] = []

    class Spy(_Comm):
        def bcast(self, value: object, root: int = 0) -> object:
            sent.append(value)
            return value

    try:
        check_on_rank_0(Spy(0), check)
    except BaseException as exc:  # noqa: B036 - Stopped is a BaseException
        return sent[0], exc
    return sent[0], None


def test_rank_0_checks_that_pass_give_ready_or_done() -> None:
    assert check_on_rank_0(_Comm(0), _checked)[0] == Verdict(Outcome.READY)
    verdict, checked = check_on_rank_0(_Comm(0), lambda: _checked(output=None))
    assert verdict == Verdict(Outcome.DONE) and checked is not None and checked.output is None
    # The other ranks get the verdict and nothing of rank 0's; their check never runs.
    assert check_on_rank_0(_Comm(1, Verdict(Outcome.DONE)), _fail) == (Verdict(Outcome.DONE), None)


def _fail() -> Checked:
    raise AssertionError("a check ran on a rank other than 0")


def _raises(exc: BaseException):
    def check() -> Checked:
        raise exc
    return check


def test_bad_input_on_rank_0_is_a_config_error_on_every_rank() -> None:
    """A ConfigError (exit 2, one line from rank 0: main's handler) on rank 0 and elsewhere."""
    message = "--output: directory '/x' does not exist"
    verdict, raised = _verdict_of(_raises(ConfigError(message)))
    assert verdict == Verdict(Outcome.BAD_INPUT, message)
    assert isinstance(raised, ConfigError) and str(raised) == message
    with pytest.raises(ConfigError, match=f"^{message}$"):
        check_on_rank_0(_Comm(1, verdict), _fail)


def test_a_signal_during_the_checks_stops_every_rank_with_its_code() -> None:
    verdict, raised = _verdict_of(_raises(Stopped(signal.SIGTERM)))
    assert verdict == Verdict(Outcome.STOPPED, signum=signal.SIGTERM)
    with pytest.raises(Stopped) as info:
        check_on_rank_0(_Comm(2, verdict), _fail)
    ending = ending_of(info.value)
    assert ending.code == 128 + signal.SIGTERM and ending.everyone
    assert ending.reason == "stopped by SIGTERM before the run began"
    assert isinstance(raised, Stopped) and ending_of(raised) == ending


def test_an_unexpected_failure_on_rank_0_fails_every_rank_naming_rank_0(capsys) -> None:
    verdict, raised = _verdict_of(_raises(KeyError("prompt")))
    assert verdict.outcome is Outcome.FAILED
    assert verdict.message == "error: rank 0 failed checking the input: KeyError: 'prompt'"
    assert "Traceback" in capsys.readouterr().err  # rank 0 printed it: a bug, it helps
    with pytest.raises(RuntimeError) as info:
        check_on_rank_0(_Comm(3, verdict), _fail)
    ending = ending_of(info.value)
    assert (ending.code, ending.reason, ending.everyone) == (EXIT_FAILED, verdict.message, True)
    assert isinstance(raised, RuntimeError) and ending_of(raised) == ending
