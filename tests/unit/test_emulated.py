"""The emulated backend: spec grammar, determinism, acceptance, rollback, cancellation."""

from __future__ import annotations

import time

import pytest

from dsi_mpi.backends import Cancelled, EmulatedBackend, EmulatedSpec, load_backend
from dsi_mpi.verify import SamplingParams

GREEDY = SamplingParams()


def test_spec_grammar_and_defaults() -> None:
    target = EmulatedSpec.parse("emulated:tpot_ms=20.6,ttft_ms=27.8")
    assert (target.tpot_ms, target.ttft_ms, target.acceptance, target.vocab, target.seed) == (
        20.6, 27.8, None, 32000, 0)
    drafter = EmulatedSpec.parse("emulated:tpot_ms=6.8,ttft_ms=8.1,acceptance=0.93")
    assert drafter.acceptance == 0.93
    assert EmulatedSpec.parse("emulated:tpot_ms=5").ttft_ms == 5.0  # ttft defaults to tpot
    assert EmulatedSpec.parse("emulated:tpot_ms=5,vocab=100,seed=7").vocab == 100


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("emulated:", "tpot_ms is required"),
        ("emulated:ttft_ms=3", "tpot_ms is required"),
        ("emulated:tpot_ms=fast", "is not float"),
        ("emulated:tpot_ms=1,speed=3", "unknown key"),
        ("emulated:tpot_ms", "is not key=value"),
        ("emulated:tpot_ms=1,tpot_ms=2", "given twice"),
        ("emulated:tpot_ms=1,acceptance=1.5", r"acceptance must be in \[0, 1\]"),
        ("emulated:tpot_ms=-1", "must be >= 0"),
        ("emulated:tpot_ms=1,vocab=1", "vocab must be >= 2"),
        ("emulated:tpot_ms=1,vocab=2.5", "is not int"),
    ],
)
def test_malformed_specs_name_the_problem(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EmulatedSpec.parse(spec)


def _fast(acceptance: float | None = None, vocab: int = 1000) -> EmulatedBackend:
    spec = f"emulated:tpot_ms=0,vocab={vocab}"
    if acceptance is not None:
        spec += f",acceptance={acceptance}"
    backend = load_backend(spec)
    assert isinstance(backend, EmulatedBackend)
    return backend


def _greedy_run(backend: EmulatedBackend, prompt: list[int], steps: int) -> list[int]:
    backend.reset()
    out = backend.forward(prompt, GREEDY, num_outputs=1)
    tokens = [int(out.tokens[0])]
    for _ in range(steps - 1):
        tokens.append(int(backend.forward([tokens[-1]], GREEDY).tokens[0]))
    return tokens


def test_target_is_deterministic_and_batching_invariant() -> None:
    target = _fast()
    a = _greedy_run(target, [1, 2, 3], 50)
    assert a == _greedy_run(_fast(), [1, 2, 3], 50)
    assert a != _greedy_run(target, [1, 2, 4], 50)
    # One forward over the whole sequence gives the same per-position tokens.
    target.reset()
    out = target.forward([1, 2, 3] + a[:-1], GREEDY)
    assert out.first_position == 1
    assert out.tokens[2:].tolist() == a
    # A seed changes the language; sampling seeds change the continuation.
    other = load_backend("emulated:tpot_ms=0,vocab=1000,seed=1")
    assert _greedy_run(other, [1, 2, 3], 50) != a


def test_drafter_acceptance_rate_and_mismatch() -> None:
    target, drafter = _fast(), _fast(acceptance=0.7)
    context = list(range(1, 4))
    t = target.forward(context, GREEDY).tokens
    t = target.forward(list(range(4, 3000)), GREEDY).tokens
    d = drafter.forward(list(range(1, 3000)), GREEDY).tokens[3:]
    assert len(d) == len(t)
    rate = float((d == t).mean())
    assert abs(rate - 0.7) < 0.03
    assert (_fast(acceptance=1.0).forward(list(range(1, 500)), GREEDY).tokens[3:] == t[:496]).all()
    assert (_fast(acceptance=0.0).forward(list(range(1, 500)), GREEDY).tokens[3:] != t[:496]).all()


def test_crop_rolls_back_exactly() -> None:
    backend = _fast()
    backend.forward([5, 6, 7, 8, 9], GREEDY)
    backend.crop(2)
    assert backend.cached_length() == 2
    rolled = backend.forward([10, 11], GREEDY).tokens.tolist()
    backend.reset()
    fresh = backend.forward([5, 6, 10, 11], GREEDY).tokens[2:].tolist()
    assert rolled == fresh


class _VirtualTime:
    """The clock of the emulated backend, made virtual: sleeps pass at once and are noted."""

    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_cancellation_interrupts_the_sleep_and_leaves_no_trace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A 200 ms forward sleeps in slices and checks for cancellation between them: cancelled at
    its fourth check, it has slept three slices (on a virtual clock: nothing is timed)."""
    from dsi_mpi.backends import emulated

    backend = load_backend("emulated:tpot_ms=200,ttft_ms=200,vocab=50")
    backend.sleep = False
    backend.forward([1, 2, 3], GREEDY)
    backend.sleep = True
    clock = _VirtualTime()
    monkeypatch.setattr(emulated, "time", clock)
    calls = []

    def cancel_after_three() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        backend.forward([4, 5], GREEDY, should_cancel=cancel_after_three)
    assert len(calls) == 4 and len(clock.sleeps) == 3
    assert all(0 < s <= emulated._SLICE_S for s in clock.sleeps)
    assert clock.now <= 3 * emulated._SLICE_S  # far less than the 200 ms forward
    assert backend.cached_length() == 3


def test_cancellation_interrupts_the_precise_end_of_a_forward() -> None:
    """A forward shorter than the spun tail is all spin: it still checks for cancellation."""
    from dsi_mpi.backends.emulated import _SPIN_S

    backend = load_backend(f"emulated:tpot_ms={_SPIN_S * 1e3 / 2},vocab=50")
    backend.forward([1, 2, 3], GREEDY)
    calls = []

    def cancel_after_three() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        backend.forward([4, 5], GREEDY, should_cancel=cancel_after_three)
    assert len(calls) == 4 and backend.cached_length() == 3
    resumed = backend.forward([4, 5], GREEDY).tokens.tolist()
    assert resumed == _fast(vocab=50).forward([1, 2, 3, 4, 5], GREEDY).tokens[3:].tolist()


def test_a_forward_lasts_at_least_its_latency() -> None:
    backend = load_backend("emulated:tpot_ms=3,ttft_ms=5,vocab=50")
    for tokens, latency in (([1, 2, 3], 0.005), ([4], 0.003)):
        started = time.perf_counter()
        backend.forward(tokens, GREEDY)
        assert time.perf_counter() - started >= latency  # not early (how late: bench/roundtrip.py)


def test_emulated_has_no_distributions() -> None:
    with pytest.raises(ValueError, match="--verify exact"):
        _fast().forward([1], GREEDY, want_probs=True)
