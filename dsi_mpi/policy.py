"""The coordinator's decisions as a pure state machine (docs/design.md, "The coordinator's
policy").

Events in (a draft arrived, a verification result arrived, a task was cancelled), actions out:
protocol messages, each addressed to a target server or to the drafter. No MPI, no clock:
the MPI runtime drives it with real messages, the simulator with a virtual clock, unit tests
with scripted events. The three modes share everything but a few rules
(:mod:`dsi_mpi.rules`):

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
back (docs/design.md, "Forced commits").

State is grouped by lifetime: :class:`~dsi_mpi.tasks.Ids` (epochs and task ids, for the whole
job), :class:`~dsi_mpi.tasks.ServerPool` (what each server's cache holds and its one
outstanding task, across prompts), a :class:`PromptRun` for each prompt (its decisions, made
by :meth:`Policy.begin`), with its :class:`~dsi_mpi.dispatch.TaskQueue` (its tasks on their
way to the servers) and its :class:`~dsi_mpi.ledger.Ledger` (its accounting).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dsi_mpi.dispatch import TaskQueue
from dsi_mpi.ledger import Ledger
from dsi_mpi.metrics import Counters
from dsi_mpi.protocol import Advance, ProtocolError, Rollback, Start, Stop
from dsi_mpi.rules import RULES, Rules, default_run_ahead
from dsi_mpi.tasks import DRAFTER, Ids, Send, ServerPool, Task
from dsi_mpi.verify import VerifyMode, rejection_step, sample_from

__all__ = ["DRAFTER", "RULES", "Ids", "Policy", "PromptRun", "ProtocolError", "Rules", "Send",
           "ServerPool", "Task", "default_run_ahead"]

class Policy:
    """The coordinator's decisions for one mode; ``begin`` a prompt, then feed it events.

    The policy lives for the whole job (or one mode of it); each prompt's decisions are made by
    the :class:`PromptRun` that :meth:`begin` makes (``prompt_run``: its class)."""

    def __init__(self, mode: str, servers: Sequence[int], lookahead: int, run_ahead: int,
                 max_new_tokens: int, eos_ids: frozenset[int] = frozenset(),
                 verify: str | VerifyMode = VerifyMode.EXACT, seed: int = 0,
                 reuse_cache: bool = False, ids: Ids | None = None,
                 prompt_run: type[PromptRun] | None = None, min_drafts: int = 1) -> None:
        if mode not in RULES:
            raise ValueError(f"unknown mode {mode!r}")
        self.rules = RULES[mode]
        if self.rules.one_server and len(servers) != 1:
            raise ValueError(f"mode {mode} uses exactly one target server")
        self.mode = mode
        self.servers = tuple(servers)
        if mode == "dsi" and not 1 <= min_drafts <= lookahead:
            raise ValueError(f"min_drafts must be in 1..lookahead ({lookahead}), got {min_drafts}")
        self.lookahead = lookahead
        # dsi: a task carries no drafts or at least this many; SI verifies one block of
        # lookahead drafts and non-SI none, so they ignore it
        self.min_drafts = min_drafts if mode == "dsi" else 1
        self.run_ahead = run_ahead
        self.max_new_tokens = max_new_tokens
        self.eos_ids = eos_ids
        self.verify = VerifyMode(verify)
        self.seed = seed
        self.reuse_cache = reuse_cache  # keep KV caches across prompts and reuse shared prefixes
        self.ids = ids or Ids()
        self.pool = ServerPool(servers)
        self.prompt_run = prompt_run or PromptRun
        self.current: PromptRun | None = None  # the current (or last) prompt

    # ----------------------------------------------------------------- what drivers read

    @property
    def uses_drafter(self) -> bool:
        return self.rules.uses_drafter

    @property
    def epoch(self) -> int:
        return self.ids.epoch

    @property
    def finished(self) -> bool:
        return self.current is None or self.current.finished

    @property
    def output(self) -> list[int]:
        return [] if self.current is None else self.current.output

    @property
    def counters(self) -> Counters:
        return Counters() if self.current is None else self.current.ledger.counters

    @property
    def idle(self) -> bool:
        """No request is outstanding on any server."""
        return self.pool.idle

    @property
    def queued(self) -> int:
        """Tasks waiting for a free server."""
        return 0 if self.current is None else len(self.current.tasks)

    @property
    def epochs(self) -> tuple[int, int]:
        """The first and the last epoch of the current (or last) prompt: every message about
        it carries an epoch in this range, and no other prompt's does."""
        return (0, 0) if self.current is None else (self.current.first_epoch, self.epoch)

    def task_outcomes(self) -> dict[int, str]:
        """What became of every task of the prompt answered so far, by task id: one of
        :data:`dsi_mpi.metrics.TARGET_OUTCOMES` (final once the prompt is finished and idle)."""
        run = self.current
        return {} if run is None else run.ledger.task_outcomes(run.proposed[: run.n])

    def draft_outcomes(self) -> dict[tuple[int, int], str]:
        """What became of the drafts verified so far, by (epoch, position): accepted, rejected,
        or late (arrived after the target alone had committed its position). A draft not here
        was dropped unverified (an old epoch, or the output was complete)."""
        return {} if self.current is None else self.current.ledger.draft_outcomes()

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
        self.current = self.prompt_run(self, prompt, self.seed if seed is None else seed)
        return self.current.start()

    def on_draft(self, epoch: int, position: int, token: int,
                 q: np.ndarray | None = None) -> list[Send]:
        """The drafter proposed ``token`` for ``position`` (with distribution ``q``)."""
        assert self.current is not None, "a draft before any prompt"
        return self.current.on_draft(epoch, position, int(token), q)

    def on_result(self, server: int, task_id: int, first_position: int, tokens: Sequence[int],
                  probs: np.ndarray | None = None) -> list[Send]:
        """A target server returned its tokens (and distributions) for a task."""
        assert self.current is not None, "a result before any prompt"
        task = self.pool.reply(server, task_id, completed=True)
        return self.current.on_result(task, first_position, tokens, probs)

    def on_cancelled(self, server: int, task_id: int) -> list[Send]:
        """A server abandoned a task; its cache holds the task's first ``keep`` positions."""
        task = self.pool.reply(server, task_id, completed=False)
        if self.current is None:
            return []
        self.current.ledger.abandoned(task)
        return self.current.dispatch()


