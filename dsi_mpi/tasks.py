"""Verification tasks, the actions that carry messages, and the coordinator's model of the
target servers (pure).

:class:`Ids` numbers epochs and tasks for a whole job; :class:`ServerPool` knows what each
server's KV cache holds and its one outstanding task, across prompts. Both outlive a prompt;
:mod:`dsi_mpi.policy` makes the decisions that use them, as :class:`Send` actions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from dsi_mpi.protocol import Message, ProtocolError
from dsi_mpi.sequences import common_prefix

DRAFTER = -1  # the address of the drafter in an action (the runtime maps it to its rank)


class Send(NamedTuple):
    """One action of the policy: a message for a target server (its id) or for the DRAFTER."""

    to: int
    message: Message


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
