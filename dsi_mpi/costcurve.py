"""What a forward costs in the run: the target's cost curve, and both models beside each other.

``dsi-mpi profile`` times the target's decode one token at a time; a run sends it blocks. On a
CPU a forward of several new tokens takes another matrix-multiply path than a forward of one
(2.3x its cost for 2 tokens on this machine, then flat), and in DSI the drafter drafts while
the target verifies, on the same memory bus when they share a machine. This module measures
both, so that the simulator prices what the run will see:

- the cost curve: after a prompt and all but the last few of the target's tokens, a forward
  of ``n`` = 1 .. ``2k + 1`` new tokens (:func:`curve_lengths`: DSI at SP 1 sends a task with
  every draft of its run-ahead, ``2k``, and the token before them), each timed and cropped
  back (one per prompt and length: the curve is per prompt, its median across prompts goes to
  the planner);
- the same under load (``shared``): while the target's curve and TTFT are timed (its TPOT is
  the curve's 1-token forward), the drafter decodes greedily beside it, one token a forward as
  on a drafter rank; while the drafter's are timed, the target verifies blocks of ``k + 1``
  tokens beside it. The other model runs in a process of its own (:class:`InProcess`), as
  another rank would, on the torch threads each rank will have (``--threads``, e.g. 1 on a
  2-core node running a coordinator, a drafter and a target). A second thread of the same
  process (:class:`Background`) was tried first: in one process the two models' Python halves
  take turns on the GIL, which couples them as two ranks never are. With one-output forwards
  the thread understated what the drafter costs the target (1-4% against 8-15% in a process),
  with every position's logits it overstated it (16-29% against 2-18%; ``bench/beside.py``,
  Qwen2.5-Coder 1.5B / 0.5B on 2 cores, docs/results.md).
"""

from __future__ import annotations

import multiprocessing
import statistics
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from dsi_mpi.backends import Backend
from dsi_mpi.verify import SamplingParams

_STOP_WAIT_S = 600.0  # bound on joining the background thread (one forward)
_LOAD_WAIT_S = 1800.0  # bound on the other process loading its model (a conversion included)
_START_WAIT_S = 600.0  # ... and on its prefill, or its last forward
SPAN = 32  # the model beside crops back to its context every SPAN tokens

Beside = Callable[[Sequence[int], int], AbstractContextManager[Any]]  # (context, block): running


def run_beside(backend: Backend, context: Sequence[int], block: int, span: int,
               stopped: Callable[[], bool], started: Callable[[], None] | None = None) -> int:
    """What the model beside does, in a thread or a process: read ``context``, then forwards of
    ``block`` tokens (tokens of ``context`` again, every position's logits as a verification)
    back to back until ``stopped()``, cropping back to the context every ``span`` tokens.
    ``started`` is told when the prefill is done. Returns the forwards after it."""
    greedy = SamplingParams()
    backend.reset()
    backend.forward(context, greedy, num_outputs=1)
    if started is not None:
        started()
    base, i, forwards = len(context), 0, 0
    while not stopped():
        tokens = [context[(i + j) % len(context)] for j in range(block)]
        backend.forward(tokens, greedy, num_outputs=block)
        forwards, i = forwards + 1, i + block
        if backend.cached_length() >= base + span:
            backend.crop(base)
    return forwards


def curve_lengths(lookahead: int) -> int:
    """The longest forward the cost curve measures: DSI at SP 1 may send a task with every
    draft of its run-ahead (``2 * lookahead``) and the token before them."""
    return 2 * lookahead + 1


class Background:
    """While open, ``backend`` runs forwards of ``block`` tokens in a thread, back to back:
    it reads ``context`` and then extends its cache ``block`` tokens a forward (tokens of
    ``context`` again), cropping back to the context every ``span`` tokens."""

    def __init__(self, backend: Backend, context: Sequence[int], block: int = 1,
                 span: int = SPAN) -> None:
        self.backend, self.context = backend, list(context)
        self.block, self.span = block, span
        self.forwards = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.forwards = run_beside(self.backend, self.context, self.block, self.span,
                                       self._stop.is_set)
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


class InProcess:
    """Another model computing in a process of its own, as another rank would: loaded once by
    ``loader`` (a picklable callable returning a Backend, e.g. a ``functools.partial`` of
    ``load_backend``) on ``threads`` torch threads; ``running(context, block)`` is open while
    it runs forwards of ``block`` tokens after ``context``, back to back (as
    :class:`Background`). Open (``with``) for one phase, it gives ``running``; every wait is
    bounded; the process is ended on close."""

    def __init__(self, loader: Callable[[], Backend], threads: int | None) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with torch threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, loader, threads), daemon=True)
        self._proc.start()
        child.close()
        self._expect("ready", _LOAD_WAIT_S, "load its model")

    def _expect(self, what: str, timeout_s: float, doing: str) -> Any:
        if not self._conn.poll(timeout_s):
            self.close()
            raise RuntimeError(f"the model beside did not {doing} in {timeout_s:g} s")
        kind, value = self._conn.recv()
        if kind != what:
            self.close()
            raise RuntimeError(f"the model beside failed: {value}")
        return value

    @contextmanager
    def running(self, context: Sequence[int], block: int = 1) -> Iterator[None]:
        self._conn.send(("run", list(context), block))
        self._expect("started", _START_WAIT_S, "prefill")
        try:
            yield
        finally:
            self._conn.send(("stop", None))
            self._expect("stopped", _START_WAIT_S, "finish its forward")

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(("quit", None))
            except OSError:
                pass
            self._proc.join(10)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(10)
        self._conn.close()

    def __enter__(self) -> Beside:
        return self.running

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _serve(conn: Any, loader: Callable[[], Backend], threads: int | None) -> None:
    """The process of :class:`InProcess`: load, then run forwards while asked to. It imports
    nothing that starts MPI (``dsi_mpi.profile`` does): under mpiexec the parent's rank is
    not its own."""
    try:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        backend = loader()
        conn.send(("ready", None))
        while True:
            kind, *args = conn.recv()
            if kind == "quit":
                return
            context, block = args
            forwards = run_beside(backend, context, block, SPAN, conn.poll,
                                  lambda: conn.send(("started", None)))
            kind, _ = conn.recv()
            conn.send(("stopped", forwards))
            if kind == "quit":
                return
    except BaseException as exc:  # told to the parent, which raises it
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass


