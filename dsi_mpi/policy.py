"""The coordinator's decisions as a pure state machine (design note, sections 3 and 6).

Events in (a draft arrived, a verification result arrived, a task was cancelled), actions out
(send a task, cancel one, start / roll back / advance / stop the drafter). No MPI, no clock:
the MPI runtime drives it with real messages, the simulator with a virtual clock, unit tests
with scripted events. One class serves the three modes:

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
position, is only told the token (``AdvanceDrafter.tokens``). If its draft turns out to differ,
the coordinator sees that draft arrive for a committed position and only then rolls the drafter
back. Rolling the drafter back at every forced commit, as this policy once did, throws away the
drafter's forward in flight each time: a drafter slower than about half the target then never
regains its lead and DSI collapses into non-SI (issue 8; ``restart_on_forced`` keeps that
behaviour for the simulator's fidelity test).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dsi_mpi.backends.base import common_prefix
from dsi_mpi.metrics import Counters
from dsi_mpi.verify import rejection_step, sample_from


def default_run_ahead(mode: str, lookahead: int, sp: int) -> int:
    """Drafts the drafter may hold beyond the committed prefix: SI drafts one block and waits;
    DSI may fill every server and queue one more block."""
    return lookahead if mode == "si" else lookahead * (sp + 1)


class ProtocolError(RuntimeError):
    """A message that cannot happen under the protocol: a bug, never bad input."""


@dataclass(frozen=True)
class SendTask:
    server: int
    task_id: int
    epoch: int
    keep: int  # cached positions the server keeps
    tokens: tuple[int, ...]  # context[keep:], what the server appends
    first_position: int  # first position whose target token is returned
    want_probs: bool = False
    seed: int = 0  # the prompt's sampling seed


@dataclass(frozen=True)
class CancelTask:
    server: int
    task_id: int
    epoch: int


@dataclass(frozen=True)
class StartDrafter:
    epoch: int
    prompt: tuple[int, ...]
    limit: int  # the drafter may draft positions < limit
    max_position: int  # ... and <= max_position
    want_probs: bool = False  # send q with each draft (rejection sampling)
    seed: int = 0  # the prompt's sampling seed
    reset_cache: bool = True  # start from an empty KV cache (else reuse a shared prefix)


@dataclass(frozen=True)
class RollbackDrafter:
    epoch: int
    keep: int  # keep the first ``keep`` tokens
    forced: tuple[int, ...]  # then append these (the target's tokens)
    limit: int


@dataclass(frozen=True)
class AdvanceDrafter:
    epoch: int
    limit: int
    start: int = 0  # tokens[0] is the committed token at this position
    tokens: tuple[int, ...] = ()  # target tokens committed where the coordinator had no draft


@dataclass(frozen=True)
class StopDrafter:
    epoch: int


Action = SendTask | CancelTask | StartDrafter | RollbackDrafter | AdvanceDrafter | StopDrafter
DrafterAction = StartDrafter | RollbackDrafter | AdvanceDrafter | StopDrafter


class DrafterState:
    """The drafter's side of the protocol (pure): what it holds and whether it may draft.

    The MPI drafter decodes its messages into these actions; the simulator applies the
    policy's actions directly, so both model the drafter the same way. It drafts position
    ``p = len(seq)`` only while ``p < limit``, ``p <= max_position`` and no EOS was drafted.
    """

    def __init__(self) -> None:
        self.seq: list[int] = []  # prompt + drafts, as the drafter believes them
        self.epoch = 0
        self.limit = 0
        self.max_position = -1
        self.want_probs = False
        self.seed = 0
        self.reset_cache = False  # the next forward starts from an empty cache
        self.active = False
        self.eos = False
        self.diverged = False  # a committed token differs from our draft: a rollback is coming

    def apply(self, action: DrafterAction) -> None:
        if isinstance(action, StartDrafter):
            self.seq = list(action.prompt)
            self.limit, self.max_position, self.seed = action.limit, action.max_position, action.seed
            self.want_probs, self.reset_cache = action.want_probs, action.reset_cache
            self.active, self.eos, self.diverged = True, False, False
        elif isinstance(action, RollbackDrafter):
            if len(self.seq) < action.keep:
                raise ProtocolError(f"rollback to {action.keep} but the drafter holds {len(self.seq)} tokens")
            self.seq = self.seq[: action.keep] + list(action.forced)
            self.limit, self.eos, self.diverged = action.limit, False, False
        elif isinstance(action, AdvanceDrafter):
            self.limit = max(self.limit, action.limit)
            self._learn(action.start, action.tokens)
        elif isinstance(action, StopDrafter):
            self.active = False
        else:
            raise ProtocolError(f"not a drafter action: {action!r}")
        self.epoch = action.epoch

    def _learn(self, start: int, tokens: Sequence[int]) -> None:
        """Committed target tokens for positions ``start ..``: skip drafting the ones not yet
        drafted, if the drafts we hold agree with the rest. If one disagrees, our later drafts
        build on a wrong token; the coordinator sees that draft and rolls us back, and until
        then nothing more is appended."""
        if not tokens or self.diverged:
            return
        if len(self.seq) < start:
            raise ProtocolError(f"committed tokens from position {start}, but the drafter holds {len(self.seq)}")
        overlap = min(len(self.seq) - start, len(tokens))
        if self.seq[start: start + overlap] != list(tokens[:overlap]):
            self.diverged = True
            return
        if overlap < len(tokens):
            self.seq.extend(int(t) for t in tokens[overlap:])
            self.eos = False  # the last token is a committed one, never EOS (that ends the prompt)

    def can_draft(self) -> bool:
        n = len(self.seq)
        return self.active and not self.eos and n < self.limit and n <= self.max_position

    def drafted(self, token: int, eos_ids: frozenset[int]) -> int:
        """Record a draft; returns its position."""
        self.seq.append(int(token))
        self.eos = int(token) in eos_ids
        return len(self.seq) - 1


@dataclass
class _Task:
    task_id: int
    epoch: int
    length: int  # context length L; the task covers positions first_position .. L
    first_position: int
    server: int | None = None
    context: tuple[int, ...] = ()  # snapshot at dispatch: what the server will hold
    keep: int = 0
    cancelled: bool = False  # a cancel was sent; the reply is still to come

    @property
    def num_outputs(self) -> int:
        return self.length - self.first_position + 1


@dataclass
class _ServerState:
    tokens: tuple[int, ...] = ()  # what the server's KV cache holds, as far as we know
    task_id: int | None = None  # the one outstanding request, if any


@dataclass
class Policy:
    mode: str
    servers: Sequence[int]  # target server ids (MPI ranks in the runtime)
    lookahead: int
    run_ahead: int  # drafts the drafter may hold beyond the committed prefix
    max_new_tokens: int
    eos_ids: frozenset[int] = frozenset()
    verify: str = "exact"
    seed: int = 0
    reuse_cache: bool = False  # keep KV caches across prompts and reuse shared prefixes
    # The behaviour before issue 8: roll the drafter back at every forced commit. Only for the
    # simulator test and benchmark that show why it collapses with slow drafters.
    restart_on_forced: bool = False

    epoch: int = 0  # start above any epoch a server or the drafter has seen
    next_task_id: int = 0  # likewise for task ids
    counters: Counters = field(default_factory=Counters)
    output: list[int] = field(default_factory=list)
    finished: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("dsi", "si", "nonsi"):
            raise ValueError(f"unknown mode {self.mode!r}")
        if self.mode != "dsi" and len(self.servers) != 1:
            raise ValueError(f"mode {self.mode} uses exactly one target server")
        self._servers = {s: _ServerState() for s in self.servers}
        self._tasks: dict[int, _Task] = {}
        self._queue: deque[_Task] = deque()

    # ----------------------------------------------------------------- events in

    def begin(self, prompt: Sequence[int], seed: int | None = None) -> list[Action]:
        """Start a prompt (with its own sampling seed, default the policy's); servers must be idle."""
        if not self.idle:
            raise ProtocolError("begin() while tasks are outstanding")
        if not prompt:
            raise ValueError("empty prompt")
        self._seed = self.seed if seed is None else seed
        if not self.reuse_cache:
            # Forget what the servers hold: the first task of each keeps nothing, so every
            # prompt pays its full prefill, as a benchmark should.
            for state in self._servers.values():
                state.tokens = ()
        self.epoch += 1
        self.counters = Counters()
        self.output = []
        self.finished = False
        self._proposed = list(prompt)  # committed tokens, then the drafts
        self._n = len(prompt)  # committed length; position n is the next to commit
        self._last_position = len(prompt) + self.max_new_tokens - 1
        self._covered_end = self._n - 1  # highest position some live task covers
        self._target: dict[int, int] = {}  # position -> the target's token (this epoch)
        self._p: dict[int, np.ndarray] = {}  # position -> target distribution (rejection)
        self._q: dict[int, np.ndarray] = {}  # position -> drafter distribution (rejection)
        self._drafter_eos = False
        self._limit = self._n + self.run_ahead
        actions: list[Action] = []
        if self.uses_drafter:
            # Drafting position last_position is wasted work: the target's token there is
            # committed whatever the draft says.
            actions.append(StartDrafter(self.epoch, tuple(prompt), self._limit, self._last_position - 1,
                                        want_probs=self.verify == "rejection", seed=self._seed,
                                        reset_cache=not self.reuse_cache))
        if self.mode != "si":
            # Prefill on every server at once: TTFT is paid once, in parallel, and the first
            # result gives the first token.
            servers = self.servers if self.mode == "dsi" else self.servers[:1]
            for server in servers:
                task = self._new_task(self._n, self._n)
                task.server = server
                actions.append(self._send(task))
        actions += self._dispatch()
        return actions

    def on_draft(self, epoch: int, position: int, token: int, q: np.ndarray | None = None) -> list[Action]:
        """The drafter proposed ``token`` for ``position`` (with distribution ``q``)."""
        self.counters.drafter_forwards += 1
        if epoch != self.epoch or self.finished:
            return []  # built on a prefix that was rolled back, or the prompt is done
        if position < self._n:
            # A late draft for a position committed without it (a forced commit): right, and the
            # drafter's later drafts stand; wrong, and they build on a token that is not ours.
            self.counters.drafts_late += 1
            if int(token) == self._proposed[position]:
                return []
            return self._restart(position, committed=True) + self._dispatch()
        if position != len(self._proposed):
            raise ProtocolError(f"draft for position {position}, expected {len(self._proposed)}")
        self._proposed.append(int(token))
        if q is not None:
            self._q[position] = q
        if int(token) in self.eos_ids:
            self._drafter_eos = True  # the drafter stops after EOS
        return self._dispatch()

    def on_result(self, server: int, task_id: int, epoch: int, first_position: int,
                  tokens: Sequence[int], probs: np.ndarray | None = None) -> list[Action]:
        """A target server returned its tokens (and distributions) for a task."""
        task = self._release(server, task_id)
        self._servers[server].tokens = task.context
        self.counters.target_forwards += 1
        if first_position != task.first_position or len(tokens) != task.length - task.first_position + 1:
            raise ProtocolError(f"task {task_id}: result for positions {first_position}+{len(tokens)}, "
                                f"asked {task.first_position}..{task.length}")
        actions: list[Action] = []
        # ``task.epoch`` and not the message's: a restart keeps (and re-stamps) the tasks whose
        # context is all committed, so the zero-draft task in flight still counts.
        if task.epoch == self.epoch and not self.finished:
            for i, token in enumerate(tokens):
                if first_position + i >= self._n:
                    self._target.setdefault(first_position + i, int(token))
                    if probs is not None:
                        self._p.setdefault(first_position + i, probs[i])
            actions += self._verify_in_order()
        return actions + self._dispatch()

    def on_cancelled(self, server: int, task_id: int) -> list[Action]:
        """A server abandoned a task; its cache holds the task's first ``keep`` positions."""
        task = self._release(server, task_id)
        self._servers[server].tokens = task.context[: task.keep]
        self.counters.verifications_aborted += 1
        return self._dispatch()

    # ----------------------------------------------------------------- state

    @property
    def uses_drafter(self) -> bool:
        """Every mode but non-SI has a drafter."""
        return self.mode != "nonsi"

    @property
    def idle(self) -> bool:
        """No request is outstanding on any server."""
        return not self._tasks

    @property
    def queued(self) -> int:
        """Tasks waiting for a free server."""
        return len(self._queue)

    # ----------------------------------------------------------------- internals

    def _new_task(self, length: int, first_position: int) -> _Task:
        task = _Task(self.next_task_id, self.epoch, length, first_position)
        self.next_task_id += 1
        self._covered_end = max(self._covered_end, length)
        return task

    def _send(self, task: _Task) -> SendTask:
        assert task.server is not None
        state = self._servers[task.server]
        task.context = task.context or tuple(self._proposed[: task.length])
        task.keep = min(common_prefix(state.tokens, task.context), task.first_position - 1)
        state.task_id = task.task_id
        self._tasks[task.task_id] = task
        self.counters.verifications_sent += 1
        return SendTask(task.server, task.task_id, task.epoch, task.keep, task.context[task.keep:],
                        task.first_position, want_probs=self.verify == "rejection", seed=self._seed)

    def _release(self, server: int, task_id: int) -> _Task:
        task = self._tasks.pop(task_id, None)
        if task is None or task.server != server or self._servers[server].task_id != task_id:
            raise ProtocolError(f"reply for task {task_id} from server {server}, which does not hold it")
        self._servers[server].task_id = None
        return task

    def _drafter_stopped(self) -> bool:
        """The drafter will propose nothing more in this epoch without a message from us."""
        if not self.uses_drafter:
            return True
        return self._drafter_eos or len(self._proposed) >= self._last_position

    def _next_task_length(self) -> int | None:
        """Context length of the next task to create, or None (the mode's dispatch rule)."""
        avail = len(self._proposed)
        covered = self._covered_end
        if self.mode == "si":
            if self._tasks or self._queue:
                return None  # the drafter waits for the verdict of the one task
            exhausted = self._drafter_stopped() or avail >= self._limit
            if avail - self._n >= self.lookahead or exhausted:
                return min(avail, self._n + self.lookahead)
            return None
        if self._n > covered:
            return avail  # the next position has no verifier: send what we have, now
        if avail - covered >= self.lookahead:
            return covered + self.lookahead
        if self._drafter_stopped() and avail > covered:
            return avail  # no more drafts are coming: verify the tail
        return None

    def _dispatch(self) -> list[Action]:
        """Create the tasks the mode's rule asks for, then hand queued tasks to free servers."""
        actions: list[Action] = []
        if self.finished:
            return actions
        while True:
            length = self._next_task_length()
            if length is None:
                break
            length = min(length, self._last_position)
            if length <= self._covered_end:
                break
            self._queue.append(self._new_task(length, self._covered_end + 1))
        free = [s for s, st in self._servers.items() if st.task_id is None]
        while self._queue and free:
            task = self._queue.popleft()
            if self.mode == "dsi":
                # Tasks queue only when every server is busy (fewer servers than Eq. 1 asks
                # for). A forward costs about the same for a few more tokens, so the task that
                # gets the free server covers everything queued and every draft there is now.
                length = min(max(len(self._proposed), task.length), self._last_position)
                self._queue.clear()
                task.length = length
                self._covered_end = max(self._covered_end, length)
            # The free server whose cache shares the longest prefix has the least to recompute.
            task.context = tuple(self._proposed[: task.length])
            best = max(free, key=lambda s: common_prefix(self._servers[s].tokens, task.context))
            free.remove(best)
            task.server = best
            actions.append(self._send(task))
        return actions

    def _target_choice(self, j: int) -> tuple[bool | None, int]:
        """Verify position ``j``: (accepted, token); accepted is None when there is no draft.

        Consumes what was kept for ``j``: position ``j`` is committed after this, and keeping
        distributions (vocabulary-sized) for the whole prompt would grow without bound."""
        has_draft = len(self._proposed) > j
        t = self._target.pop(j)
        if self.verify == "exact":
            if not has_draft:
                return None, t
            return self._proposed[j] == t, t
        p, q = self._p.pop(j), self._q.pop(j, None)
        if not has_draft:
            return None, sample_from(p, self._seed, j)
        return rejection_step(self._proposed[j], q, p, self._seed, j)

    def _verify_in_order(self) -> list[Action]:
        """Consume target tokens position by position, from the first uncommitted one."""
        actions: list[Action] = []
        limit_before = self._limit
        learned: int | None = None  # first position committed here without a draft
        while not self.finished and self._n in self._target:
            j = self._n
            accepted, token = self._target_choice(j)
            if accepted:
                self.counters.accepted += 1
            elif accepted is None and not self.restart_on_forced:
                # No draft here, so no task depends on one: commit and go on. The zero-draft
                # task for the next position goes out in _dispatch, as at a restart.
                self.counters.forced += 1
                self._proposed.append(token)
                self._drafter_eos = False  # no draft of ours lies beyond j
                learned = j if learned is None else learned
            else:
                # A rejection: commit the target's token and restart from the next position
                # with a new epoch.
                if accepted is None:
                    self.counters.forced += 1
                else:
                    self.counters.rejected += 1
                del self._proposed[j:]
                self._proposed.append(token)
                self._n = j + 1
                self._commit(token)
                if not self.finished:
                    actions += self._restart(j)
                    limit_before = self._limit  # the rollback carries the new limit
                    learned = None  # ... and the committed tokens
                continue
            self._n += 1
            self._commit(token)
        if self.finished:
            return actions + self._finish()
        if self.uses_drafter:
            # Committed tokens let the drafter run further ahead (at most one message a result);
            # tokens it had no draft for ride along, so it need not draft them.
            self._limit = max(self._limit, self._n + self.run_ahead)
            if self._limit > limit_before or learned is not None:
                start = self._n if learned is None else learned
                actions.append(AdvanceDrafter(self.epoch, self._limit, start,
                                              tuple(self._proposed[start:self._n])))
        return actions

    def _commit(self, token: int) -> None:
        self.output.append(int(token))
        if int(token) in self.eos_ids or len(self.output) >= self.max_new_tokens:
            self.finished = True

    def _cancel_outstanding(self, keep_committed: bool = False) -> list[Action]:
        """Cancel every outstanding task, except (at a restart) tasks whose whole context is
        committed: they stay valid (their epoch is renewed), and letting the forward in flight
        finish spares that server a second prefill (the parallel prompt prefills, typically)
        and keeps a zero-draft task that verifies the next position."""
        self._queue.clear()
        actions: list[Action] = []
        committed = self._proposed[: self._n]
        for task in self._tasks.values():
            if task.cancelled:
                continue
            if keep_committed and task.length <= self._n and list(task.context) == committed[: task.length]:
                task.epoch = self.epoch
                self._covered_end = max(self._covered_end, task.length)
                continue
            task.cancelled = True
            actions.append(CancelTask(task.server, task.task_id, task.epoch))
            self.counters.verifications_cancelled += 1
        return actions

    def _restart(self, j: int, committed: bool = False) -> list[Action]:
        """A new epoch from the committed prefix: the drafter's token at ``j`` was wrong.

        ``committed``: position ``j`` had been committed before the drafter's draft for it
        arrived (a late draft); the drafter is told every committed token from ``j`` on."""
        self.epoch += 1
        del self._proposed[self._n:]  # drafts of the old epoch (none after a late draft)
        self._covered_end = self._n - 1
        actions = self._cancel_outstanding(keep_committed=True)
        self._target.clear()
        self._p.clear()
        self._q.clear()
        self._drafter_eos = False
        self._limit = self._n + self.run_ahead
        if self.uses_drafter:
            forced = self._proposed[j:self._n] if committed else self._proposed[j:j + 1]
            actions.append(RollbackDrafter(self.epoch, j, tuple(int(t) for t in forced), self._limit))
        return actions

    def _finish(self) -> list[Action]:
        self.epoch += 1
        actions = self._cancel_outstanding(keep_committed=False)
        if self.uses_drafter:
            actions.append(StopDrafter(self.epoch))
        return actions
