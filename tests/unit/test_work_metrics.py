"""The record metrics (docs/records.md): acceptance per position (vLLM's definition), what
became of each target forward, wasted target time and busy fractions, and the forward time the
replies carry."""

from __future__ import annotations

import random

import pytest

from dsi_mpi.metrics import TARGET_OUTCOMES, Counters, target_work
from dsi_mpi.policy import Policy
from dsi_mpi.protocol import Cancelled, Result, Verify, decode, encode
from dsi_mpi.reference import generate_si
from tests.drivers import GREEDY, RandomDriver, emulated, make_policy, sent


@pytest.mark.parametrize(
    ("blocks", "accepted", "per_block", "rates"),
    [
        # (drafts in the block, drafts accepted) per verified block
        ([(3, 3), (3, 3)], [2, 2, 2], [2, 2, 2], [1.0, 1.0, 1.0]),  # everything accepted
        ([(3, 0), (3, 0)], [], [2, 2, 2], [0.0, 0.0, 0.0]),  # first draft rejected every time
        ([(3, 1), (3, 2), (3, 3), (3, 0)], [3, 2, 1], [4, 4, 4], [0.75, 0.5, 0.25]),
        # a shorter block counts only where it held drafts (DSI sends such blocks)
        ([(1, 1), (3, 0)], [1], [2, 1, 1], [0.5, 0.0, 0.0]),
    ],
)
def test_acceptance_per_position_is_vllms(blocks: list, accepted: list, per_block: list,
                                          rates: list) -> None:
    c = Counters()
    for size, n in blocks:
        for i in range(min(n + 1, size)):
            c.observe_draft(i, i < n, size)
    assert c.blocks_verified == len(blocks)
    assert c.accepted_per_position == accepted
    assert c.blocks_per_position == per_block
    assert c.acceptance_per_position == pytest.approx(rates)
    # Entry i is the chance that a block commits more than i drafts: their sum is the mean
    # number of drafts a block commits when every block is full.
    if all(size == 3 for size, _ in blocks):
        mean_committed = sum(n for _, n in blocks) / len(blocks)
        assert sum(c.acceptance_per_position) == pytest.approx(mean_committed)


def test_si_policy_and_the_reference_count_blocks_alike() -> None:
    """The SI policy (driven in any message order) and the single-process SI decoder see the
    same blocks, so they report the same per-position counts."""
    prompt = [3, 1, 4, 1, 5]
    for lookahead in (1, 3, 5):
        reference = generate_si(emulated(), emulated(0.7), prompt, 40, lookahead, GREEDY).counters
        policy = make_policy("si", 1, lookahead, 40)
        rng = random.Random(lookahead)
        RandomDriver(policy, {0: emulated()}, emulated(0.7), GREEDY, rng).run(prompt)
        c = policy.counters
        assert reference.blocks_verified > 0
        assert c.blocks_verified == reference.blocks_verified
        assert c.accepted_per_position == reference.accepted_per_position
        assert c.blocks_per_position == reference.blocks_per_position


def test_outcomes_of_a_scripted_dsi_run() -> None:
    """The sequence of test_scripted_dsi_sequence, with what became of each task and draft."""
    policy = Policy("dsi", [10, 11], lookahead=2, run_ahead=6, max_new_tokens=8)
    prefill = sent(policy.begin([7, 8]), Verify)
    first_epoch = policy.epoch
    policy.on_draft(first_epoch, 2, 100)
    policy.on_draft(first_epoch, 3, 101)
    send = sent(policy.on_result(10, prefill[0].task_id, 2, [100]), Verify)  # d_2 accepted
    policy.on_draft(first_epoch, 4, 102)
    policy.on_draft(first_epoch, 5, 103)
    spec = sent(policy.on_result(11, prefill[1].task_id, 2, [100]), Verify)  # duplicate prefill
    out = policy.on_result(10, send[0].task_id, 3, [101, 55])  # d_3 accepted, d_4 rejected
    zero = sent(out, Verify)[0]
    policy.on_cancelled(11, spec[0].task_id)
    assert policy.task_outcomes() == {prefill[0].task_id: "accepted", prefill[1].task_id: "unused",
                                      send[0].task_id: "rejected", spec[0].task_id: "cancelled"}
    assert policy.draft_outcomes() == {(first_epoch, 2): "accepted", (first_epoch, 3): "accepted",
                                       (first_epoch, 4): "rejected"}
    # Blocks, the drafts at the positions a forward verified: the prefill's one output verified
    # d_2 (accepted), a block of one; send[0] covered positions 3 and 4 and verified d_3
    # (accepted, it held it) and d_4 (rejected; drafted after send[0] went out), a block of two.
    # The duplicate prefill's t_2 came second: it verified nothing.
    c = policy.counters
    assert (c.blocks_verified, c.blocks_per_position, c.accepted_per_position) == (2, [2, 1], [2])
    assert c.acceptance_per_position == [1.0, 0.0]
    assert (c.accepted, c.rejected) == (2, 1)
    policy.on_result(10, zero.task_id, 5, [77])
    assert policy.task_outcomes()[zero.task_id] == "accepted"  # a zero-draft task: committed
    assert policy.epochs == (first_epoch, policy.epoch)