def in_thread(backend: Backend) -> AbstractContextManager[Beside]:
    """``backend`` beside, in a thread of this process (:class:`Background`), for a phase."""
    return nullcontext(lambda context, block: Background(backend, context, block=block))


def curve(target: Backend, prompt: Sequence[int], tokens: Sequence[int],
          lengths: int, every_output: bool = True) -> list[float]:
    """ms of target forwards of 1 .. ``lengths`` new tokens after ``prompt`` and the target's
    ``tokens`` but their last ``lengths`` (the block's tokens), each cropped back. Each computes
    the logits of all its positions, as a verification does: on a CPU the vocabulary
    projection of n positions takes the multi-token path too, which a curve of one-output
    forwards missed (docs/results.md, issue 22). ``every_output=False``: one output, as a
    drafter's forward of several tokens (tokens it lacks, then the draft)."""
    from dsi_mpi.profile import _timed_forward

    context = list(prompt) + list(tokens)
    cut = max(len(prompt), len(context) - lengths)
    block = (context[cut:] + context[:lengths])[:lengths]  # real tokens, wrapped if too few
    target.reset()
    _timed_forward(target, context[:cut])
    out = []
    for n in range(1, lengths + 1):
        _, ms = _timed_forward(target, block[:n], num_outputs=n if every_output else 1)
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
            per_prompt: list[dict], lookahead: int, shared: bool = True,
            beside: tuple[Callable[[], AbstractContextManager[Beside]],
                          Callable[[], AbstractContextManager[Beside]]] | None = None) -> dict:
    """The cost curve (into ``per_prompt``'s entries and the returned ``target.block_ms``), TTFT
    against prompt length, and with ``shared`` every latency again with the other model running
    beside it. ``per_prompt`` holds the entries ``profile.measure`` made (with ``tokens``).
    ``beside``: (the drafter beside the target, the target beside the drafter), each opened
    for its phase, e.g. an :class:`InProcess` maker; default: the loaded models, each in a
    thread (:func:`in_thread`)."""
    from dsi_mpi.profile import _timed_forward, follow
    from dsi_mpi.translate import TranslatingDrafter

    lengths = curve_lengths(lookahead)
    # The drafter's forwards of 1 .. k + 1 tokens: a draft after tokens it lacks (SI's bonus
    # token after its last draft, committed tokens). Not for a translating drafter, whose
    # forwards are its own model's and vary with the text.
    drafter_curve = not isinstance(drafter, TranslatingDrafter)
    curve(target, prompts[0], per_prompt[0]["tokens"], lengths)  # warm-up: new shapes' first use
    for prompt, entry in zip(prompts, per_prompt, strict=True):
        entry["target_curve_ms"] = curve(target, prompt, entry["tokens"], lengths)
        if drafter_curve:
            entry["drafter_curve_ms"] = curve(drafter, prompt, entry["tokens"], lookahead + 1,
                                              every_output=False)
    result: dict = {
        "block_ms": _median_curve([e["target_curve_ms"] for e in per_prompt]),
        "drafter_block_ms": (_median_curve([e["drafter_curve_ms"] for e in per_prompt])
                             if drafter_curve else []),
        "ttft_vs_prompt": {
            name: _fit([e["prompt_tokens"] for e in per_prompt],
                       [e[f"{name}_ttft_ms"] for e in per_prompt])
            for name in ("target", "drafter")},
    }
    if not shared:
        return result
    drafter_beside, target_beside = beside or (lambda: in_thread(drafter),
                                               lambda: in_thread(target))
    with drafter_beside() as running:  # the drafter drafts while the target works
        for prompt, entry in zip(prompts, per_prompt, strict=True):
            with running(prompt, 1):
                entry["target_curve_shared_ms"] = curve(target, prompt, entry["tokens"], lengths)
                target.reset()
                _, entry["target_ttft_shared_ms"] = _timed_forward(target, prompt)
            entry["target_tpot_shared_ms"] = entry["target_curve_shared_ms"][0]
    with target_beside() as running:  # the target verifies blocks while the drafter drafts
        for prompt, entry in zip(prompts, per_prompt, strict=True):
            tokens = entry["tokens"]
            with running(list(prompt) + list(tokens), lookahead + 1):
                _, timing = follow(drafter, prompt, tokens)
                if drafter_curve:
                    entry["drafter_curve_shared_ms"] = curve(drafter, prompt, tokens,
                                                             lookahead + 1, every_output=False)
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
                    "tpot_ms": mean("drafter_tpot_shared_ms"),
                    "block_ms": (_median_curve([e["drafter_curve_shared_ms"] for e in per_prompt])
                                 if drafter_curve else [])},
    }
    return result
