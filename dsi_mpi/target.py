"""A target server: verifies tasks on its own KV cache, abandons them when cancelled.

Messages (rank 0 is the coordinator)::

    coordinator -> VERIFY(epoch, task, keep, first_position, want_probs, seed, tokens)
    target      -> RESULT(epoch, task, first_position, has_probs, tokens) [PROBS]
                 | CANCELLED(epoch, task)              exactly one reply per VERIFY
    coordinator -> CANCEL(epoch, task)                 may arrive before, during or after it
    coordinator -> SHUTDOWN ;  target -> BYE

Before each forward and between decoder layers the server probes for a CANCEL of the task
it is running; an abandoned forward is rolled back to ``keep`` positions, which is what the
coordinator then assumes the cache holds.
"""

from __future__ import annotations

from dataclasses import replace

from dsi_mpi.backends.base import Backend, Cancelled, ContextRunner
from dsi_mpi.policy import ProtocolError
from dsi_mpi.protocol import Tag
from dsi_mpi.transport import IDLE, Transport
from dsi_mpi.verify import SamplingParams

COORDINATOR = 0


def serve_target(transport: Transport, backend: Backend, params: SamplingParams) -> None:
    runner = ContextRunner(backend)
    current = -1

    def should_cancel() -> bool:
        # A CANCEL names the running task or an older one already answered (sent before our
        # reply reached the coordinator): never a later one, since the coordinator sends a
        # VERIFY only to a server with no request outstanding.
        while (msg := transport.poll(source=COORDINATOR, tag=Tag.CANCEL)) is not None:
            if msg.ident == current:
                return True
        return False

    while True:
        msg = transport.wait(source=COORDINATOR, what="a request from the coordinator", timeout_s=IDLE)
        if msg.kind == Tag.SHUTDOWN:
            return
        if msg.kind == Tag.CANCEL:
            continue  # for a task already answered
        if msg.kind != Tag.VERIFY:
            raise ProtocolError(f"target got unexpected {msg.kind.name}")
        current, keep, first = msg.ident, msg.f0, msg.f1
        if len(runner.tokens) < keep:
            raise ProtocolError(f"task {current}: keep {keep} but the cache holds {len(runner.tokens)}")
        tokens = msg.tokens.tolist()
        try:
            out = runner.extend(keep, tokens, replace(params, seed=msg.f3), num_outputs=keep + len(tokens) - first + 1,
                                want_probs=bool(msg.f2), should_cancel=should_cancel)
        except Cancelled:
            transport.send(COORDINATOR, Tag.CANCELLED, msg.epoch, current)
            continue
        transport.send(COORDINATOR, Tag.RESULT, msg.epoch, current, out.first_position,
                       int(out.probs is not None), tokens=out.tokens.tolist(), probs=out.probs)
