"""The coordinator policy under scripted and randomised event orders, without MPI.

``RandomDriver`` (``tests/drivers.py``) delivers every message after an arbitrary delay, in
the order a random generator picks (per-channel FIFO, as MPI guarantees between two ranks),
lets servers either finish or abandon a cancelled task; the tests check the output against
the target's own decoding.
"""

from __future__ import annotations

import random

import pytest

from dsi_mpi.backends import load_backend
from dsi_mpi.policy import DRAFTER, Policy, ProtocolError
from dsi_mpi.protocol import Advance, Cancel, Rollback, Start, Verify
from dsi_mpi.reference import generate_nonsi
from dsi_mpi.worker import DrafterWorker
from tests.drivers import GREEDY, RandomDriver, emulated, make_policy, sent


@pytest.mark.parametrize("mode", ["dsi", "si", "nonsi"])
@pytest.mark.parametrize("acceptance", [0.0, 0.5, 0.9, 1.0])
def test_random_interleavings_are_lossless(mode: str, acceptance: float) -> None:
    prompt = [3, 1, 4, 1, 5]
    expected = generate_nonsi(emulated(), prompt, 40, GREEDY).tokens
    for trial in range(12):
        rng = random.Random(trial)
        sp = 1 if mode != "dsi" else rng.choice([1, 2, 3, 5])
        lookahead = rng.choice([1, 2, 3, 5, 8])
        # dsi: tasks of no drafts or at least min_drafts (a CPU's cost step; 1: any number)
        min_drafts = rng.randint(1, lookahead) if mode == "dsi" else 1
        policy = make_policy(mode, sp, lookahead, 40, reuse_cache=trial % 2 == 0,
                             min_drafts=min_drafts)
        driver = RandomDriver(policy, {s: emulated() for s in range(sp)},
                               None if mode == "nonsi" else emulated(acceptance), GREEDY, rng)
        assert driver.run(prompt) == expected, (trial, sp, lookahead, min_drafts)
        c = policy.counters
        assert c.accepted + c.rejected + c.forced == len(expected)
        assert c.verifications_aborted <= c.verifications_cancelled <= c.verifications_sent
        # A second prompt on the same servers reuses their caches and stays exact.
        prompt2 = prompt[:3] + [9, 9]
        assert driver.run(prompt2) == generate_nonsi(emulated(), prompt2, 40, GREEDY).tokens


def test_rejections_preempt_outstanding_tasks() -> None:
    policy = make_policy("dsi", 4, 2, 60)
    driver = RandomDriver(policy, {s: emulated() for s in range(4)}, emulated(0.6), GREEDY,
                           random.Random(5))
    driver.run([1, 2, 3])
    assert policy.counters.rejected > 0
    assert policy.counters.verifications_cancelled > 0


def test_eos_stops_generation(tiny_suite: dict[str, str]) -> None:
    from transformers import AutoTokenizer

    from dsi_mpi.tiny import EOS_PROBE_PROMPT

    target = load_backend(tiny_suite["llama"], dtype="float64")
    ids = AutoTokenizer.from_pretrained(tiny_suite["llama"])(EOS_PROBE_PROMPT)["input_ids"]
    expected = generate_nonsi(target, ids, 30, GREEDY).tokens
    assert expected[-1] in target.eos_token_ids and len(expected) < 30
    for kind in ("identical", "perturbed"):
        policy = make_policy("dsi", 2, 3, 30, target.eos_token_ids)
        targets = {s: load_backend(tiny_suite["llama"], dtype="float64") for s in range(2)}
        drafter = load_backend(tiny_suite[f"llama/{kind}"], dtype="float64")
        driver = RandomDriver(policy, targets, drafter, GREEDY, random.Random(1))
        assert driver.run(ids) == expected


def test_scripted_dsi_sequence() -> None:
    """Step by step: prefill everywhere, a task per lookahead drafts, a rejection preempts."""
    policy = Policy("dsi", [10, 11], lookahead=2, run_ahead=6, max_new_tokens=8)
    actions = policy.begin([7, 8])
    assert actions[0].to == DRAFTER and isinstance(actions[0].message, Start)
    assert actions[0].message.limit == 8
    prefill = sent(actions, Verify)
    assert [(a.server, a.keep, a.tokens, a.first_position) for a in prefill] == [
        (10, 0, (7, 8), 2), (11, 0, (7, 8), 2)]
    assert policy.on_draft(policy.epoch, 2, 100) == []
    queued = policy.on_draft(policy.epoch, 3, 101)  # two drafts: a task is created and queued
    assert queued == []  # both servers are busy with the prefill
    epoch = policy.epoch
    out = policy.on_result(10, prefill[0].task_id, 2, [100])  # t_2 == d_2: accepted
    assert policy.output == [100]
    send = sent(out, Verify)
    # The server holds [7, 8]: it keeps both and appends only the two drafts.
    assert [(a.server, a.keep, a.tokens, a.first_position) for a in send] == [
        (10, 2, (100, 101), 3)]
    assert policy.on_draft(epoch, 4, 102) == []
    assert policy.on_draft(epoch, 5, 103) == []  # a task for positions 5..6, queued
    out = policy.on_result(11, prefill[1].task_id, 2, [100])  # a duplicate frees server 11
    spec = sent(out, Verify)
    assert [(a.server, a.keep, a.tokens, a.first_position) for a in spec] == [
        (11, 2, (100, 101, 102, 103), 5)]
    out = policy.on_result(10, send[0].task_id, 3, [101, 55])  # d_3 ok, t_4 = 55 != d_4
    assert policy.output == [100, 101, 55]
    assert policy.counters.accepted == 2 and policy.counters.rejected == 1
    assert any(a.keep == 4 and a.forced == (55,) for a in sent(out, Rollback))
    assert [(a.server, a.task_id) for a in sent(out, Cancel)] == [(11, spec[0].task_id)]
    zero = sent(out, Verify)
    assert [(a.server, a.first_position, a.tokens) for a in zero] == [
        (10, 5, (55,))]  # zero-draft task
    assert policy.epoch == epoch + 1
    assert policy.on_draft(epoch, 6, 999) == []  # a stale draft is dropped
    policy.on_cancelled(11, spec[0].task_id)
    assert policy.counters.verifications_aborted == 1


