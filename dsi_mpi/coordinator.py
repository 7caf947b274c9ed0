"""Rank 0: drives the policy with MPI messages and times each prompt.

The coordinator loads no model. For each prompt it sends what ``Policy.begin`` asks for, then
feeds every arriving message to the policy and sends what the policy asks for, until the
output is complete; it then drains the replies to cancelled tasks, so every server is idle
and its cache state known before the next prompt.

Every worker is heard from at least every heartbeat (``liveness.py``); one that sends nothing
for ``--timeout`` is named, with the task it has not answered (:class:`Unresponsive`), and the
job ends, even while the other workers keep talking.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from dsi_mpi.config import RunConfig
from dsi_mpi.exits import Stopped
from dsi_mpi.policy import DRAFTER, Ids, Policy, Send
from dsi_mpi.protocol import Bye, Cancelled, Draft, ProtocolError, Ready, Result, Shutdown, Verify
from dsi_mpi.roles import Layout
from dsi_mpi.trace import NO_TRACE, Recorder
from dsi_mpi.transport import Incoming, RemoteError, Transport, WaitTimeout

CHECK_EVERY_S = 0.25  # how often rank 0 looks for silent workers (at most --timeout / 8)


@dataclass
class PromptResult:
    mode: str
    tokens: list[int]
    wall_time_s: float
    ttft_s: float
    policy: Policy
    # task id -> (server, seconds its forward ran)
    forwards: dict[int, tuple[int, float]] = field(default_factory=dict)
    start: float = 0.0  # perf_counter at the prompt's start and end (the trace's clock)
    end: float = 0.0


class Unresponsive(TimeoutError):
    """A worker has sent nothing, not even a heartbeat, for ``--timeout``: hung or gone."""

    def __init__(self, rank: int, text: str) -> None:
        super().__init__(text)
        self.rank = rank


class Coordinator:
    def __init__(self, transport: Transport, layout: Layout, eos_ids: frozenset[int],
                 trace: Recorder = NO_TRACE) -> None:
        self.transport = transport
        self.layout = layout
        self.eos_ids = eos_ids
        self.trace = trace
        # Epochs and task ids keep growing across policies, so no stale message is ever
        # mistaken for a current one by a server or the drafter.
        self.ids = Ids()
        self.workers = tuple(range(1, transport.size))
        self.timeout_s = transport.timeout_s
        # rank -> what it owes (its task, a Bye), to name it if it falls silent
        self._owed: dict[int, str] = {}
        self._check_every = min(CHECK_EVERY_S, self.timeout_s / 8)
        self._check_due = 0.0

    def wait_ready(self) -> None:
        """Wait until every worker has loaded its model (a worker silent for ``--timeout``
        while loading is named)."""
        waiting = set(self.workers)
        while waiting:
            incoming = self._receive("every worker to load its model")
            if not isinstance(incoming.message, Ready):
                raise ProtocolError(f"coordinator got {type(incoming.message).__name__} from rank "
                                    f"{incoming.source} before every worker was ready")
            waiting.discard(incoming.source)

    def _receive(self, what: str) -> Incoming:
        """The next message, within ``--timeout``. Every worker, busy or idle, is heard from at
        least every heartbeat; one that is silent for ``--timeout`` is hung or gone, and
        :class:`Unresponsive` names it, even while the others keep the run going."""
        start = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= self._check_due:
                self._check(now)
                self._check_due = now + self._check_every
            left = start + self.timeout_s - now
            if left <= 0:
                self._check(now)  # a silent worker is the likely reason: name it
                raise WaitTimeout(f"rank 0 waited {self.timeout_s:.0f} s for {what}, and every "
                                  "worker is alive; aborting (raise --timeout if forwards are "
                                  "this slow)")
            try:
                incoming = self.transport.wait(what=what,
                                               timeout_s=min(left, self._check_due - now))
            except WaitTimeout:
                continue
            if isinstance(incoming.message, (Result, Cancelled, Bye)):
                self._owed.pop(incoming.source, None)
            return incoming

    def _check(self, now: float) -> None:
        """Raise :class:`Unresponsive` for the worker silent longest, if ``--timeout`` or more."""
        if not self.workers:
            return
        silent, rank = self.transport.liveness.silent_longest(self.workers, now)
        if silent >= self.timeout_s:
            owed = self._owed.get(rank)
            did = (f"has not answered {owed} for" if owed
                   else "has sent nothing, not even a heartbeat, for")
            who = f"rank {rank} ({self.layout.describe(rank)})"
            raise Unresponsive(rank, f"{who} {did} {silent:.0f} s: it is hung or gone "
                                     f"(--timeout {self.timeout_s:g})")

    def make_policy(self, config: RunConfig) -> Policy:
        servers = self.layout.active_targets(config.mode, config.sp)
        return Policy(config.mode, list(servers), config.lookahead, config.run_ahead(len(servers)),
                      config.max_new_tokens, eos_ids=self.eos_ids, verify=config.verify,
                      seed=config.sampling.seed, reuse_cache=config.reuse_cache, ids=self.ids,
                      min_drafts=config.min_drafts)

    def generate(self, policy: Policy, prompt: Sequence[int],
                 seed: int | None = None) -> PromptResult:
        trace = self.trace
        forwards: dict[int, tuple[int, float]] = {}
        start = time.perf_counter()
        first_token = None
        self._execute(policy.begin(prompt, seed), trace.now())
        while not policy.finished:
            reply = self._receive("a reply from the drafter or a target server")
            received, committed = trace.now(), len(policy.output)
            self._execute(self._handle(policy, reply, forwards), received, committed, policy)
            if first_token is None and policy.output:
                first_token = time.perf_counter()
        end = time.perf_counter()
        while not policy.idle:  # replies to cancelled tasks; stale drafts are dropped
            reply = self._receive("replies to cancelled tasks")
            self._execute(self._handle(policy, reply, forwards), trace.now())
        ttft = (first_token or end) - start
        return PromptResult(policy.mode, list(policy.output), end - start, ttft, policy, forwards,
                            start, end)

    @staticmethod
    def _handle(policy: Policy, incoming: Incoming,
                forwards: dict[int, tuple[int, float]]) -> list[Send]:
        source, msg = incoming
        if isinstance(msg, Draft):
            q = msg.probs[0] if msg.probs is not None else None
            return policy.on_draft(msg.epoch, msg.position, msg.token, q)
        if isinstance(msg, Result):
            forwards[msg.task_id] = (source, msg.forward_us * 1e-6)
            return policy.on_result(source, msg.task_id, msg.first_position, msg.tokens, msg.probs)
        if isinstance(msg, Cancelled):
            forwards[msg.task_id] = (source, msg.forward_us * 1e-6)
            return policy.on_cancelled(source, msg.task_id)
        raise ProtocolError(f"coordinator got unexpected {type(msg).__name__} from rank {source}")

    def _execute(self, actions: Sequence[Send], received: float, committed: int | None = None,
                 policy: Policy | None = None) -> None:
        """Send the policy's actions; the trace notes what they did since ``received``."""
        drafter = self.layout.drafters[0] if self.layout.drafters else None
        for to, msg in actions:
            if to == DRAFTER:
                assert drafter is not None, "a message for the drafter of a mode without one"
                self.transport.send(drafter, msg)
            else:
                self.transport.send(to, msg)
                if isinstance(msg, Verify):
                    self._owed[to] = f"task {msg.task_id}"
        self.trace.coordinator_step(received, actions, committed, policy)

    def shutdown(self) -> None:
        """Tell every worker to stop and wait for each one's Bye (bounded by ``--timeout``)."""
        self.transport.pulse.stop()  # nothing may follow a Shutdown
        for rank in self.workers:
            self.transport.send(rank, Shutdown())
            self._owed[rank] = "Shutdown"
        waiting = set(self.workers)
        while waiting:
            incoming = self._receive(f"Bye from ranks {sorted(waiting)}")
            if isinstance(incoming.message, Bye):
                waiting.discard(incoming.source)

    def end(self, grace_s: float) -> list[int]:
        """End the job early: Shutdown to every worker, then up to ``grace_s`` for their Byes,
        dropping whatever else comes (drafts, results, a worker's own failure or signal report:
        it says Bye after it too). Returns the workers that did not answer: the job must then
        be aborted."""
        self.transport.pulse.stop()
        waiting = set(self.workers)
        for rank in sorted(waiting):
            self.transport.send(rank, Shutdown())
        deadline = time.monotonic() + grace_s
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                incoming = self.transport.wait(what="Bye", timeout_s=left)
            except (RemoteError, Stopped):
                continue
            except WaitTimeout:
                break
            if isinstance(incoming.message, Bye):
                waiting.discard(incoming.source)
        return sorted(waiting)
