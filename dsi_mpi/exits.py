"""How a job ends: exit codes, stop requests from signals, and why a run ended early (pure).

A SIGTERM or SIGINT (Slurm's time limit or preemption, ``scancel``, Ctrl-C; mpiexec forwards
both to every rank) only *requests* a stop: the handler records the signal and returns, and the
transport raises :class:`Stopped` at the rank's next poll, where nothing is half done (a record
being written, a message half received). Before the run starts (rank 0's checks, model loading)
nothing is worth keeping, so there a signal raises at once (:func:`interruptible`).

Whatever ends a run early, the runtime tells the other ranks first and attaches an
:class:`Ending` to the exception it re-raises: the exit code, the one line to print, and
whether every rank took part in the ending. The command line then exits through one path
(``cli.launch.exit_job``): it prints the line, and either finalizes MPI and exits with the code
(every rank ended with it: no MPI noise) or, when some rank is hung or gone, aborts the job.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

EXIT_OK = 0
EXIT_FAILED = 1  # a rank failed or stopped answering
EXIT_BAD_INPUT = 2  # reported by rank 0 before any model loads
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_exit_code(signum: int) -> int:
    """The shell's convention: 128 + the signal's number (143 for SIGTERM, 130 for SIGINT)."""
    return 128 + signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Stopped(BaseException):
    """A signal asked the job to stop. A BaseException, like KeyboardInterrupt: no ``except
    Exception`` on the way up may swallow it."""

    def __init__(self, signum: int, rank: int | None = None) -> None:
        super().__init__(signum, rank)
        self.signum = signum
        self.rank = rank  # the rank that got the signal, when another rank reports it

    def __str__(self) -> str:
        where = f" on rank {self.rank}" if self.rank is not None else ""
        return f"stopped by {signal_name(self.signum)}{where}"


@dataclass(frozen=True)
class Ending:
    """Why a run ended early, as the exit path needs it."""

    code: int
    reason: str  # one line, without the "dsi-mpi: " prefix
    everyone: bool  # every rank ended with this one (exit normally); False: abort the job


def attach(exc: BaseException, ending: Ending) -> BaseException:
    """Record on ``exc`` how the run ended (the runtime re-raises ``exc`` itself, so library
    callers see the original exception)."""
    exc.ending = ending  # type: ignore[attr-defined]
    return exc


def ending_of(exc: BaseException) -> Ending:
    """The ending attached to ``exc``; for any other exception, a failure that must abort."""
    found = getattr(exc, "ending", None)
    if isinstance(found, Ending):
        return found
    if isinstance(exc, Stopped):
        return Ending(signal_exit_code(exc.signum), str(exc), everyone=False)
    return Ending(EXIT_FAILED, f"{type(exc).__name__}: {exc}", everyone=False)


# ----------------------------------------------------------------- stop requests


class _Requests:
    signum: int | None = None  # the first stop signal received, until taken
    taken = False  # a Stopped was raised for it: later signals ask for the same stop
    immediate = 0  # > 0 inside interruptible(): the handler raises at once


_state = _Requests()


def _handler(signum: int, frame: object) -> None:
    if _state.taken:
        return  # the stop is under way (Slurm signals every process and mpiexec forwards: two)
    if _state.signum is None:
        _state.signum = signum
    if _state.immediate:
        take_stop()


def install_signal_handlers() -> None:
    """SIGTERM and SIGINT request a stop (instead of killing the process or raising
    KeyboardInterrupt wherever the main thread happens to be)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)


def stop_pending() -> bool:
    """Whether a stop was requested and not yet taken (cheap: polled between forwards)."""
    return _state.signum is not None and not _state.taken


def take_stop() -> None:
    """Raise :class:`Stopped` if a stop was requested and not yet taken; once only."""
    if _state.signum is not None and not _state.taken:
        _state.taken = True
        raise Stopped(_state.signum)


def reset() -> None:
    """Forget every request (tests)."""
    _state.signum, _state.taken, _state.immediate = None, False, 0


@contextmanager
def interruptible() -> Iterator[None]:
    """A stretch with nothing to keep (checks, model loading): a stop request raises at once."""
    _state.immediate += 1
    try:
        take_stop()
        yield
    finally:
        _state.immediate -= 1
