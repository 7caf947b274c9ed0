"""Rank 0: drives the policy with MPI messages and times each prompt.

The coordinator loads no model. For each prompt it sends what ``Policy.begin`` asks for, then
feeds every arriving message to the policy and sends what the policy asks for, until the
output is complete; it then drains the replies to cancelled tasks, so every server is idle
and its cache state known before the next prompt.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from dsi_mpi.config import RunConfig
from dsi_mpi.policy import DRAFTER, Ids, Policy, Send
from dsi_mpi.protocol import Bye, Cancelled, Draft, ProtocolError, Result, Shutdown
from dsi_mpi.roles import Layout
from dsi_mpi.trace import NO_TRACE, Recorder
from dsi_mpi.transport import Incoming, Transport


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

    def make_policy(self, config: RunConfig) -> Policy:
        servers = self.layout.active_targets(config.mode, config.sp)
        return Policy(config.mode, list(servers), config.lookahead, config.run_ahead(len(servers)),
                      config.max_new_tokens, eos_ids=self.eos_ids, verify=config.verify,
                      seed=config.sampling.seed, reuse_cache=config.reuse_cache, ids=self.ids)

    def generate(self, policy: Policy, prompt: Sequence[int], seed: int | None = None) -> PromptResult:
        trace = self.trace
        forwards: dict[int, tuple[int, float]] = {}
        start = time.perf_counter()
        first_token = None
        self._execute(policy.begin(prompt, seed), trace.now())
        while not policy.finished:
            incoming = self.transport.wait(what="a reply from the drafter or a target server")
            received, committed = trace.now(), len(policy.output)
            self._execute(self._handle(policy, incoming, forwards), received, committed, policy)
            if first_token is None and policy.output:
                first_token = time.perf_counter()
        end = time.perf_counter()
        while not policy.idle:  # replies to cancelled tasks; stale drafts are dropped
            incoming = self.transport.wait(what="replies to cancelled tasks")
            self._execute(self._handle(policy, incoming, forwards), trace.now())
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
            self.transport.send(drafter if to == DRAFTER else to, msg)
        self.trace.coordinator_step(received, actions, committed, policy)

    def shutdown(self, timeout_s: float | None = None) -> None:
        """Tell every worker to stop and wait (bounded) for each one's Bye."""
        for rank in range(1, self.transport.size):
            self.transport.send(rank, Shutdown())
        waiting = set(range(1, self.transport.size))
        while waiting:
            incoming = self.transport.wait(what=f"Bye from ranks {sorted(waiting)}", timeout_s=timeout_s)
            if isinstance(incoming.message, Bye):
                waiting.discard(incoming.source)