@pytest.mark.parametrize("min_drafts", [1, 2])
def test_too_few_drafts_make_a_zero_draft_task(min_drafts: int) -> None:
    """With min_drafts 2, the next position's verifier carries no draft rather than one (a
    forward of two tokens costing 2.3x one, as on a CPU, is not worth one draft), and the
    task that gets the server later still takes every draft there is."""
    policy = Policy("dsi", [10], lookahead=3, run_ahead=8, max_new_tokens=8,
                    min_drafts=min_drafts)
    prefill = sent(policy.begin([7, 8]), Verify)
    epoch = policy.epoch
    assert policy.on_draft(epoch, 2, 100) == [] and policy.on_draft(epoch, 3, 101) == []
    out = sent(policy.on_result(10, prefill[0].task_id, 2, [100]), Verify)  # d_2 accepted
    assert policy.output == [100]
    # position 3 has no verifier; one draft (101) is there
    drafts = (100,) if min_drafts == 2 else (100, 101)
    assert [(a.server, a.keep, a.tokens, a.first_position) for a in out] == [(10, 2, drafts, 3)]
    later = policy.on_draft(epoch, 4, 102) + policy.on_draft(epoch, 5, 103)
    later += policy.on_draft(epoch, 6, 104)
    assert later == []  # the one server is busy: what is drafted now waits for it
    out = sent(policy.on_result(10, out[0].task_id, 3, [101] if min_drafts == 2 else [101, 102]),
               Verify)
    # the task that gets the server covers every draft there is
    assert out[0].tokens[-1] == 104 and out[0].first_position == 4 + (min_drafts == 1)
    assert policy.output == [100, 101] + [102] * (min_drafts == 1)


def test_min_drafts_is_between_1_and_the_lookahead() -> None:
    for bad in (0, 4):
        with pytest.raises(ValueError, match="min_drafts must be in 1..lookahead"):
            Policy("dsi", [10], lookahead=3, run_ahead=8, max_new_tokens=8, min_drafts=bad)


def test_a_restart_lets_committed_prefills_finish() -> None:
    """A task whose whole context is committed is not cancelled: it only warms a cache."""
    policy = Policy("dsi", [10, 11], lookahead=2, run_ahead=6, max_new_tokens=8)
    prefill = sent(policy.begin([7, 8]), Verify)
    policy.on_draft(policy.epoch, 2, 100)
    out = policy.on_result(10, prefill[0].task_id, 2, [55])  # d_2 rejected at once
    assert policy.output == [55]
    assert not sent(out, Cancel)  # server 11's prefill runs on
    epoch = policy.epoch
    policy.on_result(11, prefill[1].task_id, 2, [55])  # stale, but server 11 is warm
    out = policy.on_draft(epoch, 3, 101)
    out += policy.on_draft(epoch, 4, 102)
    # Server 11 holds the prompt, so the task sent to it keeps both prompt tokens.
    to_11 = [(a.keep, a.tokens, a.first_position) for a in sent(out, Verify) if a.server == 11]
    assert to_11 == [(2, (55, 101, 102), 4)]


