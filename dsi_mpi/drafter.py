"""The drafter: drafts continuously and streams its tokens, never waiting for a verdict.

Messages (rank 0 is the coordinator)::

    coordinator -> START(epoch, limit, max_position, flags, seed, prompt)
    drafter     -> DRAFT(epoch, position, has_probs, [token]) [PROBS]   one per token
    coordinator -> ROLLBACK(epoch, keep, limit, forced)   keep a prefix, append the target's tokens
                 | ADVANCE(epoch, limit, start, tokens)    the committed prefix grew: draft further;
                                                           tokens: committed without a draft
                 | STOP(epoch)                             the prompt is done
                 | SHUTDOWN ;  drafter -> BYE

It drafts position ``p`` only while ``p < limit`` and ``p <= max_position`` and it has not
drafted the target's EOS; between tokens it applies every message that has arrived, so a rollback costs
at most the forward in progress.
"""

from __future__ import annotations

from dataclasses import replace

from dsi_mpi.backends.base import Backend, ContextRunner
from dsi_mpi.policy import (
    AdvanceDrafter,
    DrafterAction,
    DrafterState,
    ProtocolError,
    RollbackDrafter,
    StartDrafter,
    StopDrafter,
)
from dsi_mpi.protocol import START_RESET_CACHE, START_WANT_PROBS, Message, Tag
from dsi_mpi.transport import IDLE, Transport
from dsi_mpi.verify import SamplingParams

COORDINATOR = 0


def _action(msg: Message) -> DrafterAction:
    """The policy action a coordinator message carries."""
    if msg.kind == Tag.START:
        return StartDrafter(msg.epoch, tuple(msg.tokens.tolist()), msg.f0, msg.f1,
                            want_probs=bool(msg.f2 & START_WANT_PROBS), seed=msg.f3,
                            reset_cache=bool(msg.f2 & START_RESET_CACHE))
    if msg.kind == Tag.ROLLBACK:
        return RollbackDrafter(msg.epoch, msg.f0, tuple(msg.tokens.tolist()), msg.f1)
    if msg.kind == Tag.ADVANCE:
        return AdvanceDrafter(msg.epoch, msg.f0, msg.f1, tuple(msg.tokens.tolist()))
    if msg.kind == Tag.STOP:
        return StopDrafter(msg.epoch)
    raise ProtocolError(f"drafter got unexpected {msg.kind.name}")


def serve_drafter(transport: Transport, backend: Backend, params: SamplingParams, eos_ids: frozenset[int]) -> None:
    """Draft until SHUTDOWN; ``eos_ids`` are the target's (the drafter stops where the target
    would end, not where its own tokenizer would)."""
    runner = ContextRunner(backend)
    state = DrafterState()
    while True:
        msg = transport.poll(source=COORDINATOR)
        if msg is None and not state.can_draft():
            msg = transport.wait(source=COORDINATOR, what="a message from the coordinator", timeout_s=IDLE)
        if msg is not None:
            if msg.kind == Tag.SHUTDOWN:
                return
            state.apply(_action(msg))
            continue  # apply everything that has arrived before the next forward
        if state.reset_cache:
            runner.reset()
            state.reset_cache = False
        out = runner.run(state.seq, replace(params, seed=state.seed), want_probs=state.want_probs)
        position = state.drafted(int(out.tokens[0]), eos_ids)
        transport.send(COORDINATOR, Tag.DRAFT, state.epoch, 0, position, int(out.probs is not None),
                       tokens=[state.seq[-1]], probs=out.probs)
