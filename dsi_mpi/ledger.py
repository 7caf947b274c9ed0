"""What became of one prompt's work, for the records and the trace (pure; decides nothing).

The policy (:mod:`dsi_mpi.policy`) tells its :class:`Ledger` what happened (a draft received, a
task sent, answered or abandoned, the verdict at a position); the ledger keeps the counters of
:class:`~dsi_mpi.metrics.Counters` and says, when asked, what became of every task
(:data:`~dsi_mpi.metrics.TARGET_OUTCOMES`) and every verified draft.
"""

from __future__ import annotations

from collections.abc import Sequence

from dsi_mpi.metrics import Counters
from dsi_mpi.tasks import Task


class Ledger:
    """The accounting of one prompt: counters, and the outcome of each task and draft."""

    def __init__(self) -> None:
        self.counters = Counters()
        self._origin: dict[int, Task] = {}  # position -> the task whose token is kept for it
        self._answered: dict[int, Task] = {}  # task id -> tasks that got their reply
        self._outcome: dict[int, str] = {}  # task id -> accepted, rejected or cancelled
        self._drafts: dict[tuple[int, int], str] = {}  # (epoch, position) -> draft outcome
        self._blocks: set[int] = set()  # tasks whose block's first draft was verified

    # ----------------------------------------------------------------- what happened

    def draft_received(self) -> None:
        self.counters.drafts_received += 1

    def late_draft(self, epoch: int, position: int) -> None:
        """A draft came for a position the target alone had committed."""
        self.counters.drafts_late += 1
        self._drafts[(epoch, position)] = "late"

    def sent(self) -> None:
        self.counters.verifications_sent += 1

    def cancel_sent(self) -> None:
        self.counters.verifications_cancelled += 1

    def answered(self, task: Task) -> None:
        """A task's forward ran to completion and its result came."""
        self.counters.target_forwards += 1
        self._answered[task.task_id] = task

    def abandoned(self, task: Task) -> None:
        """A server abandoned a cancelled task's forward."""
        self._answered[task.task_id] = task
        self._outcome[task.task_id] = "cancelled"
        self.counters.verifications_aborted += 1

    def target_token(self, position: int, task: Task) -> None:
        """``task`` gave the target token kept for ``position``."""
        self._origin[position] = task

    def restart(self) -> None:
        """The target tokens kept for uncommitted positions were dropped."""
        self._origin.clear()

    def verdict(self, epoch: int, j: int, accepted: bool | None, drafted: int) -> None:
        """Position ``j`` was committed: its draft ``accepted``, rejected, or (None) there was no
        draft (a forced commit); ``drafted`` tokens and drafts were held then."""
        task = self._origin.pop(j)
        self._outcome[task.task_id] = "rejected" if accepted is False else "accepted"
        if accepted is None:
            self.counters.forced += 1
            return
        if accepted:
            self.counters.accepted += 1
        else:
            self.counters.rejected += 1
        self._drafts[(epoch, j)] = "accepted" if accepted else "rejected"
        # A block is the drafts at the positions one target forward verified, first_position ..
        # length (vLLM's, where they are the drafts one step proposed). The last one may have
        # come after the task was sent: DSI drafts on while the target computes, and with
        # lookahead 1 each DSI task verifies only that draft. A task's verdicts come in one
        # pass, so the drafts there are now are all the block will have.
        index = j - task.first_position
        if index == 0:
            self._blocks.add(task.task_id)
        elif task.task_id not in self._blocks:
            return  # its first position was verified with another task's token: no block of its own
        block = min(task.length, drafted - 1) - task.first_position + 1
        self.counters.observe_draft(index, accepted, block)

    # ----------------------------------------------------------------- what it reports

    def task_outcomes(self, committed: Sequence[int]) -> dict[int, str]:
        """What became of every task answered so far, by task id, given the ``committed``
        tokens (prompt and output): one of :data:`dsi_mpi.metrics.TARGET_OUTCOMES`."""
        out = {}
        for task_id, task in self._answered.items():
            outcome = self._outcome.get(task_id)
            if outcome is None:  # finished but no token of it committed
                on_committed = list(task.context) == list(committed[: len(task.context)])
                outcome = "unused" if on_committed else "stale"
            out[task_id] = outcome
        return out

    def draft_outcomes(self) -> dict[tuple[int, int], str]:
        """What became of the drafts verified so far, by (epoch, position)."""
        return dict(self._drafts)