def test_a_forced_commit_leaves_the_drafter_alone() -> None:
    """The forced-commit race (docs/design.md, "Forced commits"), step by step: the target's
    token for position 2 arrives before the drafter's draft for it. The policy once rolled the
    drafter back here, throwing away the forward in flight each time; a drafter slower than
    about half the target then never got its lead back. Now the token is committed, the
    drafter is only told it, and its late draft (right) and the drafts after it are used."""
    policy = Policy("dsi", [10, 11], lookahead=1, run_ahead=6, max_new_tokens=8)
    prefill = sent(policy.begin([7, 8]), Verify)
    epoch = policy.epoch
    out = policy.on_result(10, prefill[0].task_id, 2, [100])  # no draft yet: forced
    assert policy.output == [100] and policy.epoch == epoch
    assert not sent(out, Rollback) + sent(out, Cancel)
    advance = sent(out, Advance)
    assert [(a.start, a.tokens, a.limit) for a in advance] == [(2, (100,), 9)]
    zero = sent(out, Verify)
    assert [(a.server, a.keep, a.tokens, a.first_position) for a in zero] == [(10, 2, (100,), 3)]
    assert policy.on_draft(epoch, 2, 100) == []  # late but right: nothing to undo
    assert policy.counters.drafts_late == 1
    assert policy.on_result(11, prefill[1].task_id, 2, [100]) == []  # frees server 11
    out = policy.on_draft(epoch, 3, 101)  # a draft built on it is used at once
    assert [(a.server, a.keep, a.tokens, a.first_position) for a in sent(out, Verify)] == [
        (11, 2, (100, 101), 4)]
    out = policy.on_result(10, zero[0].task_id, 3, [101])  # and accepted
    assert policy.output == [100, 101]
    assert policy.counters.accepted == 1 and policy.counters.forced == 1


def test_a_wrong_late_draft_rolls_the_drafter_back_to_the_committed_tokens() -> None:
    policy = Policy("dsi", [10, 11], lookahead=1, run_ahead=6, max_new_tokens=8)
    prefill = sent(policy.begin([7, 8]), Verify)
    epoch = policy.epoch
    out = policy.on_result(10, prefill[0].task_id, 2, [100])  # forced at 2
    zero = sent(out, Verify)[0]
    out = policy.on_result(11, prefill[1].task_id, 2, [100])  # a duplicate: ignored
    assert policy.output == [100]
    out = policy.on_draft(epoch, 2, 55)  # the drafter guessed 55 where 100 is committed
    assert policy.epoch == epoch + 1
    assert [(a.keep, a.forced) for a in sent(out, Rollback)] == [(2, (100,))]
    # The zero-draft task for position 3 is built on committed tokens only: it runs on.
    assert not sent(out, Cancel) + sent(out, Verify)
    assert policy.on_draft(epoch, 3, 56) == []  # built on 55: stale
    policy.on_result(10, zero.task_id, 3, [101])  # still counts
    assert policy.output == [100, 101]
    with pytest.raises(ProtocolError):
        policy.on_draft(policy.epoch, 7, 1)  # positions come in order


def test_si_bonus_token_rides_on_the_advance() -> None:
    """SI: after a fully accepted block the bonus token is sent with the new limit, so the
    drafter drafts the next block without drafting the bonus position."""
    policy = Policy("si", [10], lookahead=2, run_ahead=2, max_new_tokens=8)
    policy.begin([7, 8])
    epoch = policy.epoch
    assert policy.on_draft(epoch, 2, 100) == []
    task = sent(policy.on_draft(epoch, 3, 101), Verify)[0]
    out = policy.on_result(10, task.task_id, 2, [100, 101, 102])
    assert policy.output == [100, 101, 102]
    assert [(a.start, a.tokens, a.limit) for a in sent(out, Advance)] == [(4, (102,), 7)]


def test_drafter_learns_committed_tokens() -> None:
    d = DrafterWorker(emulated(0.5))
    d.apply(Start(1, limit=10, max_position=20, want_probs=False, seed=0, reset_cache=True,
                  prompt=(7, 8)))
    d.seq.append(100)  # as if drafted
    d.apply(Advance(1, 10, start=2, tokens=(100, 101)))  # agrees, and one more
    assert d.seq == [7, 8, 100, 101]
    d.apply(Advance(1, 12, start=4, tokens=(102,)))  # not drafted yet: skipped
    assert d.seq == [7, 8, 100, 101, 102] and d.limit == 12
    d.seq.append(50)
    d.apply(Advance(1, 12, start=5, tokens=(103, 104)))  # our draft 50 is wrong
    assert d.seq == [7, 8, 100, 101, 102, 50] and d.diverged
    d.apply(Advance(1, 13, start=7, tokens=(105,)))  # ignored until the rollback
    assert d.seq == [7, 8, 100, 101, 102, 50] and d.limit == 13
    d.apply(Rollback(2, 5, limit=14, forced=(103, 104)))
    assert d.seq == [7, 8, 100, 101, 102, 103, 104] and not d.diverged
    draft = d.step()  # the next forward drafts position 7 in the new epoch
    assert (draft.epoch, draft.position) == (2, 7) and d.seq[-1] == draft.token
    with pytest.raises(ProtocolError):
        d.apply(Advance(2, 14, start=10, tokens=(1,)))  # a gap: cannot happen


def test_common_prefix() -> None:
    from dsi_mpi.sequences import common_prefix

    assert common_prefix([1, 2, 3], (1, 2, 3, 4)) == 3
    assert common_prefix([], [1]) == 0
    assert common_prefix([5, 2], [1, 2]) == 0
    for n in range(1, 40):
        a = list(range(n))
        for i in range(n):
            b = a[:i] + [-1] + a[i + 1:]
            assert common_prefix(a, b) == i
