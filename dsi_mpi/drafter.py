"""The drafter: drafts continuously and streams its tokens, never waiting for a verdict.

Messages (rank 0 is the coordinator)::

    coordinator -> START(epoch, limit, max_position, flags, seed, prompt)
    drafter     -> DRAFT(epoch, position, has_probs, [token]) [PROBS]   one per token
    coordinator -> ROLLBACK(epoch, keep, limit, forced)   keep a prefix, append the target's tokens
                 | ADVANCE(epoch, limit)                   the committed prefix grew: draft further
                 | STOP(epoch)                             the prompt is done
                 | SHUTDOWN ;  drafter -> BYE

It drafts position ``p`` only while ``p < limit`` and ``p <= max_position`` and it has not
drafted EOS; between tokens it applies every message that has arrived, so a rollback costs
at most the forward in progress.
"""

from __future__ import annotations

from dataclasses import replace

from dsi_mpi.backends.base import Backend, ContextRunner
from dsi_mpi.policy import ProtocolError
from dsi_mpi.protocol import START_RESET_CACHE, START_WANT_PROBS, Message, Tag
from dsi_mpi.transport import IDLE, Transport
from dsi_mpi.verify import SamplingParams

COORDINATOR = 0


class _DrafterState:
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
        self.shutdown = False

    def apply(self, msg: Message) -> None:
        if msg.kind == Tag.SHUTDOWN:
            self.shutdown = True
            return
        if msg.kind == Tag.START:
            self.seq = msg.tokens.tolist()
            self.limit, self.max_position, self.seed = msg.f0, msg.f1, msg.f3
            self.want_probs = bool(msg.f2 & START_WANT_PROBS)
            self.reset_cache = bool(msg.f2 & START_RESET_CACHE)
            self.active, self.eos = True, False
        elif msg.kind == Tag.ROLLBACK:
            if len(self.seq) < msg.f0:
                raise ProtocolError(f"rollback to {msg.f0} but the drafter holds {len(self.seq)} tokens")
            self.seq = self.seq[: msg.f0] + msg.tokens.tolist()
            self.limit, self.eos = msg.f1, False
        elif msg.kind == Tag.ADVANCE:
            self.limit = max(self.limit, msg.f0)
        elif msg.kind == Tag.STOP:
            self.active = False
        else:
            raise ProtocolError(f"drafter got unexpected {msg.kind.name}")
        self.epoch = msg.epoch

    def can_draft(self) -> bool:
        n = len(self.seq)
        return self.active and not self.eos and n < self.limit and n <= self.max_position


def serve_drafter(transport: Transport, backend: Backend, params: SamplingParams) -> None:
    runner = ContextRunner(backend)
    state = _DrafterState()
    while not state.shutdown:
        while (msg := transport.poll(source=COORDINATOR)) is not None:
            state.apply(msg)
        if state.shutdown:
            return
        if not state.can_draft():
            state.apply(transport.wait(source=COORDINATOR, what="a message from the coordinator", timeout_s=IDLE))
            continue
        if state.reset_cache:
            runner.reset()
            state.reset_cache = False
        out = runner.run(state.seq, replace(params, seed=state.seed), want_probs=state.want_probs)
        token = int(out.tokens[0])
        position = len(state.seq)
        state.seq.append(token)
        state.eos = token in backend.eos_token_ids
        transport.send(COORDINATOR, Tag.DRAFT, state.epoch, 0, position, int(out.probs is not None),
                       tokens=[token], probs=out.probs)
