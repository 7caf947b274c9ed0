"""The coordinator's decisions as a pure state machine (design note, sections 3 and 6).

Events in (a draft arrived, a verification result arrived, a task was cancelled), actions out:
protocol messages, each addressed to a target server or to the drafter. No MPI, no clock:
the MPI runtime drives it with real messages, the simulator with a virtual clock, unit tests
with scripted events. The three modes share everything but a few rules (:class:`Rules`):

- ``dsi``: the drafter never waits (bounded run-ahead). A task is created for every
  ``lookahead`` new drafts; whenever the next position to commit is covered by no task, a task
  with all available drafts (possibly none: the non-SI step) goes out at once, so a free
  target server never idles on it. A rejection bumps the epoch, cancels every outstanding
  task built on the rejected draft and rolls the drafter back.
- ``si``: the drafter drafts ``lookahead`` tokens and waits; one task verifies them; the
  verdict rolls the drafter back. Drafting and verifying never overlap.
- ``nonsi``: no drafter; one zero-draft task per token.

Positions are absolute indices into the sequence (prompt + output). A task whose context is
the first ``L`` tokens returns the target's token for positions ``first_position .. L``.

A target token committed where the coordinator holds no draft (a *forced* commit: the non-SI
step, SI's bonus token, a position the drafter had not reached) disturbs nothing: no task can
depend on a draft that does not exist, and the drafter, which may be drafting that very
position, is only told the token (``Advance.tokens``). If its draft turns out to differ, the
coordinator sees that draft arrive for a committed position and only then rolls the drafter
back. Rolling the drafter back at every forced commit, as this policy once did, throws away the
drafter's forward in flight each time: a drafter slower than about half the target then never
regains its lead and DSI collapses into non-SI (issue 8; ``restart_on_forced`` keeps that
behaviour for the simulator's fidelity test).

State is grouped by lifetime: :class:`Ids` (epochs and task ids, for the whole job),
:class:`ServerPool` (what each server's cache holds and its one outstanding task, across
prompts), and a prompt's own state, made by :meth:`Policy.begin`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from dsi_mpi.metrics import Counters
from dsi_mpi.protocol import Advance, Cancel, Message, ProtocolError, Rollback, Start, Stop, Verify
from dsi_mpi.sequences import common_prefix
from dsi_mpi.verify import rejection_step, sample_from

DRAFTER = -1  # the address of the drafter in an action (the runtime maps it to its rank)


class Send(NamedTuple):
    """One action of the policy: a message for a target server (its id) or for the DRAFTER."""

    to: int
    message: Message


# ----------------------------------------------------------------- the modes


class Rules:
    """What a mode decides; everything else is common to the three modes."""

    name = ""
    uses_drafter = True
    one_server = False  # SI and non-SI verify on exactly one server
    widen_queued = False  # the task that gets a free server covers everything queued

    def run_ahead(self, lookahead: int, sp: int) -> int:
        """Drafts the drafter may hold beyond the committed prefix."""
        raise NotImplementedError

    def prefill(self, servers: Sequence[int]) -> Sequence[int]:
        """Servers that prefill the prompt (a zero-draft task each) when it begins."""
        raise NotImplementedError

    def next_task_length(self, state: _Prompt, lookahead: int, outstanding: bool) -> int | None:
        """Context length of the next task to create, or None."""
        raise NotImplementedError


class DSIRules(Rules):
    name = "dsi"
    widen_queued = True  # tasks queue only when every server is busy (fewer than Eq. 1 asks)

    def run_ahead(self, lookahead: int, sp: int) -> int:
        return lookahead * (sp + 1)  # fill every server and queue one more block

    def prefill(self, servers: Sequence[int]) -> Sequence[int]:
        # Every server at once: TTFT is paid once, in parallel, and the first result gives
        # the first token.
        return servers

    def next_task_length(self, state: _Prompt, lookahead: int, outstanding: bool) -> int | None:
        avail, covered = len(state.proposed), state.covered_end
        if state.n > covered:
            return avail  # the next position has no verifier: send what we have, now
        if avail - covered >= lookahead:
            return covered + lookahead
        if state.drafter_stopped and avail > covered:
            return avail  # no more drafts are coming: verify the tail
        return None


class NonSIRules(DSIRules):
    """One zero-draft task per token: the DSI rules with no drafts at all."""

    name = "nonsi"
    uses_drafter = False
    one_server = True
    widen_queued = False

    def run_ahead(self, lookahead: int, sp: int) -> int:
        return 0

    def prefill(self, servers: Sequence[int]) -> Sequence[int]:
        return servers[:1]


class SIRules(Rules):
    name = "si"
    one_server = True

    def run_ahead(self, lookahead: int, sp: int) -> int:
        return lookahead  # one block, then wait for its verdict

    def prefill(self, servers: Sequence[int]) -> Sequence[int]:
        return ()  # classic SI: the first verification includes the prompt's prefill

    def next_task_length(self, state: _Prompt, lookahead: int, outstanding: bool) -> int | None:
        if outstanding:
            return None  # the drafter waits for the verdict of the one task
        avail = len(state.proposed)
        if avail - state.n >= lookahead or state.drafter_stopped or avail >= state.limit:
            return min(avail, state.n + lookahead)
        return None


RULES: dict[str, Rules] = {r.name: r for r in (DSIRules(), SIRules(), NonSIRules())}


def default_run_ahead(mode: str, lookahead: int, sp: int) -> int:
    """Drafts the drafter may hold beyond the committed prefix: SI drafts one block and waits;
    DSI may fill every server and queue one more block."""
    return RULES[mode].run_ahead(lookahead, sp)


# ----------------------------------------------------------------- state by lifetime


@dataclass
class Ids:
    """Epochs and task ids for a whole job: they keep growing across prompts and modes (one
    Ids per coordinator), so no stale message is ever taken for a current one."""

    epoch: int = 0
    task_id: int = 0

    def next_epoch(self) -> int:
        self.epoch += 1
        return self.epoch

    def next_task_id(self) -> int:
        self.task_id += 1
        return self.task_id - 1


@dataclass
class Task:
    task_id: int
    epoch: int  # renewed when a restart keeps the task (its context is all committed)
    length: int  # context length L; the task covers positions first_position .. L
    first_position: int
    server: int | None = None
    context: tuple[int, ...] = ()  # snapshot at dispatch: what the server will hold
    keep: int = 0
    cancelled: bool = False  # a cancel was sent; the reply is still to come

    @property
    def num_outputs(self) -> int:
        return self.length - self.first_position + 1


class ServerPool:
    """The coordinator's model of the target servers: what each one's KV cache holds, and its
    one outstanding task. Every request gets exactly one reply, which keeps this exact."""

    def __init__(self, servers: Sequence[int]) -> None:
        self.servers = tuple(servers)
        self._cache: dict[int, tuple[int, ...]] = {s: () for s in self.servers}
        self._busy: dict[int, Task | None] = {s: None for s in self.servers}
        self.tasks: dict[int, Task] = {}  # outstanding, by task id

    @property
    def idle(self) -> bool:
        return not self.tasks

    def forget(self) -> None:
        """Assume every cache empty: the next task of each keeps nothing."""
        self._cache = {s: () for s in self.servers}

    def free(self) -> list[int]:
        return [s for s, task in self._busy.items() if task is None]

    def closest(self, free: list[int], context: Sequence[int]) -> int:
        """The free server whose cache shares the longest prefix: the least to recompute."""
        return max(free, key=lambda s: common_prefix(self._cache[s], context))

    def assign(self, task: Task, server: int) -> None:
        """Send ``task`` to ``server``, keeping the longest prefix its cache shares (at most
        ``first_position - 1``: the last position must be fed to get its logits)."""
        task.server = server
        task.keep = min(common_prefix(self._cache[server], task.context), task.first_position - 1)
        self._busy[server] = task
        self.tasks[task.task_id] = task

    def reply(self, server: int, task_id: int, completed: bool) -> Task:
        """The one reply to a task came: its cache holds the task's context, or its first
        ``keep`` positions if the forward was abandoned."""
        task = self.tasks.pop(task_id, None)
        if task is None or task.server != server or self._busy[server] is not task:
            raise ProtocolError(
                f"reply for task {task_id} from server {server}, which does not hold it")
        self._busy[server] = None
        self._cache[server] = task.context if completed else task.context[: task.keep]
        return task


@dataclass
class _Prompt:
    """Everything that lives for one prompt."""

    seed: int
    proposed: list[int]  # committed tokens, then the drafts
    n: int  # committed length; position n is the next to commit
    last_position: int  # the last position to generate
    limit: int  # the drafter may draft positions < limit
    covered_end: int  # highest position some live task covers
    uses_drafter: bool
    target: dict[int, int] = field(default_factory=dict)  # position -> the target's token
    p: dict[int, np.ndarray] = field(default_factory=dict)  # position -> target distribution
    q: dict[int, np.ndarray] = field(default_factory=dict)  # position -> drafter distribution
    drafter_eos: bool = False  # a draft ahead is EOS: the drafter stopped after it
    queue: deque[Task] = field(default_factory=deque)  # tasks waiting for a free server
    counters: Counters = field(default_factory=Counters)
    output: list[int] = field(default_factory=list)
    finished: bool = False
    first_epoch: int = 0
    # What became of the work, for the record and the trace:
    # position -> the task whose token is kept for it
    origin: dict[int, Task] = field(default_factory=dict)
    answered: dict[int, Task] = field(default_factory=dict)  # task id -> tasks that got their reply
    outcome: dict[int, str] = field(default_factory=dict)  # task id -> accepted/rejected/cancelled
    # (epoch, position) -> accepted, rejected or late
    drafts: dict[tuple[int, int], str] = field(default_factory=dict)
    blocks: set[int] = field(default_factory=set)  # tasks whose block's first draft was verified

    @property
    def drafter_stopped(self) -> bool:
        """The drafter will propose nothing more in this epoch without a message from us."""
        if not self.uses_drafter:
            return True
        return self.drafter_eos or len(self.proposed) >= self.last_position


# ----------------------------------------------------------------- the policy


class Policy:
    """The coordinator's decisions for one mode; ``begin`` a prompt, then feed it events."""

    def __init__(self, mode: str, servers: Sequence[int], lookahead: int, run_ahead: int,
                 max_new_tokens: int, eos_ids: frozenset[int] = frozenset(), verify: str = "exact",
                 seed: int = 0, reuse_cache: bool = False, ids: Ids | None = None,
                 restart_on_forced: bool = False) -> None:
        if mode not in RULES:
            raise ValueError(f"unknown mode {mode!r}")
        self.rules = RULES[mode]
        if self.rules.one_server and len(servers) != 1:
            raise ValueError(f"mode {mode} uses exactly one target server")
        self.mode = mode
        self.servers = tuple(servers)
        self.lookahead = lookahead
        self.run_ahead = run_ahead
        self.max_new_tokens = max_new_tokens
        self.eos_ids = eos_ids
        self.verify = verify
        self.seed = seed
        self.reuse_cache = reuse_cache  # keep KV caches across prompts and reuse shared prefixes
        # The behaviour before issue 8: roll the drafter back at every forced commit. Only for
        # the simulator test that shows why it collapses with slow drafters.
        self.restart_on_forced = restart_on_forced
        self.ids = ids or Ids()
        self.pool = ServerPool(servers)
        self._prompt: _Prompt | None = None

    # ----------------------------------------------------------------- what drivers read

    @property
    def uses_drafter(self) -> bool:
        return self.rules.uses_drafter

    @property
    def epoch(self) -> int:
        return self.ids.epoch

    @property
    def finished(self) -> bool:
        return self._prompt is None or self._prompt.finished

    @property
    def output(self) -> list[int]:
        return [] if self._prompt is None else self._prompt.output

    @property
    def counters(self) -> Counters:
        return Counters() if self._prompt is None else self._prompt.counters

    @property
    def idle(self) -> bool:
        """No request is outstanding on any server."""
        return self.pool.idle

    @property
    def queued(self) -> int:
        """Tasks waiting for a free server."""
        return 0 if self._prompt is None else len(self._prompt.queue)

    @property
    def epochs(self) -> tuple[int, int]:
        """The first and the last epoch of the current (or last) prompt: every message about
        it carries an epoch in this range, and no other prompt's does."""
        return (0, 0) if self._prompt is None else (self._prompt.first_epoch, self.epoch)

    def task_outcomes(self) -> dict[int, str]:
        """What became of every task of the prompt answered so far, by task id: one of
        :data:`dsi_mpi.metrics.TARGET_OUTCOMES` (final once the prompt is finished and idle)."""
        s = self._prompt
        if s is None:
            return {}
        committed = s.proposed[: s.n]
        out = {}
        for task_id, task in s.answered.items():
            outcome = s.outcome.get(task_id)
            if outcome is None:  # finished but no token of it committed
                on_committed = list(task.context) == committed[: len(task.context)]
                outcome = "unused" if on_committed else "stale"
            out[task_id] = outcome
        return out

    def draft_outcomes(self) -> dict[tuple[int, int], str]:
        """What became of the drafts verified so far, by (epoch, position): accepted, rejected,
        or late (arrived after the target alone had committed its position). A draft not here
        was dropped unverified (an old epoch, or the output was complete)."""
        return {} if self._prompt is None else dict(self._prompt.drafts)

    # ----------------------------------------------------------------- events in

    def begin(self, prompt: Sequence[int], seed: int | None = None) -> list[Send]:
        """Start a prompt (with its own sampling seed, default the policy's); servers must be
        idle."""
        if not self.idle:
            raise ProtocolError("begin() while tasks are outstanding")
        if not prompt:
            raise ValueError("empty prompt")
        if not self.reuse_cache:
            # Every prompt pays its full prefill, as a benchmark should.
            self.pool.forget()
        n = len(prompt)
        self.ids.next_epoch()
        s = self._prompt = _Prompt(seed=self.seed if seed is None else seed, proposed=list(prompt),
                                   n=n, last_position=n + self.max_new_tokens - 1,
                                   limit=n + self.run_ahead, covered_end=n - 1,
                                   uses_drafter=self.uses_drafter, first_epoch=self.epoch)
        actions: list[Send] = []
        if self.uses_drafter:
            # Drafting the last position is wasted work: the target's token there is committed
            # whatever the draft says.
            actions.append(Send(DRAFTER, Start(self.epoch, s.limit, s.last_position - 1,
                                               self.verify == "rejection", s.seed,
                                               not self.reuse_cache, tuple(prompt))))
        for server in self.rules.prefill(self.servers):
            actions.append(self._send(self._new_task(n, n), server))
        return actions + self._dispatch()

    def on_draft(self, epoch: int, position: int, token: int,
                 q: np.ndarray | None = None) -> list[Send]:
        """The drafter proposed ``token`` for ``position`` (with distribution ``q``)."""
        s = self._prompt
        assert s is not None, "a draft before any prompt"
        s.counters.drafter_forwards += 1
        if epoch != self.epoch or s.finished:
            return []  # built on a prefix that was rolled back, or the prompt is done
        if position < s.n:
            # A late draft for a position committed without it (a forced commit): right, and the
            # drafter's later drafts stand; wrong, and they build on a token that is not ours.
            s.counters.drafts_late += 1
            s.drafts[(epoch, position)] = "late"
            if int(token) == s.proposed[position]:
                return []
            return self._restart(position, committed=True) + self._dispatch()
        if position != len(s.proposed):
            raise ProtocolError(f"draft for position {position}, expected {len(s.proposed)}")
        s.proposed.append(int(token))
        if q is not None:
            s.q[position] = q
        if int(token) in self.eos_ids:
            s.drafter_eos = True  # the drafter stops after EOS
        return self._dispatch()

    def on_result(self, server: int, task_id: int, first_position: int, tokens: Sequence[int],
                  probs: np.ndarray | None = None) -> list[Send]:
        """A target server returned its tokens (and distributions) for a task."""
        s = self._prompt
        assert s is not None, "a result before any prompt"
        task = self.pool.reply(server, task_id, completed=True)
        s.counters.target_forwards += 1
        s.answered[task_id] = task
        if first_position != task.first_position or len(tokens) != task.num_outputs:
            raise ProtocolError(f"task {task_id}: result for positions "
                                f"{first_position}+{len(tokens)}, "
                                f"asked {task.first_position}..{task.length}")
        actions: list[Send] = []
        # The task's epoch as the pool knows it, not the message's: a restart keeps (and
        # renews) the tasks whose context is all committed, such as a zero-draft task.
        if task.epoch == self.epoch and not s.finished:
            for i, token in enumerate(tokens):
                if first_position + i >= s.n and first_position + i not in s.target:
                    s.target[first_position + i] = int(token)
                    s.origin[first_position + i] = task
                    if probs is not None:
                        s.p[first_position + i] = probs[i]
            actions += self._verify_in_order()
        return actions + self._dispatch()

    def on_cancelled(self, server: int, task_id: int) -> list[Send]:
        """A server abandoned a task; its cache holds the task's first ``keep`` positions."""
        task = self.pool.reply(server, task_id, completed=False)
        if self._prompt is not None:
            self._prompt.answered[task_id] = task
            self._prompt.outcome[task_id] = "cancelled"
        self.counters.verifications_aborted += 1
        return self._dispatch()

    # ----------------------------------------------------------------- tasks

    def _new_task(self, length: int, first_position: int) -> Task:
        s = self._prompt
        assert s is not None
        s.covered_end = max(s.covered_end, length)
        return Task(self.ids.next_task_id(), self.epoch, length, first_position)

    def _send(self, task: Task, server: int) -> Send:
        s = self._prompt
        assert s is not None
        task.context = task.context or tuple(s.proposed[: task.length])
        self.pool.assign(task, server)
        s.counters.verifications_sent += 1
        return Send(server, Verify(task.epoch, task.task_id, task.keep, task.first_position,
                                   task.context[task.keep:], want_probs=self.verify == "rejection",
                                   seed=s.seed))

    def _dispatch(self) -> list[Send]:
        """Create the tasks the mode's rule asks for, then hand queued tasks to free servers."""
        s = self._prompt
        actions: list[Send] = []
        if s is None or s.finished:
            return actions
        while True:
            pending = bool(self.pool.tasks or s.queue)
            length = self.rules.next_task_length(s, self.lookahead, pending)
            if length is None:
                break
            length = min(length, s.last_position)
            if length <= s.covered_end:
                break
            s.queue.append(self._new_task(length, s.covered_end + 1))
        free = self.pool.free()
        while s.queue and free:
            task = s.queue.popleft()
            if self.rules.widen_queued:
                # A forward costs about the same for a few more tokens, so the task that gets
                # the free server covers everything queued and every draft there is now.
                task.length = min(max(len(s.proposed), task.length), s.last_position)
                s.queue.clear()
                s.covered_end = max(s.covered_end, task.length)
            task.context = tuple(s.proposed[: task.length])
            server = self.pool.closest(free, task.context)
            free.remove(server)
            actions.append(self._send(task, server))
        return actions

    # ----------------------------------------------------------------- commits

    def _target_choice(self, j: int) -> tuple[bool | None, int]:
        """Verify position ``j``: (accepted, token); accepted is None when there is no draft.

        Consumes what was kept for ``j``: position ``j`` is committed after this, and keeping
        distributions (vocabulary-sized) for the whole prompt would grow without bound."""
        s = self._prompt
        assert s is not None
        has_draft = len(s.proposed) > j
        t = s.target.pop(j)
        if self.verify == "exact":
            if not has_draft:
                return None, t
            return s.proposed[j] == t, t
        p, q = s.p.pop(j), s.q.pop(j, None)
        if not has_draft:
            return None, sample_from(p, s.seed, j)
        return rejection_step(s.proposed[j], q, p, s.seed, j)

    def _verify_in_order(self) -> list[Send]:
        """Consume target tokens position by position, from the first uncommitted one."""
        s = self._prompt
        assert s is not None
        actions: list[Send] = []
        limit_before = s.limit
        learned: int | None = None  # first position committed here without a draft
        while not s.finished and s.n in s.target:
            j = s.n
            accepted, token = self._target_choice(j)
            self._account(j, accepted)
            if accepted:
                s.counters.accepted += 1
            elif accepted is None and not self.restart_on_forced:
                # No draft here, so no task depends on one: commit and go on. The zero-draft
                # task for the next position goes out in _dispatch, as at a restart.
                s.counters.forced += 1
                s.proposed.append(token)
                s.drafter_eos = False  # no draft of ours lies beyond j
                learned = j if learned is None else learned
            else:
                # A rejection: commit the target's token and restart from the next position
                # with a new epoch.
                if accepted is None:
                    s.counters.forced += 1
                else:
                    s.counters.rejected += 1
                del s.proposed[j:]
                s.proposed.append(token)
                s.n = j + 1
                self._commit(token)
                if not s.finished:
                    actions += self._restart(j)
                    limit_before = s.limit  # the rollback carries the new limit
                    learned = None  # ... and the committed tokens
                continue
            s.n += 1
            self._commit(token)
        if s.finished:
            return actions + self._finish()
        if self.uses_drafter:
            # Committed tokens let the drafter run further ahead (at most one message a result);
            # tokens it had no draft for ride along, so it need not draft them.
            s.limit = max(s.limit, s.n + self.run_ahead)
            if s.limit > limit_before or learned is not None:
                start = s.n if learned is None else learned
                committed = tuple(s.proposed[start:s.n])
                actions.append(Send(DRAFTER, Advance(self.epoch, s.limit, start, committed)))
        return actions

    def _account(self, j: int, accepted: bool | None) -> None:
        """Note what the verdict at ``j`` says of the task that gave its token and of the draft
        there (for the record and the trace; decides nothing)."""
        s = self._prompt
        assert s is not None
        task = s.origin.pop(j)
        s.outcome[task.task_id] = "rejected" if accepted is False else "accepted"
        if accepted is None:
            return
        s.drafts[(self.epoch, j)] = "accepted" if accepted else "rejected"
        # A block is the drafts at the positions one target forward verified, first_position ..
        # length (vLLM's, where they are the drafts one step proposed). The last one may have
        # come after the task was sent: DSI drafts on while the target computes, and with
        # lookahead 1 each DSI task verifies only that draft. A task's verdicts come in one
        # pass, so the drafts there are now are all the block will have.
        index = j - task.first_position
        if index == 0:
            s.blocks.add(task.task_id)
        elif task.task_id not in s.blocks:
            return  # its first position was verified with another task's token: no block of its own
        block = min(task.length, len(s.proposed) - 1) - task.first_position + 1
        s.counters.observe_draft(index, accepted, block)

    def _commit(self, token: int) -> None:
        s = self._prompt
        assert s is not None
        s.output.append(int(token))
        if int(token) in self.eos_ids or len(s.output) >= self.max_new_tokens:
            s.finished = True

    # ----------------------------------------------------------------- restarts

    def _cancel_outstanding(self, keep_committed: bool) -> list[Send]:
        """Cancel every outstanding task, except (at a restart) tasks whose whole context is
        committed: they stay valid (their epoch is renewed), and letting the forward in flight
        finish spares that server a second prefill (the parallel prompt prefills, typically)
        and keeps a zero-draft task that verifies the next position."""
        s = self._prompt
        assert s is not None
        s.queue.clear()
        actions: list[Send] = []
        committed = s.proposed[: s.n]
        for task in self.pool.tasks.values():
            if task.cancelled:
                continue
            if (keep_committed and task.length <= s.n
                    and list(task.context) == committed[: task.length]):
                task.epoch = self.epoch
                s.covered_end = max(s.covered_end, task.length)
                continue
            task.cancelled = True
            assert task.server is not None
            actions.append(Send(task.server, Cancel(task.epoch, task.task_id)))
            s.counters.verifications_cancelled += 1
        return actions

    def _restart(self, j: int, committed: bool = False) -> list[Send]:
        """A new epoch from the committed prefix: the drafter's token at ``j`` was wrong.

        ``committed``: position ``j`` had been committed before the drafter's draft for it
        arrived (a late draft); the drafter is told every committed token from ``j`` on."""
        s = self._prompt
        assert s is not None
        self.ids.next_epoch()
        del s.proposed[s.n:]  # drafts of the old epoch (none after a late draft)
        s.covered_end = s.n - 1
        actions = self._cancel_outstanding(keep_committed=True)
        s.target.clear()
        s.origin.clear()
        s.p.clear()
        s.q.clear()
        s.drafter_eos = False
        s.limit = s.n + self.run_ahead
        if self.uses_drafter:
            forced = s.proposed[j:s.n] if committed else s.proposed[j:j + 1]
            forced_ids = tuple(int(t) for t in forced)
            actions.append(Send(DRAFTER, Rollback(self.epoch, j, s.limit, forced_ids)))
        return actions

    def _finish(self) -> list[Send]:
        self.ids.next_epoch()
        actions = self._cancel_outstanding(keep_committed=False)
        if self.uses_drafter:
            actions.append(Send(DRAFTER, Stop(self.epoch)))
        return actions