class PromptRun:
    """One prompt's decisions, from :meth:`Policy.begin` to its last reply: what is committed
    and drafted, the target tokens waiting to be verified, the tasks queued for a server."""

    def __init__(self, policy: Policy, prompt: Sequence[int], seed: int) -> None:
        self.policy, self.rules, self.pool = policy, policy.rules, policy.pool
        self.seed = seed
        n = len(prompt)
        self.proposed = list(prompt)  # committed tokens, then the drafts
        self.n = n  # committed length; position n is the next to commit
        self.last_position = n + policy.max_new_tokens - 1  # the last position to generate
        self.limit = n + policy.run_ahead  # the drafter may draft positions < limit
        self.target: dict[int, int] = {}  # position -> the target's token
        self.p: dict[int, np.ndarray] = {}  # position -> target distribution
        self.q: dict[int, np.ndarray] = {}  # position -> drafter distribution
        self.drafter_eos = False  # a draft ahead is EOS: the drafter stopped after it
        self.output: list[int] = []
        self.finished = False
        self.first_epoch = policy.ids.next_epoch()
        self.ledger = Ledger()
        self.tasks = TaskQueue(policy.rules, policy.pool, policy.ids, self.ledger,
                               policy.lookahead, policy.verify is VerifyMode.REJECTION, seed,
                               covered_end=n - 1, min_drafts=policy.min_drafts)

    @property
    def epoch(self) -> int:
        return self.policy.ids.epoch

    @property
    def drafter_stopped(self) -> bool:
        """The drafter will propose nothing more in this epoch without a message from us."""
        if not self.rules.uses_drafter:
            return True
        return self.drafter_eos or len(self.proposed) >= self.last_position

    # ----------------------------------------------------------------- events

    def start(self) -> list[Send]:
        """The prompt's first messages: the drafter's Start, the prefill tasks."""
        actions: list[Send] = []
        policy = self.policy
        if self.rules.uses_drafter:
            # Drafting the last position is wasted work: the target's token there is committed
            # whatever the draft says.
            actions.append(Send(DRAFTER, Start(self.epoch, self.limit, self.last_position - 1,
                                               policy.verify is VerifyMode.REJECTION, self.seed,
                                               not policy.reuse_cache, tuple(self.proposed))))
        n = self.n
        for server in self.rules.prefill(policy.servers):
            actions.append(self.tasks.send(self.tasks.new(n, n), server, self.proposed))
        return actions + self.dispatch()

    def on_draft(self, epoch: int, position: int, token: int,
                 q: np.ndarray | None) -> list[Send]:
        self.ledger.draft_received()
        if epoch != self.epoch or self.finished:
            return []  # built on a prefix that was rolled back, or the prompt is done
        if position < self.n:
            # A late draft for a position committed without it (a forced commit): right, and the
            # drafter's later drafts stand; wrong, and they build on a token that is not ours.
            self.ledger.late_draft(epoch, position)
            if token == self.proposed[position]:
                return []
            return self._restart(position, committed=True) + self.dispatch()
        if position != len(self.proposed):
            raise ProtocolError(f"draft for position {position}, expected {len(self.proposed)}")
        self.proposed.append(token)
        if q is not None:
            self.q[position] = q
        if token in self.policy.eos_ids:
            self.drafter_eos = True  # the drafter stops after EOS
        return self.dispatch()

    def on_result(self, task: Task, first_position: int, tokens: Sequence[int],
                  probs: np.ndarray | None) -> list[Send]:
        self.ledger.answered(task)
        if first_position != task.first_position or len(tokens) != task.num_outputs:
            raise ProtocolError(f"task {task.task_id}: result for positions "
                                f"{first_position}+{len(tokens)}, "
                                f"asked {task.first_position}..{task.length}")
        actions: list[Send] = []
        # The task's epoch as the pool knows it, not the message's: a restart keeps (and
        # renews) the tasks whose context is all committed, such as a zero-draft task.
        if task.epoch == self.epoch and not self.finished:
            for i, token in enumerate(tokens):
                position = first_position + i
                if position >= self.n and position not in self.target:
                    self.target[position] = int(token)
                    self.ledger.target_token(position, task)
                    if probs is not None:
                        self.p[position] = probs[i]
            actions += self._verify_in_order()
        return actions + self.dispatch()

    def dispatch(self) -> list[Send]:
        """The tasks the mode's rules ask for now, handed to free servers."""
        if self.finished:
            return []
        return self.tasks.dispatch(self.proposed, self.n, self.limit, self.drafter_stopped,
                                   self.last_position)

    # ----------------------------------------------------------------- commits

    def _target_choice(self, j: int) -> tuple[bool | None, int]:
        """Verify position ``j``: (accepted, token); accepted is None when there is no draft.

        Consumes what was kept for ``j``: position ``j`` is committed after this, and keeping
        distributions (vocabulary-sized) for the whole prompt would grow without bound."""
        has_draft = len(self.proposed) > j
        t = self.target.pop(j)
        if self.policy.verify is VerifyMode.EXACT:
            if not has_draft:
                return None, t
            return self.proposed[j] == t, t
        p, q = self.p.pop(j), self.q.pop(j, None)
        if not has_draft:
            return None, sample_from(p, self.seed, j)
        if q is None:
            raise ProtocolError(f"the draft for position {j} came without its distribution")
        return rejection_step(self.proposed[j], q, p, self.seed, j)

    def _verify_in_order(self) -> list[Send]:
        """Consume target tokens position by position, from the first uncommitted one."""
        actions: list[Send] = []
        limit_before = self.limit
        learned: int | None = None  # first position committed here without a draft
        while not self.finished and self.n in self.target:
            j = self.n
            accepted, token = self._target_choice(j)
            self.ledger.verdict(self.epoch, j, accepted, len(self.proposed))
            restart: list[Send] | None = None
            if accepted is False:
                restart = self._correct(j, token)
            elif accepted is None:
                restart = self._forced(j, token)
                if restart is None:
                    learned = j if learned is None else learned
            if restart is not None:
                actions += restart
                limit_before = self.limit  # the rollback carries the new limit
                learned = None  # ... and the committed tokens
                continue
            self.n += 1
            self._commit(token)
        if self.finished:
            return actions + self._finish()
        if self.rules.uses_drafter:
            # Committed tokens let the drafter run further ahead (at most one message a result);
            # tokens it had no draft for ride along, so it need not draft them.
            self.limit = max(self.limit, self.n + self.policy.run_ahead)
            if self.limit > limit_before or learned is not None:
                start = self.n if learned is None else learned
                committed = tuple(self.proposed[start:self.n])
                actions.append(Send(DRAFTER, Advance(self.epoch, self.limit, start, committed)))
        return actions

    def _forced(self, j: int, token: int) -> list[Send] | None:
        """The target's ``token`` at ``j``, where there is no draft: no task depends on a draft
        there, so it is committed and the walk goes on (None: no restart). The zero-draft task
        for the next position goes out in dispatch(), as at a restart."""
        self.proposed.append(token)
        self.drafter_eos = False  # no draft of ours lies beyond j
        return None

    def _correct(self, j: int, token: int) -> list[Send]:
        """A rejection at ``j``: commit the target's token and restart from the next position
        with a new epoch."""
        del self.proposed[j:]
        self.proposed.append(token)
        self.n = j + 1
        self._commit(token)
        return [] if self.finished else self._restart(j)

    def _commit(self, token: int) -> None:
        self.output.append(int(token))
        if int(token) in self.policy.eos_ids or len(self.output) >= self.policy.max_new_tokens:
            self.finished = True

    # ----------------------------------------------------------------- restarts

    def _restart(self, j: int, committed: bool = False) -> list[Send]:
        """A new epoch from the committed prefix: the drafter's token at ``j`` was wrong.

        ``committed``: position ``j`` had been committed before the drafter's draft for it
        arrived (a late draft); the drafter is told every committed token from ``j`` on."""
        self.policy.ids.next_epoch()
        del self.proposed[self.n:]  # drafts of the old epoch (none after a late draft)
        self.tasks.covered_end = self.n - 1
        actions = self.tasks.cancel_outstanding(self.proposed[: self.n])
        self.target.clear()
        self.ledger.restart()
        self.p.clear()
        self.q.clear()
        self.drafter_eos = False
        self.limit = self.n + self.policy.run_ahead
        if self.rules.uses_drafter:
            forced = self.proposed[j:self.n] if committed else self.proposed[j:j + 1]
            forced_ids = tuple(int(t) for t in forced)
            actions.append(Send(DRAFTER, Rollback(self.epoch, j, self.limit, forced_ids)))
        return actions

    def _finish(self) -> list[Send]:
        self.policy.ids.next_epoch()
        actions = self.tasks.cancel_outstanding(None)
        if self.rules.uses_drafter:
            actions.append(Send(DRAFTER, Stop(self.epoch)))
        return actions
