"""How a ``dsi-mpi`` process starts and ends: rank 0's checks shared with every rank, and the one
exit path.

Rank 0 checks what needs files (the output, the model folders, the prompts) before any model
loads, and every rank learns the outcome as one typed :class:`Verdict` (a broadcast): the run
goes on, there is nothing left to do, or rank 0's error is raised alike on every rank (a
:class:`ConfigError` as a ConfigError, a signal as :class:`Stopped`, anything else as a failure
that names rank 0), so every rank leaves through the same path with the same code.

Every way out passes through :func:`exit_job`: it prints the reason (one line, rank 0 or the one
rank that knows it), then finalizes MPI and exits with the code when every rank ends with it
(no MPI noise), or aborts the job when a rank is hung or gone. Exit codes: 0 done, 1 a rank
failed or stopped answering, 2 bad input, 128 + N stopped by signal N (143 for SIGTERM, 130
for SIGINT); ``docs/reliability.md`` lists every fault.
"""

from __future__ import annotations

import enum
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dsi_mpi.config import ConfigError
from dsi_mpi.exits import EXIT_FAILED, Ending, Stopped, attach, signal_exit_code

if TYPE_CHECKING:
    from mpi4py import MPI

    from dsi_mpi.preflight import Prompt
    from dsi_mpi.results import ResultsFile, Resumed

ABORT_DELAY_S = 0.1  # lets the launcher forward the reason before MPI_Abort ends the job


@dataclass
class Checked:
    """What rank 0 keeps of its checks: the prompts, the tokenizer, the output opened for
    appending (None: the output already holds every record of this run) and what it held."""

    prompts: list[Prompt]
    tokenizer: Any  # a transformers tokenizer, or None (token ids only)
    output: ResultsFile | None
    resumed: Resumed


class Outcome(enum.Enum):
    READY = "ready"  # the run goes on
    DONE = "done"  # a resumed output is already complete: nothing to run
    BAD_INPUT = "bad input"  # a ConfigError: exit 2
    STOPPED = "stopped"  # a signal during the checks
    FAILED = "failed"  # an unexpected error (rank 0 printed its traceback)


@dataclass(frozen=True)
class Verdict:
    """What every rank learns of rank 0's checks (small and picklable: it is broadcast)."""

    outcome: Outcome
    message: str = ""  # BAD_INPUT and FAILED: the one line
    signum: int = 0  # STOPPED: the signal

    def raise_failure(self) -> None:
        """Rank 0's error, raised alike on every rank; nothing for READY and DONE."""
        if self.outcome is Outcome.BAD_INPUT:
            raise ConfigError(self.message)
        if self.outcome is Outcome.STOPPED:
            stopped = Stopped(self.signum)
            reason = f"{stopped} before the run began"
            raise attach(stopped, Ending(signal_exit_code(self.signum), reason, everyone=True))
        if self.outcome is Outcome.FAILED:
            raise attach(RuntimeError(self.message),
                         Ending(EXIT_FAILED, self.message, everyone=True))


def check_on_rank_0(comm: MPI.Comm, check: Callable[[], Checked]) -> tuple[Verdict, Checked | None]:
    """``check()`` on rank 0 and its verdict on every rank (collective over ``comm``).

    Returns the verdict (READY or DONE) and, on rank 0, what the check returned; raises rank 0's
    error on every rank (:meth:`Verdict.raise_failure`)."""
    checked: Checked | None = None
    verdict: Verdict | None = None
    if comm.Get_rank() == 0:
        try:
            checked = check()
            verdict = Verdict(Outcome.DONE if checked.output is None else Outcome.READY)
        except ConfigError as exc:
            verdict = Verdict(Outcome.BAD_INPUT, str(exc))
        except Stopped as exc:
            verdict = Verdict(Outcome.STOPPED, signum=exc.signum)
        except Exception as exc:  # every rank must learn it
            traceback.print_exc()
            verdict = Verdict(Outcome.FAILED, "error: rank 0 failed checking the input: "
                                              f"{type(exc).__name__}: {exc}")
    verdict = comm.bcast(verdict, root=0)
    verdict.raise_failure()
    return verdict, checked


def rank() -> int:
    """This process's MPI rank, without initialising MPI: from the launcher's environment."""
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            return MPI.COMM_WORLD.Get_rank()
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def world_size() -> int | None:
    """The job's size from the launcher's environment, or None where it does not say."""
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None


def exit_job(code: int, reason: str | None, everyone: bool) -> int:
    """The one way out: print the reason, then end MPI: finalize when every rank ends with this
    one (``everyone``: no MPI noise, the code is the exit code), abort the job otherwise (a
    rank is hung or gone: MPI_Abort is the only way to end it)."""
    if reason:
        print(f"dsi-mpi: {reason}", file=sys.stderr, flush=True)
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            if not everyone:
                sys.stdout.flush()
                time.sleep(ABORT_DELAY_S)
                MPI.COMM_WORLD.Abort(code)
            # Finalized here, a non-zero exit does not make ``python -m mpi4py`` abort the job
            # (and print MPICH's "Abort(N)" lines) on its way out.
            MPI.Finalize()
    return code
