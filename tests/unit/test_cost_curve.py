"""The cost curve: emulated forwards priced by their length, the profile that measures the curve
and the shared latencies, and the simulator and planner that use them."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

from dsi_mpi.backends import load_backend
from dsi_mpi.backends.emulated import EmulatedSpec, block_cost, parse_block_ms
from dsi_mpi.costcurve import Background, InProcess
from dsi_mpi.plan import from_profile, make_plan
from dsi_mpi.profile import GREEDY, measure
from dsi_mpi.simulate import Latencies, simulate

CURVE = "emulated:tpot_ms=4,ttft_ms=10,block_ms=2:12/4:16,vocab=100"


def test_block_ms_grammar_and_interpolation() -> None:
    spec = EmulatedSpec.parse(CURVE)
    assert spec.block_ms == ((2, 12.0), (4, 16.0))
    # 1 token: TPOT; listed lengths exact; between them linear; beyond the last flat
    assert [block_cost(4.0, spec.block_ms, n) for n in (1, 2, 3, 4, 9)] == [4, 12, 14, 16, 16]
    assert spec.forward_ms(0, 7) == 10  # the prompt's forward: TTFT, whatever its length
    assert spec.forward_ms(5, 3) == 14
    assert EmulatedSpec.parse("emulated:tpot_ms=4").forward_ms(5, 6) == 4  # no curve: flat
    with pytest.raises(ValueError, match="not LENGTH:MS"):
        parse_block_ms("2=12")
    with pytest.raises(ValueError, match="ascending"):
        parse_block_ms("4:12/2:16")
    with pytest.raises(ValueError, match=">= 2"):
        EmulatedSpec.parse("emulated:tpot_ms=4,block_ms=1:4/2:9")


def test_an_emulated_block_lasts_its_listed_cost() -> None:
    backend = load_backend(CURVE)
    backend.forward([1, 2, 3], GREEDY)  # the prompt
    for tokens, ms in (([4], 4.0), ([5, 6], 12.0), ([7, 8, 9], 14.0)):
        started = time.perf_counter()
        backend.forward(tokens, GREEDY)
        elapsed = (time.perf_counter() - started) * 1e3
        assert ms <= elapsed < ms * 1.5


def test_profile_measures_the_emulated_curve_and_ttft_against_prompt_length() -> None:
    # costs long enough that a loaded machine's scheduling delays stay within the tolerance
    target = load_backend("emulated:tpot_ms=20,ttft_ms=50,block_ms=2:60/4:80,vocab=100")
    drafter = load_backend("emulated:tpot_ms=5,acceptance=0.8,block_ms=2:10,vocab=100")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    result = measure(target, drafter, prompts, max_new_tokens=8, lookahead=3, warmup=0,
                     shared=True)

    def near(measured: float, ms: float) -> bool:
        return ms <= measured < ms * 1.25

    # forwards of up to 2k + 1 = 7 tokens: DSI at SP 1 sends every draft of its run-ahead
    curve = dict(result["target"]["block_ms"])
    assert sorted(curve) == [2, 3, 4, 5, 6, 7]
    for n, ms in ((2, 60.0), (3, 70.0), (4, 80.0), (7, 80.0)):
        assert near(curve[n], ms), (n, curve[n])
    for entry in result["per_prompt"]:
        assert len(entry["target_curve_ms"]) == 7 and near(entry["target_curve_ms"][0], 20.0)
    # the drafter's forwards of 1 .. k + 1 tokens (a draft after tokens it lacks)
    drafter_curve = dict(result["drafter"]["block_ms"])
    assert sorted(drafter_curve) == [2, 3, 4] and near(drafter_curve[3], 10.0)
    assert [n for n, _ in result["shared"]["drafter"]["block_ms"]] == [2, 3, 4]
    fit = result["ttft_vs_prompt"]["target"]  # emulated TTFT does not grow with the prompt
    assert abs(fit["per_token_ms"]) < 3.0
    assert near(fit["intercept_ms"] + 4.5 * fit["per_token_ms"], 50.0)  # at the mean length
    # emulated models sleep: running beside each other costs nothing
    shared = result["shared"]
    assert near(shared["target"]["tpot_ms"], 20.0) and near(shared["target"]["ttft_ms"], 50.0)
    assert near(shared["drafter"]["tpot_ms"], 5.0)
    assert [n for n, _ in shared["target"]["block_ms"]] == [2, 3, 4, 5, 6, 7]


def test_the_model_beside_runs_in_a_process_of_its_own() -> None:
    """What ``dsi-mpi profile`` runs beside each model: a process, as another rank would be."""
    spec = "emulated:tpot_ms=5,acceptance=0.8,vocab=100"
    beside = InProcess(partial(load_backend, spec), threads=1)
    try:
        for _ in range(2):  # loaded once, for every prompt of a phase
            with beside.running([1, 2, 3], 2):
                time.sleep(0.1)
            assert beside._proc.is_alive()
    finally:
        beside.close()
    assert not beside._proc.is_alive()
    made: list[InProcess] = []

    def start() -> InProcess:
        made.append(InProcess(partial(load_backend, spec), threads=1))
        return made[-1]

    target = load_backend("emulated:tpot_ms=20,ttft_ms=50,block_ms=2:60,vocab=100")
    result = measure(target, load_backend(spec), [[1, 2, 3]], max_new_tokens=4, lookahead=1,
                     warmup=0, shared=True, beside=(start, start))
    assert 20.0 <= result["shared"]["target"]["tpot_ms"] < 25.0
    assert len(made) == 2 and not any(m._proc.is_alive() for m in made)  # one per phase, ended
    with pytest.raises(RuntimeError, match="the model beside failed: .*no_such_model"):
        InProcess(partial(load_backend, "/no_such_model"), threads=1)


def test_background_model_runs_while_open_and_stops() -> None:
    drafter = load_backend("emulated:tpot_ms=1,acceptance=0.8,vocab=100")
    with Background(drafter, [1, 2, 3], span=4) as background:
        time.sleep(0.05)
    count = background.forwards
    assert count >= 10 and drafter.cached_length() <= 3 + 4
    time.sleep(0.01)
    assert background.forwards == count  # stopped


# Forwards of 2+ tokens at 2.3x one token, measured up to 21 tokens (the planner weighs only
# the lookaheads a curve covers: DSI's tasks at SP 1 reach 2k + 1 tokens)
STEP = ((2, 23.0), (21, 23.0))
LAT = Latencies(target_tpot_ms=10.0, drafter_tpot_ms=2.0, target_ttft_ms=15.0,
                drafter_ttft_ms=3.0)


def test_the_simulator_prices_each_forward_by_its_length() -> None:
    steep = replace(LAT, target_block_ms=((2, 30.0),))
    for mode, k in (("si", 3), ("dsi", 3)):
        flat = simulate(mode, LAT, 0.9, k, 1, 30, repeats=3)
        step = simulate(mode, steep, 0.9, k, 1, 30, repeats=3)
        assert step.mean_ms > flat.mean_ms * 1.5  # blocks of k + 1 tokens cost 3x
    # non-SI sends one token a forward: the curve never applies
    assert simulate("nonsi", steep, 0.9, 1, 1, 30).mean_ms == \
        simulate("nonsi", LAT, 0.9, 1, 1, 30).mean_ms == 15.0 + 29 * 10.0
    # a flat curve equal to TPOT changes nothing
    level = replace(LAT, target_block_ms=((2, 10.0),))
    assert simulate("dsi", level, 0.9, 3, 2, 30, repeats=3).mean_ms == \
        simulate("dsi", LAT, 0.9, 3, 2, 30, repeats=3).mean_ms


def test_the_simulator_prices_a_draft_by_the_tokens_it_feeds() -> None:
    # SI's first draft of a block feeds its last draft and the bonus token: with a drafter whose
    # 2-token forward costs 3x one, SI slows down; DSI's drafter mostly feeds one token a draft.
    dear = replace(LAT, drafter_block_ms=((2, 6.0),))
    si, si_dear = (simulate("si", lat, 0.9, 4, 1, 30, repeats=5).mean_ms for lat in (LAT, dear))
    assert si_dear >= si + 3 * 4.0  # at least three accepted blocks paid 4 ms more for a draft
    assert simulate("nonsi", dear, 0.9, 1, 1, 30).mean_ms == \
        simulate("nonsi", LAT, 0.9, 1, 1, 30).mean_ms


def test_shared_latencies_apply_when_the_other_model_runs_at_once() -> None:
    shared = replace(LAT, shared=Latencies(20.0, 4.0, 30.0, 6.0))
    # non-SI never drafts; SI's drafter waits while the target verifies
    for mode in ("nonsi", "si"):
        assert simulate(mode, shared, 0.9, 3, 1, 30, repeats=3).mean_ms == \
            simulate(mode, LAT, 0.9, 3, 1, 30, repeats=3).mean_ms
    # DSI drafts while the target verifies: its forwards pay the shared price
    assert simulate("dsi", shared, 0.9, 3, 1, 30, repeats=3).mean_ms > \
        simulate("dsi", LAT, 0.9, 3, 1, 30, repeats=3).mean_ms * 1.3


def test_the_planner_picks_the_lookahead_the_curve_favours() -> None:
    # Blocks of 2+ tokens cost 2.3x one token (this CPU's step, flat after it): a block's price
    # hardly grows with its length, so at a high acceptance longer blocks amortise it, and the
    # planner, pricing each forward by its length, picks a longer lookahead than on a flat curve.
    flat = make_plan(LAT, 0.9, 2, tokens=30, repeats=5)
    step = make_plan(replace(LAT, target_block_ms=STEP), 0.9, 2, tokens=30, repeats=5)
    assert step.lookahead > flat.lookahead
    assert step.dsi.mean_ms == simulate("dsi", replace(LAT, target_block_ms=STEP), 0.9,
                                        step.lookahead, step.sp, 30, repeats=5,
                                        min_drafts=step.min_drafts).mean_ms
    assert step.nonsi.mean_ms == flat.nonsi.mean_ms


def test_plan_reads_the_curve_and_the_shared_latencies_from_a_profile(tmp_path: Path) -> None:
    target = load_backend("emulated:tpot_ms=3,ttft_ms=6,block_ms=2:9,vocab=100")
    drafter = load_backend("emulated:tpot_ms=1,acceptance=0.9,vocab=100")
    data = measure(target, drafter, [[1, 2, 3]], max_new_tokens=10, lookahead=2, warmup=0,
                   shared=True)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    lat, acceptance = from_profile(str(path))
    assert [n for n, _ in lat.target_block_ms] == [2, 3, 4, 5]  # up to 2 x lookahead + 1
    assert 9.0 <= lat.target_forward_ms(2) < 12.0 and lat.shared is not None
    assert lat.shared.target_block_ms and 0 <= acceptance <= 1
    data["target"]["block_ms"] = [[1, 3.0]]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="lengths >= 2"):
        from_profile(str(path))


@pytest.mark.parametrize("acceptance", [0.5, 0.7])
def test_min_drafts_keeps_dsi_no_slower_than_non_si_on_a_step(acceptance: float) -> None:
    """Blocks of 2+ tokens at 2.3x one token (this CPU's step): at SP 1, a task that verifies
    one or two drafts costs more than the tokens it is expected to commit, so DSI as the paper
    states it (every task carries the drafts there are) loses to non-SI at every lookahead.
    Tasks of no drafts or at least ``min_drafts`` (the planner's choice) win back the
    guarantee; on a flat curve the planner keeps ``min_drafts`` 1."""
    lat = Latencies(10.0, 4.0, 15.0, 5.0, target_block_ms=STEP)
    nonsi = simulate("nonsi", lat, acceptance, 1, 1, 30, repeats=10).mean_ms
    for k in (1, 2, 3, 5, 8):
        assert simulate("dsi", lat, acceptance, k, 1, 30, repeats=10).mean_ms > nonsi * 1.05
    plan = make_plan(lat, acceptance, 2, tokens=30, repeats=10)
    assert plan.min_drafts > 1 and plan.dsi.min_drafts == plan.min_drafts
    assert plan.dsi.mean_ms <= nonsi
    assert plan.dsi.mean_ms == simulate("dsi", lat, acceptance, plan.lookahead, 1, 30, repeats=10,
                                        min_drafts=plan.min_drafts).mean_ms
    flat = make_plan(replace(lat, target_block_ms=()), acceptance, 2, tokens=30, repeats=10)
    assert flat.min_drafts == 1


def test_the_planner_weighs_only_lookaheads_the_curve_covers() -> None:
    from dsi_mpi.plan import within_curve

    curve = replace(LAT, target_block_ms=((2, 23.0), (11, 25.0)))  # profile --lookahead 5
    assert within_curve(curve, range(1, 11), "dsi") == [1, 2, 3, 4, 5]  # 2k + 1 <= 11
    assert within_curve(curve, range(1, 11), "si") == list(range(1, 11))  # k + 1 <= 11
    assert within_curve(LAT, [8, 3], "dsi") == [3, 8]  # no curve: every lookahead
    plan = make_plan(curve, 0.9, 2, tokens=30, repeats=3)
    assert plan.lookahead <= 5
