"""A target server: verifies tasks on its own KV cache, abandons them when cancelled.

Messages (rank 0 is the coordinator)::

    coordinator -> Verify(epoch, task, keep, first_position, tokens, want_probs, seed)
    target      -> Result(epoch, task, first_position, tokens, forward_us) [+ PROBS]
                 | Cancelled(epoch, task, forward_us)  exactly one reply per Verify
    coordinator -> Cancel(epoch, task)                 may arrive before, during or after it
    coordinator -> Shutdown ;  target -> Bye

Before each forward and between decoder layers the server probes for a Cancel of the task it
is running; an abandoned forward is rolled back to ``keep`` positions, which is what the
coordinator then assumes the cache holds (:class:`dsi_mpi.worker.TargetWorker`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

from dsi_mpi.backends.base import Backend
from dsi_mpi.protocol import Cancel, ProtocolError, Shutdown, Tag, Verify
from dsi_mpi.trace import NO_TRACE, Recorder
from dsi_mpi.transport import IDLE, Transport
from dsi_mpi.verify import SamplingParams
from dsi_mpi.worker import TargetWorker

if TYPE_CHECKING:
    from dsi_mpi.servergroup import ServerGroup

COORDINATOR = 0
ENDS_TASK = (Tag.SHUTDOWN,)  # a run that ends early does not wait for the forward in flight


def serve_target(transport: Transport, backend: Backend, params: SamplingParams,
                 trace: Recorder = NO_TRACE, group: ServerGroup | None = None) -> None:
    """Serve until Shutdown; ``group``: this rank leads a server of several ranks, whose
    followers run every step with it and stop when it stops (``servergroup.py``)."""
    try:
        _serve(transport, TargetWorker(backend, params), trace, group)
    finally:
        if group is not None:
            group.release()


def _serve(transport: Transport, worker: TargetWorker, trace: Recorder,
           group: ServerGroup | None) -> None:
    current = -1

    def should_cancel() -> bool:
        # A Cancel names the running task or an older one already answered (sent before our
        # reply reached the coordinator): never a later one, since the coordinator sends a
        # Verify only to a server with no request outstanding.
        while (msg := transport.poll(source=COORDINATOR, tag=Tag.CANCEL)) is not None:
            cancel = msg.message
            assert isinstance(cancel, Cancel)  # polled by its tag
            trace.target_cancel(cancel, late=cancel.task_id != current)
            if cancel.task_id == current:
                return True
        return transport.pending_any(COORDINATOR, ENDS_TASK)  # the job ends: drop the task

    def agreed() -> bool:  # every rank of the server stops at the same gate point
        assert group is not None  # used by a server of several ranks only
        return group.agree(should_cancel())

    while True:
        msg = transport.wait(source=COORDINATOR, what="a request from the coordinator",
                             timeout_s=IDLE).message
        if isinstance(msg, Shutdown):
            return
        if isinstance(msg, Cancel):
            trace.target_cancel(msg, late=True)
            continue  # for a task already answered
        if not isinstance(msg, Verify):
            raise ProtocolError(f"target got unexpected {type(msg).__name__}")
        current = msg.task_id
        start = time.perf_counter()
        if group is None:
            reply = worker.verify(msg, should_cancel)
        else:
            group.announce(msg)
            with group.collectives():
                reply = worker.verify(msg, agreed)
            group.check_cache(worker.runner.backend.cached_length())
        end = time.perf_counter()
        trace.target_forward(msg, reply, start, end)
        transport.send(COORDINATOR, replace(reply, forward_us=round((end - start) * 1e6)))
