"""Discrete-event simulator: the MPI runtime's policy on a virtual clock.

It drives the very same :class:`~dsi_mpi.policy.Policy` as the coordinator, with emulated
models (the synthetic language of ``backends/emulated.py``, acceptance i.i.d. per token) whose
forwards take TTFT on an empty cache and otherwise TPOT, or the target's cost curve for its
number of tokens (``Latencies``), with other costs while the other model runs at once. By
default messages cost nothing and a cancelled forward stops at once: the *ideal* time of the
policy, the yardstick for the runtime's overhead, and what the planner and the heatmaps use.
A :class:`MessageModel` makes it see what the runtime sees: a delivery time per message,
targets that notice a CANCEL only at their cancellation checks, and busy ranks whose polls
miss messages already delivered.

Model of each role, matching the runtime:
- drafter: one forward per draft; messages that arrive during a forward apply after it (the
  drafter polls between forwards; an idle drafter applies them at once), except a Rollback,
  Start or Stop, which abandons the forward at its next cancellation check;
- target server: one forward per task, priced by its number of tokens; a cancelled forward
  stops at the first cancellation check after the CANCEL arrives, its cache cropped back to
  the task's ``keep``;
- coordinator: reacts instantly.
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dsi_mpi.backends.emulated import EmulatedBackend, EmulatedSpec, block_cost
from dsi_mpi.metrics import Counters
from dsi_mpi.policy import DRAFTER, Policy, PromptRun, Send, default_run_ahead
from dsi_mpi.protocol import PREEMPTS_DRAFT, Cancel, Draft, DrafterMessage, Result, Verify
from dsi_mpi.worker import DrafterWorker, TargetWorker

PROMPT = (1, 2, 3, 4)
MODES = ("dsi", "si", "nonsi")


@dataclass(frozen=True)
class MessageModel:
    """What messages cost; the default is the ideal: free and instant."""

    latency_ms: float = 0.0  # one-way delivery time of every message
    cancel_check_ms: float = 0.0  # how often a target checks for CANCEL in a forward (0: always)
    # Between-forward polls of a busy drafter (and cancellation checks of a target) that miss a
    # message already delivered: MPICH's Iprobe reported arrived messages only at its 2nd to 5th
    # call, and the runtime before the forced-commit fix (docs/design.md, "Forced commits")
    # probed once per forward (1 here). 0 since then.
    poll_misses: int = 0

    def __post_init__(self) -> None:
        if self.latency_ms < 0 or self.cancel_check_ms < 0 or self.poll_misses < 0:
            raise ValueError(f"message model values must be >= 0: {self}")

    @property
    def ideal(self) -> bool:
        return self == IDEAL


IDEAL = MessageModel()


@dataclass(frozen=True)
class Latencies:
    """Forward latencies in milliseconds; TTFT is the first forward of a prompt.

    ``target_block_ms`` is the target's cost curve: (new tokens, ms) of a forward of two or more
    tokens on a warm cache (interpolated as ``emulated.block_cost`` does; empty: every such
    forward costs TPOT). ``shared`` holds the same latencies measured while the other model
    runs at once on the same machine (``dsi-mpi profile`` measures both): a target forward that
    starts while the drafter is busy costs ``shared``'s, and a drafter forward that starts
    while a target server is busy; None: running at once costs nothing (separate GPUs).
    """

    target_tpot_ms: float
    drafter_tpot_ms: float
    target_ttft_ms: float | None = None  # default: target_tpot_ms
    drafter_ttft_ms: float | None = None  # default: drafter_tpot_ms
    target_block_ms: tuple[tuple[int, float], ...] = ()
    shared: Latencies | None = None
    # the drafter's cost curve: a draft that first feeds tokens it lacks (SI's bonus token
    # after its last draft, committed tokens after a rollback) is a forward of several tokens
    drafter_block_ms: tuple[tuple[int, float], ...] = ()

    @property
    def target_ttft(self) -> float:
        return self.target_tpot_ms if self.target_ttft_ms is None else self.target_ttft_ms

    @property
    def drafter_ttft(self) -> float:
        return self.drafter_tpot_ms if self.drafter_ttft_ms is None else self.drafter_ttft_ms

    def target_forward_ms(self, new_tokens: int) -> float:
        """A warm target forward of ``new_tokens`` tokens."""
        return block_cost(self.target_tpot_ms, self.target_block_ms, new_tokens)

    def drafter_forward_ms(self, new_tokens: int) -> float:
        """A warm drafter forward of ``new_tokens`` tokens."""
        return block_cost(self.drafter_tpot_ms, self.drafter_block_ms, new_tokens)

    def target_spec(self, vocab: int, seed: int) -> EmulatedSpec:
        return EmulatedSpec(self.target_tpot_ms, self.target_ttft, None, vocab, seed,
                            self.target_block_ms)

    def while_other_runs(self, busy: bool) -> Latencies:
        """The latencies of a forward that starts while the other model is ``busy`` or not."""
        return self.shared if busy and self.shared is not None else self


@dataclass
class SimRun:
    """One simulated generation."""

    latency_ms: float
    counters: Counters
    queued_ms: float  # virtual time during which some task waited for a free server
    queued_after_prefill_ms: float = 0.0  # the same, from the first target result on
    tokens: list[int] = field(default_factory=list)  # the committed output


@dataclass
class SimSummary:
    mode: str
    lookahead: int
    sp: int
    tokens: int
    runs: list[SimRun] = field(default_factory=list)
    min_drafts: int = 1  # dsi: a task carries no drafts or at least this many

    @property
    def latencies(self) -> list[float]:
        return [r.latency_ms for r in self.runs]

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.latencies)

    @property
    def std_ms(self) -> float:
        return statistics.pstdev(self.latencies) if len(self.runs) > 1 else 0.0

    def as_dict(self) -> dict[str, Any]:
        accepted = sum(r.counters.accepted for r in self.runs)
        verified = sum(r.counters.verified for r in self.runs)
        return {
            "mode": self.mode,
            "mean_ms": self.mean_ms,
            "std_ms": self.std_ms,
            "median_ms": statistics.median(self.latencies),
            "lookahead": self.lookahead,
            "min_drafts": self.min_drafts,
            "sp": self.sp,
            "tokens": self.tokens,
            "repeats": len(self.runs),
            "observed_acceptance": accepted / verified if verified else 0.0,
            # committed tokens the target gave where no draft had arrived: near 1, DSI is non-SI
            "forced_share": (sum(r.counters.forced for r in self.runs)
                             / max(1, sum(len(r.tokens) for r in self.runs))),
            "queued_ms": statistics.fmean(r.queued_ms for r in self.runs),
            "queued_after_prefill_ms": statistics.fmean(
                r.queued_after_prefill_ms for r in self.runs),
        }


class _Simulation:
    def __init__(self, mode: str, lat: Latencies, acceptance: float, lookahead: int, sp: int,
                 tokens: int, seed: int, vocab: int = 32000, prompt: Sequence[int] = PROMPT,
                 run_ahead: int | None = None, messages: MessageModel = IDEAL,
                 prompt_run: type[PromptRun] = PromptRun, preempt_drafter: bool = True,
                 min_drafts: int = 1) -> None:
        self.prompt = tuple(prompt)
        target = lat.target_spec(vocab, seed)
        drafter = EmulatedSpec(lat.drafter_tpot_ms, lat.drafter_ttft, acceptance, vocab, seed)
        servers = list(range(sp if mode == "dsi" else 1))
        if mode == "si" or run_ahead is None:
            run_ahead = default_run_ahead(mode, lookahead, len(servers))
        self.policy = Policy(mode, servers, lookahead, run_ahead, tokens, prompt_run=prompt_run,
                             min_drafts=min_drafts)
        self.lat = lat
        self.msg = messages
        self.now = 0.0
        self._events: list[tuple[float, int, str, tuple[Any, ...]]] = []
        self._seq = 0
        # events to handle at `now`, first
        self._pending: deque[tuple[str, tuple[Any, ...]]] = deque()
        self.servers = {s: TargetWorker(EmulatedBackend(target, sleep=False)) for s in servers}
        # server -> (task, version, start, end): the forward in flight and when it ends
        self._running: dict[int, tuple[Verify, int, float, float]] = {}
        self._outputs: dict[int, Result] = {}  # server -> what its running task returns
        self._version = 0
        self.queued_ms = 0.0
        self.queued_after_prefill_ms = 0.0
        self._queued_since: float | None = None
        self._prefill_done: float | None = None
        self.drafter = DrafterWorker(EmulatedBackend(drafter, sleep=False))
        self._d_busy = False
        self._d_inbox: deque[DrafterMessage] = deque()
        self._d_misses = 0  # polls left that miss the messages in the inbox
        self._d_forward = 0  # numbers the drafter's forwards, so an abandoned one is ignored
        self._d_started = self._d_ends = 0.0
        self.preempt_drafter = preempt_drafter

    def _push(self, delay: float, kind: str, payload: tuple[Any, ...]) -> None:
        """An event ``delay`` ms from now; with no delay, before any other event at ``now``
        (so the ideal simulation handles a reply right after what caused it)."""
        if delay == 0:
            self._pending.append((kind, payload))
            return
        self._seq += 1
        heapq.heappush(self._events, (self.now + delay, self._seq, kind, payload))

    def run(self) -> SimRun:
        self._apply(self.policy.begin(self.prompt))
        while not self.policy.finished:
            if self._pending:
                kind, payload = self._pending.popleft()
            else:
                self.now, _, kind, payload = heapq.heappop(self._events)
            self._apply(self._deliver(kind, payload))
            self._track_queue()
        return SimRun(self.now, self.policy.counters, self.queued_ms, self.queued_after_prefill_ms,
                      list(self.policy.output))

    def _track_queue(self) -> None:
        if self._prefill_done is None and self.policy.counters.target_forwards:
            self._prefill_done = self.now
            if self._queued_since is not None:  # count the wait from here on
                self.queued_ms += self.now - self._queued_since
                self._queued_since = self.now
        if self.policy.queued and self._queued_since is None:
            self._queued_since = self.now
        elif not self.policy.queued and self._queued_since is not None:
            waited = self.now - self._queued_since
            self.queued_ms += waited
            if self._prefill_done is not None:
                self.queued_after_prefill_ms += waited
            self._queued_since = None

    # ----------------------------------------------------------------- events

    def _deliver(self, kind: str, payload: tuple[Any, ...]) -> list[Send]:
        """Handle one event; returns the policy's actions when the coordinator got a message."""
        if kind == "result":  # at the coordinator
            server, out = payload
            return self.policy.on_result(server, out.task_id, out.first_position, out.tokens)
        if kind == "cancelled":
            return self.policy.on_cancelled(*payload)
        if kind == "draft":
            draft: Draft = payload[0]
            return self.policy.on_draft(draft.epoch, draft.position, draft.token)
        if kind == "task":  # a Verify reaches its server
            self._start_task(*payload)
        elif kind == "done":  # a server's forward ends
            server, version = payload
            running = self._running.get(server)
            if running is not None and running[1] == version:
                del self._running[server]
                self._push(self.msg.latency_ms, "result", (server, self._outputs.pop(server)))
        elif kind == "cancel":  # a CANCEL reaches its server
            self._cancel_arrives(*payload)
        elif kind == "abandon":
            server, version = payload
            running = self._running.get(server)
            if running is not None and running[1] == version:
                del self._running[server]
                self.servers[server].runner.crop(running[0].keep)
                self._outputs.pop(server)
                self._push(self.msg.latency_ms, "cancelled", (server, running[0].task_id))
        elif kind == "drafted":  # the drafter's forward ends
            if payload[0] != self._d_forward:
                return []  # abandoned for a Rollback, Start or Stop
            self._d_busy = False
            self._push(self.msg.latency_ms, "draft", (self.drafter.step(),))
            self._drafter_poll()
        elif kind == "d_abandon":  # the drafter abandons its forward for a preempting message
            if payload[0] == self._d_forward and self._d_busy:
                self._d_forward += 1
                self._d_busy = False
                while self._d_inbox:
                    self.drafter.apply(self._d_inbox.popleft())
                self._drafter_maybe_start()
        elif kind == "to_drafter":
            msg = payload[0]
            if self._d_busy:
                if not self._d_inbox:
                    self._d_misses = self.msg.poll_misses
                self._d_inbox.append(msg)
                if self.preempt_drafter and msg.TAG in PREEMPTS_DRAFT:
                    self._seq += 1
                    at = self._check_time(self._d_started, self._d_ends)
                    if at is not None:
                        heapq.heappush(self._events,
                                       (at, self._seq, "d_abandon", (self._d_forward,)))
            else:
                self.drafter.apply(msg)
                self._drafter_maybe_start()
        else:
            raise AssertionError(kind)
        return []

    def _apply(self, actions: Sequence[Send]) -> None:
        """The coordinator's messages, each delivered after the message latency."""
        for to, msg in actions:
            if to == DRAFTER:
                self._push(self.msg.latency_ms, "to_drafter", (msg,))
            elif isinstance(msg, Cancel):
                self._push(self.msg.latency_ms, "cancel", (to, msg.task_id))
            else:
                self._push(self.msg.latency_ms, "task", (to, msg))

    def _start_task(self, server: int, task: Verify) -> None:
        """The server's forward runs now (its output is known at once; it is delivered when
        the forward ends, unless a Cancel abandons it first)."""
        lat = self.lat.while_other_runs(self._d_busy)
        cost = lat.target_ttft if task.keep == 0 else lat.target_forward_ms(len(task.tokens))
        out = self.servers[server].verify(task)
        assert isinstance(out, Result)  # no cancellation check: the forward runs to its end
        self._outputs[server] = out
        self._version += 1
        self._running[server] = (task, self._version, self.now, self.now + cost)
        self._seq += 1
        heapq.heappush(self._events, (self.now + cost, self._seq, "done", (server, self._version)))

    def _cancel_arrives(self, server: int, task_id: int) -> None:
        """A Cancel for a forward in flight stops it at a cancellation check; one that finds
        the forward done, or about to be, is ignored, as the runtime's servers do."""
        running = self._running.get(server)
        if running is None or running[0].task_id != task_id:
            return
        _, version, start, end = running
        at = self._check_time(start, end)
        if at is not None:
            self._seq += 1
            heapq.heappush(self._events, (at, self._seq, "abandon", (server, version)))

    def _check_time(self, start: float, end: float) -> float | None:
        """When a forward running from ``start`` to ``end`` notices a message arriving now: at
        its first cancellation check from now on (or a later one when polls miss it), or None
        when the forward ends first."""
        check = self.msg.cancel_check_ms
        at = self.now
        if check > 0:
            checks = math.ceil((self.now - start) / check - 1e-9) + self.msg.poll_misses
            at = start + checks * check
        return at if at < end else None

    # ----------------------------------------------------------------- drafter

    def _drafter_poll(self) -> None:
        """Between forwards the drafter polls, applying what has arrived in order; a poll that
        misses the next message (``poll_misses`` per message) lets it draft on. Each message
        counts its own misses, from when it is next in line: the runtime polls again right
        after applying one, and that poll can miss the next as well."""
        while self._d_inbox:
            if self._d_misses > 0 and self.drafter.can_draft():
                self._d_misses -= 1
                break
            self.drafter.apply(self._d_inbox.popleft())
            self._d_misses = self.msg.poll_misses
        self._drafter_maybe_start()

    def _drafter_maybe_start(self) -> None:
        """Start the drafter's next forward; its draft is taken when the forward ends (no
        message is applied in between: they wait in the inbox, or abandon the forward)."""
        if self._d_busy or not self.drafter.can_draft():
            return
        lat = self.lat.while_other_runs(bool(self._running))
        cost = (lat.drafter_ttft if self.drafter.cold
                else lat.drafter_forward_ms(self.drafter.pending()))
        self._d_busy = True
        self._d_forward += 1
        self._d_started, self._d_ends = self.now, self.now + cost
        self._seq += 1
        heapq.heappush(self._events, (self.now + cost, self._seq, "drafted", (self._d_forward,)))


