"""Drivers of the policy shared by several test modules (plain helpers, no tests here).

- :class:`RandomDriver` runs a :class:`~dsi_mpi.policy.Policy` against real workers with
  every message delayed arbitrarily (per-channel FIFO, as MPI guarantees);
  :func:`make_policy`, :func:`emulated` and :func:`sent` build and read what it drives.
- :func:`forced_share` runs the simulator on the slow-drafter configuration of
  docs/design.md, "Forced commits", with the policy as it is or as it once was
  (:class:`RestartOnForced`).
"""

from __future__ import annotations

import random
from collections import deque

from dsi_mpi.backends import load_backend
from dsi_mpi.backends.base import Backend
from dsi_mpi.policy import DRAFTER, Policy, PromptRun, Send, default_run_ahead
from dsi_mpi.protocol import Cancel, Cancelled
from dsi_mpi.simulate import Latencies, MessageModel, simulate_once
from dsi_mpi.verify import SamplingParams
from dsi_mpi.worker import DrafterWorker, TargetWorker

GREEDY = SamplingParams()


def sent(actions: list[Send], kind: type) -> list:
    """The messages of one kind among a policy's actions, each with its destination as
    ``server`` (an attribute-style view for the scripted tests)."""
    return [_Addressed(to, msg) for to, msg in actions if isinstance(msg, kind)]


class _Addressed:
    def __init__(self, to: int, msg: object) -> None:
        self.server, self.msg = to, msg

    def __getattr__(self, name: str) -> object:
        return getattr(self.msg, name)


class RandomDriver:
    """Delivers every message after an arbitrary delay, in the order a random generator picks
    (per-channel FIFO, as MPI guarantees between two ranks), and lets servers either finish or
    abandon a cancelled task."""

    def __init__(self, policy: Policy, targets: dict[int, Backend], drafter: Backend | None,
                 params: SamplingParams, rng: random.Random) -> None:
        self.policy, self.params, self.rng = policy, params, rng
        self.servers = {s: TargetWorker(b, params) for s, b in targets.items()}
        self.drafter = (DrafterWorker(drafter, params, policy.eos_ids)
                        if drafter is not None else None)
        self.to_server: dict[int, deque] = {s: deque() for s in targets}
        self.from_server: dict[int, deque] = {s: deque() for s in targets}
        self.to_drafter: deque = deque()
        self.from_drafter: deque = deque()

    def run(self, prompt: list[int]) -> list[int]:
        self._route(self.policy.begin(prompt))
        steps = 0
        while not (self.policy.finished and self.policy.idle):
            steps += 1
            assert steps < 100_000, "no progress: the policy stalled"
            choices = [("server", s) for s, q in self.to_server.items() if q]
            choices += [("reply", s) for s, q in self.from_server.items() if q]
            choices += [("drafter_in", None)] if self.to_drafter else []
            choices += [("draft_out", None)] if self.from_drafter else []
            if self.drafter is not None and self.drafter.can_draft():
                choices.append(("draft", None))
            assert choices, "deadlock: nothing can happen but the policy is not done"
            kind, arg = self.rng.choice(choices)
            getattr(self, "_" + kind)(arg)
        return list(self.policy.output)

    def _route(self, actions: list[Send]) -> None:
        for to, msg in actions:
            (self.to_drafter if to == DRAFTER else self.to_server[to]).append(msg)

    def _server(self, s: int) -> None:
        msg = self.to_server[s].popleft()
        if isinstance(msg, Cancel):
            return  # a cancel for a task already answered: ignored, as the real server does
        worker = self.servers[s]
        assert len(worker.runner.tokens) >= msg.keep, (
            "the coordinator overestimated a server's cache")
        # A cancel already queued behind this request may abandon it (the between-layer check).
        cancel_waiting = any(isinstance(m, Cancel) and m.task_id == msg.task_id
                             for m in self.to_server[s])
        if cancel_waiting and self.rng.random() < 0.7:
            reply = worker.verify(msg, should_cancel=lambda: True)
            assert isinstance(reply, Cancelled)
            assert worker.runner.backend.cached_length() == len(worker.runner.tokens) == msg.keep
        else:
            reply = worker.verify(msg)
        self.from_server[s].append(reply)

    def _reply(self, s: int) -> None:
        reply = self.from_server[s].popleft()
        if isinstance(reply, Cancelled):
            self._route(self.policy.on_cancelled(s, reply.task_id))
        else:
            self._route(self.policy.on_result(s, reply.task_id, reply.first_position, reply.tokens))

    def _draft(self, _: None) -> None:
        self.from_drafter.append(self.drafter.step())

    def _drafter_in(self, _: None) -> None:
        self.drafter.apply(self.to_drafter.popleft())

    def _draft_out(self, _: None) -> None:
        draft = self.from_drafter.popleft()
        self._route(self.policy.on_draft(draft.epoch, draft.position, draft.token))


def emulated(acceptance: float | None = None) -> Backend:
    """A sleepless emulated model of vocabulary 50: a target, or a drafter with ``acceptance``."""
    spec = "emulated:tpot_ms=0,vocab=50"
    if acceptance is not None:
        spec += f",acceptance={acceptance}"
    return load_backend(spec, sleep=False)


def make_policy(mode: str, sp: int, lookahead: int, max_new: int, eos: frozenset[int] = frozenset(),
            reuse_cache: bool = True, min_drafts: int = 1) -> Policy:
    """A policy on servers 0..sp-1 with the runtime's default run-ahead."""
    servers = list(range(sp))
    return Policy(mode, servers, lookahead, default_run_ahead(mode, lookahead, sp), max_new, eos,
                  reuse_cache=reuse_cache, min_drafts=min_drafts)


# Phi3-14B / Phi3-4B on HumanEval (the paper's latencies), 9 ranks: the configuration on which
# the old policy collapsed into non-SI (docs/design.md, "Forced commits").
PHI3 = Latencies(target_tpot_ms=52.1, drafter_tpot_ms=34.0, target_ttft_ms=67.2,
                 drafter_ttft_ms=41.8)
PHI3_PROMPT = (1, 2, 3, 4, 5, 6, 7, 8)


class RestartOnForced(PromptRun):
    """The policy as it once was: a target token committed where no draft was held rolls the
    drafter back, as a rejection does, throwing away the drafter's forward in flight. With a
    drafter slower than about half the target, DSI then never regains its lead."""

    def _forced(self, j: int, token: int) -> list[Send] | None:
        return self._correct(j, token)


def forced_share(messages: MessageModel, restart_on_forced: bool, seeds: range = range(5),
                 lat: Latencies = PHI3, preempt_drafter: bool = True) -> float:
    """The share of committed tokens that the target gave where no draft had arrived (near 1:
    DSI has collapsed into non-SI), over simulated DSI runs (sp 7, lookahead 1, acceptance
    0.95), with the old policy if ``restart_on_forced``."""
    prompt_run = RestartOnForced if restart_on_forced else PromptRun
    runs = [simulate_once("dsi", lat, 0.95, 1, 7, 50, seed, prompt=PHI3_PROMPT, messages=messages,
                          prompt_run=prompt_run, preempt_drafter=preempt_drafter)
            for seed in seeds]
    return sum(r.counters.forced for r in runs) / sum(len(r.tokens) for r in runs)
