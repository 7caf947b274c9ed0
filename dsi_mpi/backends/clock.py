"""Counting and timing a model's forwards, for ``dsi-mpi profile`` (kept out of the backends)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class ForwardClock:
    """Counts the forwards it runs and, when ``timed``, the seconds they take (a GPU's queue is
    synchronised first, so the time is the forward's, not its launch's)."""

    def __init__(self) -> None:
        self.forwards = 0
        self.timed = False
        self.seconds = 0.0

    def run(self, forward: Callable[[], T]) -> T:
        start = time.perf_counter() if self.timed else 0.0
        out = forward()
        self.forwards += 1
        if self.timed:
            _synchronize(out)
            self.seconds += time.perf_counter() - start
        return out


def _synchronize(out: Any) -> None:
    device = getattr(out, "device", None)
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
