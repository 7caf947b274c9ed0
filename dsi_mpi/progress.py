"""Progress of a run on rank 0: records done out of prompts x modes x repeats, with an ETA.

On a terminal a tqdm bar; elsewhere (a Slurm output file, a pipe) one plain line for the first
record, then at most one every ``interval_s`` seconds, and one for the last; nothing with
``quiet``. The runtime calls :meth:`Progress.done` once per record, as the record is made.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

INTERVAL_S = 5.0


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    def __init__(self, total: int, stream: IO[str] | None = None, quiet: bool = False,
                 interval_s: float = INTERVAL_S, bar: bool | None = None) -> None:
        """``bar``: a tqdm bar (default: when ``stream`` is a terminal)."""
        self.total = total
        self.stream = sys.stderr if stream is None else stream
        self.quiet = quiet
        self.interval_s = interval_s
        self.count = 0
        self.started = time.monotonic()
        self._printed: float | None = None
        self._bar: Any = None
        if bar is None:
            bar = not quiet and hasattr(self.stream, "isatty") and self.stream.isatty()
        if bar and not quiet:
            from tqdm import tqdm

            self._bar = tqdm(total=total, file=self.stream, unit="record", desc="dsi-mpi",
                             dynamic_ncols=True)

    def eta_s(self) -> float | None:
        """Seconds left at the mean pace so far (None before the first record)."""
        if not self.count:
            return None
        return (time.monotonic() - self.started) / self.count * (self.total - self.count)

    def line(self, record: dict) -> str:
        elapsed = time.monotonic() - self.started
        eta = self.eta_s()
        share = 100 * self.count / max(1, self.total)
        return (f"dsi-mpi: {self.count}/{self.total} records ({share:.0f}%), "
                f"last {record.get('mode')} prompt {record.get('prompt_index')} "
                f"repeat {record.get('repeat', 0)}, "
                f"{_clock(elapsed)} elapsed, ETA {_clock(eta or 0.0)}")

    def done(self, record: dict) -> None:
        """One record is complete."""
        self.count += 1
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(f"{record.get('mode')} prompt {record.get('prompt_index')}",
                                      refresh=False)
            self._bar.update(1)
            if self.count >= self.total:
                self.close()
            return
        now = time.monotonic()
        due = self._printed is None or now - self._printed >= self.interval_s
        if due or self.count >= self.total:
            self._printed = now
            print(self.line(record), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
