"""Rank 0: drives the policy with MPI messages and times each prompt.

The coordinator loads no model. For each prompt it executes ``Policy.begin``'s actions, then
feeds every arriving message to the policy and sends what the policy asks for, until the
output is complete; it then drains the replies to cancelled tasks, so every server is idle
and its cache state known before the next prompt.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from dsi_mpi.config import RunConfig
from dsi_mpi.policy import (
    Action,
    AdvanceDrafter,
    CancelTask,
    Policy,
    ProtocolError,
    RollbackDrafter,
    SendTask,
    StartDrafter,
    StopDrafter,
)
from dsi_mpi.protocol import START_RESET_CACHE, START_WANT_PROBS, Message, Tag
from dsi_mpi.roles import Layout
from dsi_mpi.transport import Transport


@dataclass
class PromptResult:
    mode: str
    tokens: list[int]
    wall_time_s: float
    ttft_s: float
    policy: Policy


class Coordinator:
    def __init__(self, transport: Transport, layout: Layout, eos_ids: frozenset[int]) -> None:
        self.transport = transport
        self.layout = layout
        self.eos_ids = eos_ids
        self._epoch = 0
        self._next_task = 0

    def make_policy(self, config: RunConfig) -> Policy:
        servers = self.layout.active_targets(config.mode, config.sp)
        policy = Policy(
            mode=config.mode, servers=list(servers), lookahead=config.lookahead,
            run_ahead=config.run_ahead(len(servers)), max_new_tokens=config.max_new_tokens,
            eos_ids=self.eos_ids, verify=config.verify, seed=config.sampling.seed,
            reuse_cache=config.reuse_cache,
            # Epochs and task ids keep growing across policies, so no stale message is ever
            # mistaken for a current one by a server or the drafter.
            epoch=self._epoch, next_task_id=self._next_task,
        )
        return policy

    def generate(self, policy: Policy, prompt: Sequence[int], seed: int | None = None) -> PromptResult:
        start = time.perf_counter()
        first_token = None
        self._execute(policy.begin(prompt, seed))
        while not policy.finished:
            self._execute(self._handle(policy, self.transport.wait(what="a reply from the drafter or a target server")))
            if first_token is None and policy.output:
                first_token = time.perf_counter()
        end = time.perf_counter()
        while not policy.idle:  # replies to cancelled tasks; stale drafts are dropped
            self._execute(self._handle(policy, self.transport.wait(what="replies to cancelled tasks")))
        self._epoch, self._next_task = policy.epoch, policy.next_task_id
        return PromptResult(policy.mode, list(policy.output), end - start, (first_token or end) - start, policy)

    def _handle(self, policy: Policy, msg: Message) -> list[Action]:
        if msg.kind == Tag.DRAFT:
            q = msg.probs[0] if msg.probs is not None else None
            return policy.on_draft(msg.epoch, msg.f0, int(msg.tokens[0]), q)
        if msg.kind == Tag.RESULT:
            return policy.on_result(msg.source, msg.ident, msg.epoch, msg.f0, msg.tokens.tolist(), msg.probs)
        if msg.kind == Tag.CANCELLED:
            return policy.on_cancelled(msg.source, msg.ident)
        raise ProtocolError(f"coordinator got unexpected {msg.kind.name} from rank {msg.source}")

    def _execute(self, actions: Sequence[Action]) -> None:
        send = self.transport.send
        drafter = self.layout.drafters[0] if self.layout.drafters else None
        for a in actions:
            if isinstance(a, SendTask):
                send(a.server, Tag.VERIFY, a.epoch, a.task_id, a.keep, a.first_position, int(a.want_probs), a.seed, a.tokens)
            elif isinstance(a, CancelTask):
                send(a.server, Tag.CANCEL, a.epoch, a.task_id)
            elif isinstance(a, StartDrafter):
                flags = START_WANT_PROBS * a.want_probs | START_RESET_CACHE * a.reset_cache
                send(drafter, Tag.START, a.epoch, 0, a.limit, a.max_position, flags, a.seed, a.prompt)
            elif isinstance(a, RollbackDrafter):
                send(drafter, Tag.ROLLBACK, a.epoch, 0, a.keep, a.limit, tokens=a.forced)
            elif isinstance(a, AdvanceDrafter):
                send(drafter, Tag.ADVANCE, a.epoch, 0, a.limit, a.start, tokens=a.tokens)
            elif isinstance(a, StopDrafter):
                send(drafter, Tag.STOP, a.epoch)

    def shutdown(self, timeout_s: float | None = None) -> None:
        """Tell every worker to stop and wait (bounded) for each one's BYE."""
        for rank in range(1, self.transport.size):
            self.transport.send(rank, Tag.SHUTDOWN)
        waiting = set(range(1, self.transport.size))
        while waiting:
            msg = self.transport.wait(what=f"BYE from ranks {sorted(waiting)}", timeout_s=timeout_s)
            if msg.kind == Tag.BYE:
                waiting.discard(msg.source)
