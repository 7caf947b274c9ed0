"""The drafter: drafts continuously and streams its tokens, never waiting for a verdict.

Messages (rank 0 is the coordinator)::

    coordinator -> Start(epoch, limit, max_position, ..., prompt)
    drafter     -> Draft(epoch, position, token) [+ PROBS]     one per token
    coordinator -> Rollback(epoch, keep, limit, forced)  keep a prefix, append the target's tokens
                 | Advance(epoch, limit, start, tokens)  more is committed: draft further;
                                                         tokens: committed without a draft
                 | Stop(epoch)                           the prompt is done
                 | Shutdown ;  drafter -> Bye

Between forwards it applies every message that has arrived; a Rollback, Start, Stop or Shutdown
also preempts the forward in progress (checked between decoder layers, as targets check for
Cancel), so a rejection never waits for a stale draft. What each message does is
:class:`dsi_mpi.worker.DrafterWorker`'s.
"""

from __future__ import annotations

from dsi_mpi.backends.base import Backend
from dsi_mpi.protocol import PREEMPTS_DRAFT, Shutdown
from dsi_mpi.trace import NO_TRACE, Recorder
from dsi_mpi.transport import IDLE, Transport
from dsi_mpi.verify import SamplingParams
from dsi_mpi.worker import DrafterWorker

COORDINATOR = 0


def serve_drafter(transport: Transport, backend: Backend, params: SamplingParams,
                  eos_ids: frozenset[int], trace: Recorder = NO_TRACE) -> None:
    """Draft until Shutdown; ``eos_ids`` are the target's."""
    worker = DrafterWorker(backend, params, eos_ids)

    def preempted() -> bool:
        # A message that makes the draft in flight stale: abandon the forward (between decoder
        # layers, or sleep slices) rather than finish a draft that will be dropped. With a
        # drafter slower than half the target this is up to a whole forward per rejection.
        return transport.pending_any(COORDINATOR, PREEMPTS_DRAFT)
    while True:
        msg = transport.poll(source=COORDINATOR)
        if msg is None and not worker.can_draft():
            msg = transport.wait(source=COORDINATOR, what="a message from the coordinator",
                                 timeout_s=IDLE)
        if msg is not None:
            if isinstance(msg.message, Shutdown):
                return
            worker.apply(msg.message)
            trace.drafter_message(msg.message)
            continue  # apply everything that has arrived before the next forward
        cold, position, start = worker.cold, len(worker.seq), trace.now()
        draft = worker.step(should_cancel=preempted)
        token = None if draft is None else draft.token
        trace.drafter_forward(cold, worker.epoch, position, token, start, trace.now())
        if draft is not None:
            transport.send(COORDINATOR, draft)
