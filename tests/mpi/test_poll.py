"""Both ways of waiting (--poll spin and backoff): exact output, deadlines and errors kept."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from mpi4py import MPI

from dsi_mpi.config import RunConfig
from dsi_mpi.transport import RemoteError, Transport, WaitTimeout
from dsi_mpi.verify import SamplingParams
from tests.harness import TIMEOUT_S, agree, run_on

RANK = MPI.COMM_WORLD.Get_rank()
MAX_NEW = 24


@pytest.mark.mpi(min_size=5)
@pytest.mark.parametrize("poll", ["spin", "backoff"])
def test_every_poll_strategy_gives_the_target_output(poll: str) -> None:
    """Frequent rejections (acceptance 0.5), so cancels interrupt emulated forwards in flight."""
    target = "emulated:tpot_ms=1,ttft_ms=2,vocab=1000"
    drafter = "emulated:tpot_ms=0.2,ttft_ms=0.4,acceptance=0.5,vocab=1000"
    base = RunConfig(target=target, drafter=drafter, mode="nonsi", max_new_tokens=MAX_NEW,
                     poll=poll, timeout_s=TIMEOUT_S)
    configs = [base, replace(base, mode="si", lookahead=3),
               replace(base, mode="dsi", lookahead=1, sp=3),
               replace(base, mode="dsi", lookahead=3, sp=3)]
    prompts = [[1, 2, 3], [9, 8, 7, 6]]
    records, error, pending = run_on(5, configs, prompts)
    ok, message = error is None and pending == 0, error or f"{pending} requests left open"
    if ok and RANK == 0:
        from dsi_mpi.backends import load_backend
        from dsi_mpi.reference import generate_nonsi

        reference = [generate_nonsi(load_backend(target, sleep=False), p, MAX_NEW,
                                    SamplingParams()).tokens for p in prompts]
        for r in records:
            if r["tokens"] != reference[r["prompt_index"]]:
                ok, message = False, (f"{poll}: {r['mode']} k={r['lookahead']} "
                                      f"differs from the target: {r}")
                break
        if ok and sum(r["verifications_aborted"] for r in records if r["mode"] == "dsi") == 0:
            ok, message = False, f"{poll}: no forward in flight was abandoned"
    agree(ok, message)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("poll", ["spin", "backoff"])
def test_a_wait_keeps_its_deadline_and_raises_errors(poll: str) -> None:
    """Each rank alone (COMM_SELF): a wait with nothing coming times out on time, and a wait
    that finds an ERROR raises it, whichever way it waits."""
    ok, message = True, ""
    transport = Transport(MPI.COMM_SELF, timeout_s=5.0, poll=poll)
    try:
        if transport.poll_mode != poll:
            ok, message = False, f"rank {RANK}: asked for {poll}, got {transport.poll_mode}"
        started = time.monotonic()
        try:
            transport.wait(what="nothing", timeout_s=0.05)
            ok, message = False, f"rank {RANK} {poll}: a wait with nothing to receive returned"
        except WaitTimeout as exc:
            waited = time.monotonic() - started
            if not 0.05 <= waited < 2.0 or "nothing" not in str(exc):
                ok, message = False, f"rank {RANK} {poll}: timed out after {waited:.3f} s: {exc}"
        transport.send_error(0, "rank 0 (target) failed: boom")
        try:
            transport.wait(what="a reply")
            ok, message = False, f"rank {RANK} {poll}: the ERROR was not raised"
        except RemoteError as exc:
            if "boom" not in str(exc):
                ok, message = False, f"rank {RANK} {poll}: wrong error text {exc}"
    finally:
        left = transport.close()
    agree(ok and left == 0, message or f"rank {RANK}: {left} requests left open")
