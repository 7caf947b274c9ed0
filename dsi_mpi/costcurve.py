"""What a forward costs in the run: the target's cost curve, and both models beside each other.

``dsi-mpi profile`` times the target's decode one token at a time; a run sends it blocks. On a
CPU a forward of several new tokens takes another matrix-multiply path than a forward of one
(2.3x its cost for 2 tokens on this machine, then flat), and in DSI the drafter drafts while
the target verifies, on the same memory bus when they share a machine. This module measures
both, so that the simulator prices what the run will see:

- the cost curve: after a prompt and all but the last ``k + 1`` of the target's tokens, a
  forward of ``n`` = 1 .. ``k + 1`` new tokens, each timed and cropped back (one per prompt and
  length: the curve is per prompt, its median across prompts goes to the planner);
- the same under load (``shared``): while the target's curve and TTFT are timed (its TPOT is
  the curve's 1-token forward),
  the drafter decodes greedily in a second thread of the same process, one token a forward as
  on a drafter rank; while the drafter's are timed, the target verifies blocks of ``k + 1``
  tokens in that thread. torch releases the GIL inside its kernels, so the two threads compute
  at once, each on the torch threads the process has (``--threads``: set it to what each rank
  will have, e.g. 1 on a 2-core node running a coordinator, a drafter and a target).
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Sequence

from dsi_mpi.backends import Backend

_STOP_WAIT_S = 600.0  # bound on joining the background thread (one forward)


class Background:
    """While open, ``backend`` runs forwards of ``block`` tokens in a thread, back to back:
    it reads ``context`` and then extends its cache ``block`` tokens a forward (tokens of
    ``context`` again), cropping back to the context every ``span`` tokens."""

    def __init__(self, backend: Backend, context: Sequence[int], block: int = 1,
                 span: int = 32) -> None:
        self.backend, self.context = backend, list(context)
        self.block, self.span = block, span
        self.forwards = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from dsi_mpi.profile import GREEDY

        try:
            self.backend.reset()
            self.backend.forward(self.context, GREEDY, num_outputs=1)
            base, i = len(self.context), 0
            while not self._stop.is_set():
                tokens = [self.context[(i + j) % len(self.context)] for j in range(self.block)]
                self.backend.forward(tokens, GREEDY, num_outputs=1)
                self.forwards += 1
                i += self.block
                if self.backend.cached_length() >= base + self.span:
                    self.backend.crop(base)
        except BaseException as exc:  # reported by close()
            self.error = exc

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(_STOP_WAIT_S)
        if self._thread.is_alive():
            raise RuntimeError("the background model did not finish its forward in time")
        if self.error is not None:
            raise RuntimeError(f"the background model failed: {self.error}") from self.error


def curve(target: Backend, prompt: Sequence[int], tokens: Sequence[int],
          lengths: int) -> list[float]:
    """ms of target forwards of 1 .. ``lengths`` new tokens after ``prompt`` and the target's
    ``tokens`` but their last ``lengths`` (the block's tokens), each cropped back."""
    from dsi_mpi.profile import _timed_forward

    context = list(prompt) + list(tokens)
    cut = max(len(prompt), len(context) - lengths)
    block = (context[cut:] + context[:lengths])[:lengths]  # real tokens, wrapped if too few
    target.reset()
    _timed_forward(target, context[:cut])
    out = []
    for n in range(1, lengths + 1):
        _, ms = _timed_forward(target, block[:n])
        target.crop(cut)
        out.append(ms)
    return out


def _median_curve(curves: Sequence[Sequence[float]]) -> list[list[float]]:
    """[[n, median ms], ...] for n >= 2 (the 1-token cost is TPOT)."""
    return [[n, statistics.median(c[n - 1] for c in curves)]
            for n in range(2, len(curves[0]) + 1)]


def _fit(lengths: Sequence[int], ms: Sequence[float]) -> dict:
    """Least squares ms = intercept + per_token * prompt length (flat for one length)."""
    mean_x, mean_y = statistics.fmean(lengths), statistics.fmean(ms)
    var = sum((x - mean_x) ** 2 for x in lengths)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(lengths, ms, strict=True)) / var \
        if var else 0.0
    return {"intercept_ms": mean_y - slope * mean_x, "per_token_ms": slope}


def measure(target: Backend, drafter: Backend, prompts: Sequence[Sequence[int]],
            per_prompt: list[dict], lookahead: int, shared: bool = True) -> dict:
    """The cost curve (into ``per_prompt``'s entries and the returned ``target.block_ms``), TTFT
    against prompt length, and with ``shared`` every latency again with the other model running
    beside it. ``per_prompt`` holds the entries ``profile.measure`` made (with ``tokens``)."""
    from dsi_mpi.profile import _timed_forward, follow

    lengths = lookahead + 1
    curve(target, prompts[0], per_prompt[0]["tokens"], lengths)  # warm-up: new shapes' first use
    for prompt, entry in zip(prompts, per_prompt, strict=True):
        entry["target_curve_ms"] = curve(target, prompt, entry["tokens"], lengths)
    result: dict = {
        "block_ms": _median_curve([e["target_curve_ms"] for e in per_prompt]),
        "ttft_vs_prompt": {
            name: _fit([e["prompt_tokens"] for e in per_prompt],
                       [e[f"{name}_ttft_ms"] for e in per_prompt])
            for name in ("target", "drafter")},
    }
    if not shared:
        return result
    for prompt, entry in zip(prompts, per_prompt, strict=True):
        tokens = entry["tokens"]
        with Background(drafter, prompt):  # the drafter drafts while the target works
            entry["target_curve_shared_ms"] = curve(target, prompt, tokens, lengths)
            target.reset()
            _, entry["target_ttft_shared_ms"] = _timed_forward(target, prompt)
        entry["target_tpot_shared_ms"] = entry["target_curve_shared_ms"][0]
        with Background(target, list(prompt) + list(tokens), block=lengths):
            _, timing = follow(drafter, prompt, tokens)
            entry["drafter_ttft_shared_ms"], entry["drafter_tpot_shared_ms"] = \
                timing.ttft_ms, timing.tpot_ms

    def mean(key: str) -> float:
        values = [e[key] for e in per_prompt if e[key] is not None]
        return statistics.fmean(values) if values else 0.0

    result["shared"] = {
        "target": {"ttft_ms": mean("target_ttft_shared_ms"),
                   "tpot_ms": mean("target_tpot_shared_ms"),
                   "block_ms": _median_curve([e["target_curve_shared_ms"] for e in per_prompt])},
        "drafter": {"ttft_ms": mean("drafter_ttft_shared_ms"),
                    "tpot_ms": mean("drafter_tpot_shared_ms")},
    }
    return result
