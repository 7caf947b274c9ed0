"""One prompt's verification tasks on their way to the target servers (pure): made as the
mode's rules ask (:mod:`dsi_mpi.rules`), queued while every server is busy, handed to the free
server whose cache shares the longest prefix, cancelled when the drafts they verify are gone
(docs/design.md, section 3). :class:`~dsi_mpi.policy.PromptRun` owns one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from dsi_mpi.ledger import Ledger
from dsi_mpi.protocol import Cancel, Verify
from dsi_mpi.rules import Coverage, Rules
from dsi_mpi.tasks import Ids, Send, ServerPool, Task


class TaskQueue:
    """One prompt's verification tasks on their way to the servers: made as the mode's rules
    ask, queued while every server is busy, handed to the free server whose cache shares the
    longest prefix, cancelled when the drafts they verify are gone."""

    def __init__(self, rules: Rules, pool: ServerPool, ids: Ids, ledger: Ledger, lookahead: int,
                 want_probs: bool, seed: int, covered_end: int, min_drafts: int = 1) -> None:
        self.rules, self.pool, self.ids, self.ledger = rules, pool, ids, ledger
        self.lookahead, self.want_probs, self.seed = lookahead, want_probs, seed
        self.min_drafts = min_drafts  # a task carries no drafts or at least this many
        self.queue: deque[Task] = deque()  # tasks waiting for a free server
        self.covered_end = covered_end  # highest position some live task covers

    def __len__(self) -> int:
        return len(self.queue)

    def new(self, length: int, first_position: int) -> Task:
        self.covered_end = max(self.covered_end, length)
        return Task(self.ids.next_task_id(), self.ids.epoch, length, first_position)

    def send(self, task: Task, server: int, proposed: Sequence[int]) -> Send:
        task.context = task.context or tuple(proposed[: task.length])
        self.pool.assign(task, server)
        self.ledger.sent()
        return Send(server, Verify(task.epoch, task.task_id, task.keep, task.first_position,
                                   task.context[task.keep:],
                                   want_probs=self.want_probs, seed=self.seed))

    def dispatch(self, proposed: list[int], n: int, limit: int, drafter_stopped: bool,
                 last_position: int) -> list[Send]:
        """Create the tasks the mode's rule asks for, then hand queued tasks to free servers."""
        actions: list[Send] = []
        lookahead = self.lookahead
        while True:
            pending = bool(self.pool.tasks or self.queue)
            view = Coverage(n, len(proposed), self.covered_end, limit, drafter_stopped)
            length = self.rules.next_task_length(view, lookahead, pending, self.min_drafts)
            if length is None:
                break
            length = min(length, last_position)
            if length <= self.covered_end:
                break
            self.queue.append(self.new(length, self.covered_end + 1))
        free = self.pool.free()
        while self.queue and free:
            task = self.queue.popleft()
            if self.rules.widen_queued:
                # A forward costs about the same for a few more tokens, so the task that gets
                # the free server covers everything queued and every draft there is now (a
                # zero-draft task only with enough drafts to pay for the longer forward).
                widened = min(max(len(proposed), task.length), last_position)
                if task.length > n or widened - n >= self.min_drafts:
                    task.length = widened
                    self.queue.clear()
                    self.covered_end = max(self.covered_end, task.length)
            task.context = tuple(proposed[: task.length])
            server = self.pool.closest(free, task.context)
            free.remove(server)
            actions.append(self.send(task, server, proposed))
        return actions

    def cancel_outstanding(self, committed: list[int] | None) -> list[Send]:
        """Cancel every outstanding task, except (at a restart, given the ``committed`` tokens)
        tasks whose whole context is committed: they stay valid (their epoch is renewed), and
        letting the forward in flight finish spares that server a second prefill (the parallel
        prompt prefills, typically) and keeps a zero-draft task that verifies the next
        position."""
        self.queue.clear()
        actions: list[Send] = []
        for task in self.pool.tasks.values():
            if task.cancelled:
                continue
            if (committed is not None and task.length <= len(committed)
                    and list(task.context) == committed[: task.length]):
                task.epoch = self.ids.epoch
                self.covered_end = max(self.covered_end, task.length)
                continue
            task.cancelled = True
            assert task.server is not None
            actions.append(Send(task.server, Cancel(task.epoch, task.task_id)))
            self.ledger.cancel_sent()
        return actions
