"""DSI keeps its drafts with a slow drafter (docs/design.md, "Forced commits").

Counter-based, never timed: with a drafter at 65% of the target's latency the committed tokens
must come from accepted drafts, not from the target alone (the collapse into non-SI). Why the
old policy collapsed is the simulator's to show (``tests/unit/test_simulate.py``).
"""

from __future__ import annotations

import pytest
from mpi4py import MPI

from dsi_mpi.config import RunConfig
from tests.harness import TIMEOUT_S, agree, run_on

RANK = MPI.COMM_WORLD.Get_rank()


@pytest.mark.mpi(min_size=5)
def test_a_slow_drafter_keeps_its_drafts() -> None:
    """Drafter TPOT 65% of the target's, acceptance 0.95, lookahead 1 (Eq. 1 needs 2 of the 3
    servers): at least 80% of the committed tokens must be accepted drafts. Before the fix
    the same run committed about 90% of its tokens as target-only (forced) tokens."""
    target = "emulated:tpot_ms=30,ttft_ms=39"
    drafter = "emulated:tpot_ms=19.5,ttft_ms=24,acceptance=0.95"
    config = RunConfig(target=target, drafter=drafter, mode="dsi", lookahead=1, sp=3,
                       max_new_tokens=40, timeout_s=TIMEOUT_S)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 8, 7, 6, 5]]
    records, error, pending = run_on(5, [config], prompts)
    ok, message = error is None and pending == 0, error or f"{pending} requests left open"
    if ok and RANK == 0:
        accepted = sum(r["accepted"] for r in records)
        committed = sum(r["num_new_tokens"] for r in records)
        detail = [(r["accepted"], r["rejected"], r["forced"], r["drafts_late"]) for r in records]
        if accepted < 0.8 * committed:
            ok, message = False, f"{accepted} of {committed} tokens were accepted drafts: {detail}"
    agree(ok, message)
