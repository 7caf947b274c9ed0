"""The command line: ``dsi-mpi run`` (under mpiexec or srun) and the offline tools.

The only argparse in the package, one module per group of commands:

- ``run.py``: ``run``, and ``launch.py`` beside it: rank 0's checks shared with every rank, and
  the one exit path of every process;
- ``offline.py``: ``simulate``, ``plan``, ``heatmap`` (the policy on a virtual clock);
- ``measure.py``: ``profile`` (what plan needs, measured), ``timeline`` and ``report`` (what a
  run recorded).

:func:`main` parses, runs the command and leaves through :func:`launch.exit_job` whatever
happens: 0 done, 1 a rank failed or stopped answering, 2 bad input (one line, rank 0), 128 + N
stopped by signal N.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from dsi_mpi.cli.common import Parser
from dsi_mpi.cli.launch import exit_job, rank
from dsi_mpi.cli.measure import (
    add_profile,
    add_views,
    profile_command,
    report_command,
    timeline_command,
)
from dsi_mpi.cli.offline import add_offline, heatmap_command, plan_command, simulate_command
from dsi_mpi.cli.run import add_run, build_configs, run_command
from dsi_mpi.config import ConfigError
from dsi_mpi.exits import EXIT_BAD_INPUT, EXIT_OK, Stopped, ending_of

__all__ = ["build_configs", "main", "make_parser"]

COMMANDS = {"run": run_command, "simulate": simulate_command, "plan": plan_command,
            "heatmap": heatmap_command, "profile": profile_command,
            "timeline": timeline_command, "report": report_command}


def make_parser() -> Parser:
    parser = Parser(prog="dsi-mpi", description="Distributed Speculative Inference over MPI")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_run(sub)
    add_offline(sub)
    add_profile(sub)
    add_views(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = make_parser().parse_args(argv)
        return exit_job(COMMANDS[args.command](args), None, everyone=True)
    except ConfigError as exc:  # found alike on every rank (or broadcast by rank 0)
        return exit_job(EXIT_BAD_INPUT, f"error: {exc}" if rank() == 0 else None, everyone=True)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, already printed)
        code = exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
        return exit_job(code, None, everyone=True)
    except BaseException as exc:  # a signal, a failure: the job ends, never hangs
        ending = ending_of(exc)
        if "ending" not in vars(exc) and not isinstance(exc, (Stopped, KeyboardInterrupt)):
            import traceback

            traceback.print_exc()  # outside the run: a bug, its traceback helps
        # A clean ending is told by rank 0 alone; a rank that ends the job alone says why.
        speak = rank() == 0 or not ending.everyone
        return exit_job(ending.code if speak else EXIT_OK, ending.reason if speak else None,
                        ending.everyone)