def simulate_once(mode: str, lat: Latencies, acceptance: float, lookahead: int, sp: int,
                  tokens: int, seed: int = 0, prompt: Sequence[int] = PROMPT,
                  run_ahead: int | None = None, messages: MessageModel = IDEAL,
                  prompt_run: type[PromptRun] = PromptRun, preempt_drafter: bool = True,
                  min_drafts: int = 1) -> SimRun:
    """One generation of ``tokens`` tokens; the emulated language's seed and the prompt set the
    acceptances (the same as an emulated MPI run with that seed and prompt). ``run_ahead``
    overrides DSI's drafter run-ahead (default ``lookahead * (sp + 1)``, as the runtime);
    ``messages`` prices the messages (default: free); ``prompt_run`` makes each prompt's
    decisions (a test runs an older policy this way), and ``preempt_drafter=False`` runs the
    drafter as it once was (it finished every forward, even one a rollback had made stale)."""
    return _Simulation(mode, lat, acceptance, lookahead, sp, tokens, seed, prompt=prompt,
                       run_ahead=run_ahead, messages=messages,
                       prompt_run=prompt_run, preempt_drafter=preempt_drafter,
                       min_drafts=min_drafts).run()


def simulate(mode: str, lat: Latencies, acceptance: float, lookahead: int, sp: int, tokens: int,
             repeats: int = 1, seed: int = 0, run_ahead: int | None = None,
             messages: MessageModel = IDEAL, min_drafts: int = 1) -> SimSummary:
    """``repeats`` generations with seeds ``seed .. seed + repeats - 1`` (the same acceptance
    draws for every mode and lookahead: common random numbers make ratios precise)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if lookahead < 1 or sp < 1 or tokens < 1 or repeats < 1:
        raise ValueError("lookahead, sp, tokens and repeats must be >= 1")
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"acceptance must be in [0, 1], got {acceptance}")
    summary = SimSummary(mode, lookahead if mode != "nonsi" else 0, sp if mode == "dsi" else 1,
                         tokens, min_drafts=min_drafts if mode == "dsi" else 1)
    for r in range(repeats):
        summary.runs.append(simulate_once(mode, lat, acceptance, lookahead, sp, tokens, seed + r,
                                          run_ahead=run_ahead, messages=messages,
                                          min_drafts=min_drafts))
    return summary


def dsi_lookaheads(lat: Latencies, sp: int, sweep: Iterable[int]) -> set[int]:
    """A sweep of DSI lookaheads, with Eq. 1's for ``sp`` servers added."""
    return set(sweep) | {min_lookahead(lat, sp)}


def min_lookahead(lat: Latencies, sp: int) -> int:
    """The paper's Eq. 1: the smallest k with ceil(t_target / (k * t_drafter)) <= SP, i.e. the
    smallest lookahead for which no verification task waits for a target server."""
    if lat.drafter_tpot_ms <= 0:
        return 1
    return max(1, math.ceil(lat.target_tpot_ms / (sp * lat.drafter_tpot_ms) - 1e-12))


def servers_needed(lat: Latencies, lookahead: int) -> int:
    """ceil(t_target / (k * t_drafter)): SP at which no task waits for a server
    (docs/design.md, section 2)."""
    if lat.drafter_tpot_ms <= 0:
        return 1
    return max(1, math.ceil(lat.target_tpot_ms / (lookahead * lat.drafter_tpot_ms) - 1e-12))