def test_a_finished_task_built_on_a_rejected_draft_is_stale() -> None:
    policy = Policy("dsi", [10, 11, 12], lookahead=1, run_ahead=6, max_new_tokens=8)
    prefill = sent(policy.begin([7, 8]), Verify)
    epoch = policy.epoch
    zero = sent(policy.on_result(10, prefill[0].task_id, 2, [100]), Verify)  # no draft at 2: forced
    assert [(a.server, a.first_position) for a in zero] == [(10, 3)]  # the zero-draft task for 3
    assert policy.on_draft(epoch, 2, 100) == []  # late, and right
    assert policy.on_draft(epoch, 3, 200) == []  # a task for position 4 waits for a server
    task = sent(policy.on_result(11, prefill[1].task_id, 2, [100]), Verify)
    assert [(a.server, a.first_position, a.tokens) for a in task] == [(11, 4, (100, 200))]
    policy.on_result(11, task[0].task_id, 4, [201])  # t_4 comes first, built on d_3 = 200
    policy.on_result(10, zero[0].task_id, 3, [300])  # t_3 = 300: d_3 rejected
    assert policy.output == [100, 300]
    assert policy.task_outcomes() == {prefill[0].task_id: "accepted", prefill[1].task_id: "unused",
                                      zero[0].task_id: "rejected", task[0].task_id: "stale"}
    assert policy.draft_outcomes() == {(epoch, 2): "late", (epoch, 3): "rejected"}


@pytest.mark.parametrize("mode", ["dsi", "si", "nonsi"])
@pytest.mark.parametrize("acceptance", [0.3, 0.9, 1.0])
def test_outcomes_add_up_in_any_message_order(mode: str, acceptance: float) -> None:
    prompt = [3, 1, 4, 1, 5]
    for trial in range(6):
        rng = random.Random(trial)
        sp = 1 if mode != "dsi" else rng.choice([1, 2, 4])
        policy = make_policy(mode, sp, rng.choice([1, 2, 4]), 30)
        RandomDriver(policy, {s: emulated() for s in range(sp)},
                      None if mode == "nonsi" else emulated(acceptance), GREEDY, rng).run(prompt)
        c, outcomes = policy.counters, policy.task_outcomes()
        assert set(outcomes.values()) <= set(TARGET_OUTCOMES)
        assert len(outcomes) == c.verifications_sent  # every task answered, every one judged
        assert sum(o == "cancelled" for o in outcomes.values()) == c.verifications_aborted
        assert sum(o != "cancelled" for o in outcomes.values()) == c.target_forwards
        assert sum(o == "rejected" for o in outcomes.values()) == c.rejected
        assert sum(c.accepted_per_position) <= c.accepted
        pairs = zip(c.accepted_per_position, c.blocks_per_position, strict=False)
        assert all(a <= b for a, b in pairs)
        assert len(c.accepted_per_position) <= len(c.blocks_per_position)
        assert c.blocks_per_position[:1] == ([c.blocks_verified] if c.blocks_verified else [])
        assert c.accepted_per_position[:1] == [] or c.accepted_per_position[0] <= c.accepted
        if mode != "nonsi" and acceptance == 1.0:
            assert c.blocks_verified > 0
            assert c.acceptance_per_position == [1.0] * len(c.blocks_per_position)
        drafts = policy.draft_outcomes()
        assert sum(v == "accepted" for v in drafts.values()) == c.accepted
        assert sum(v == "rejected" for v in drafts.values()) == c.rejected
        if acceptance == 1.0 or mode == "nonsi":
            assert "stale" not in outcomes.values() and "rejected" not in outcomes.values()


def test_dsi_with_lookahead_1_has_blocks_of_one() -> None:
    """Each DSI task of lookahead 1 verifies the one draft at its last position, drafted while
    the target computed: blocks of one, and their acceptance is the acceptance rate."""
    prompt = [3, 1, 4, 1, 5]
    policy = make_policy("dsi", 4, 1, 40)
    servers = {s: emulated() for s in range(4)}
    RandomDriver(policy, servers, emulated(0.8), GREEDY, random.Random(3)).run(prompt)
    c = policy.counters
    assert c.blocks_verified > 10 and len(c.blocks_per_position) == 1
    assert c.accepted_per_position[0] <= c.accepted
    assert c.blocks_per_position[0] <= c.accepted + c.rejected
    assert 0.0 < c.acceptance_per_position[0] < 1.0


def test_target_work_splits_forward_time_by_outcome() -> None:
    forwards = {1: (2, 0.010), 2: (3, 0.020), 3: (2, 0.005), 4: (3, 0.001), 5: (2, 0.002)}
    outcomes = {1: "accepted", 2: "rejected", 3: "cancelled", 4: "stale", 5: "unused"}
    work = target_work(forwards, outcomes, servers=[2, 3, 4], wall_time_s=0.040)
    assert work["target_time_s"] == pytest.approx(0.038)
    assert work["target_time_by_outcome_s"] == pytest.approx(
        {"accepted": 0.010, "rejected": 0.020, "unused": 0.002, "stale": 0.001, "cancelled": 0.005})
    assert work["wasted_target_time_s"] == pytest.approx(0.006)
    assert work["target_ranks"] == [2, 3, 4]
    assert work["target_busy_fraction"] == pytest.approx([0.017 / 0.04, 0.021 / 0.04, 0.0])
    assert target_work({1: (2, 0.05)}, {1: "accepted"}, [2], 0.04)["target_busy_fraction"] == [1.0]


def test_replies_carry_their_forward_time() -> None:
    for msg in (Result(3, 7, 10, (1, 2, 3), forward_us=123456), Cancelled(3, 8, forward_us=99)):
        decoded, rows = decode(int(msg.TAG), encode(msg))
        assert decoded == msg and rows == 0

