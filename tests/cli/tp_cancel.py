"""Run by ``test_tp.py`` under ``mpiexec -n 2``: one target server of two ranks (tensor
parallelism over gloo), driven step by step as its leader and follower are in a run, with a
CANCEL that lands between two decoder layers of a forward.

Usage: ``python -m mpi4py tests/cli/tp_cancel.py MODEL_DIR``. Exits 0 when every check holds on
both ranks, else prints the failure and exits 1.
"""

from __future__ import annotations

import sys

import torch
from mpi4py import MPI

from dsi_mpi.backends.hf import HFBackend
from dsi_mpi.protocol import Cancelled, Result, Verify
from dsi_mpi.roles import Layout
from dsi_mpi.servergroup import ServerGroup
from dsi_mpi.worker import TargetWorker

PROMPT = (5, 17, 42, 8, 99, 3)
CANCEL_AT_CHECK = 3  # the leader's 3rd gate point: before layer 1 (1st: before the forward)


def reference(path: str, steps: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    with torch.inference_mode():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=steps, do_sample=False,
                             pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


def layer_lengths(backend: HFBackend) -> list[int]:
    return [int(layer.get_seq_length()) for layer in backend.cache.layers]


def main(path: str) -> int:
    world = MPI.COMM_WORLD
    comm = world.Dup()
    layout = Layout(world_size=2, drafters=(), targets=(0,), target_ranks=2)
    group = ServerGroup(comm, layout, world.Get_rank(), timeout_s=60.0)
    group.start_torch("cpu")
    backend = HFBackend(path, dtype="float64", device="cpu", tp_size=2)
    group.loaded(backend)
    worker = TargetWorker(backend)
    ref = world.bcast(reference(path, 5) if group.is_leader else None, root=0)
    p = len(PROMPT)
    steps = [
        Verify(0, 0, keep=0, first_position=p, tokens=PROMPT),  # prefill: ref[0]
        # ref[0..2] and a wrong token, cancelled between layers 0 and 1
        Verify(0, 1, keep=p, first_position=p + 1, tokens=(ref[0], ref[1], ref[2], 7)),
        Verify(0, 2, keep=p, first_position=p + 1, tokens=(ref[0], ref[1], ref[2])),
    ]
    failures = []
    for index, step in enumerate(steps):
        if group.is_leader:
            checks = 0

            def cancel_mid_forward(index: int = index) -> bool:
                nonlocal checks
                checks += 1
                return index == 1 and checks == CANCEL_AT_CHECK

            group.announce(step)
            with group.collectives():
                reply = worker.verify(step, lambda: group.agree(cancel_mid_forward()))
        else:
            received = group.next_step(None)
            if received != step:
                failures.append(f"the follower got {received}, not {step}")
            group.follow(worker, received)
        lengths = world.allgather(layer_lengths(backend))
        if lengths[0] != lengths[1]:
            failures.append(f"step {index}: per-layer cache lengths differ: {lengths}")
        want = p if index < 2 else p + 3
        if lengths[world.Get_rank()] != [want] * len(lengths[0]):
            failures.append(f"step {index}: cache {lengths[world.Get_rank()]}, want {want}")
        if group.is_leader:
            if index == 1 and not isinstance(reply, Cancelled):
                failures.append(f"the cancelled step answered {reply}")
            if index == 0 and (not isinstance(reply, Result) or list(reply.tokens) != ref[:1]):
                failures.append(f"the prefill gave {reply}, want {ref[:1]}")
            if index == 2 and (not isinstance(reply, Result) or list(reply.tokens) != ref[1:4]):
                failures.append(f"after the cancel: {reply}, want {ref[1:4]}")
    agreements = world.allgather(group.agreements)
    if agreements[0] != agreements[1]:
        failures.append(f"gate points agreed on: {agreements}")
    if group.is_leader:
        group.release()
    group.close()
    everyone = [f for part in world.allgather(failures) for f in part]
    if world.Get_rank() == 0:
        print("\n".join(everyone) if everyone else f"ok: {agreements[0]} agreements", flush=True)
    return 1 if everyone else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
