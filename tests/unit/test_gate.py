"""The per-layer gate (backends/gate.py) on a simulated GPU, on a real HF model and on ``--device``.

The simulated GPU runs queued layers only while the CPU sleeps, so without a gate the CPU
queues a whole forward before the GPU has run any of it: the worst case of the CUDA launch
queue, and the case the gate exists for.
"""

from __future__ import annotations

import pytest
import torch

from dsi_mpi.backends import Cancelled, load_backend
from dsi_mpi.backends.base import ContextRunner
from dsi_mpi.backends.gate import GateSpec, LayerGate
from dsi_mpi.verify import SamplingParams

LAYERS = 12
GREEDY = SamplingParams()
PROMPT = [5, 17, 42, 8, 99, 3, 250]


class FakeGPU:
    """Layers queue instantly and run one per CPU sleep (or all at once on ``synchronize``)."""

    def __init__(self, layers_per_sleep: int = 1, instant: bool = False) -> None:
        self.layers_per_sleep = layers_per_sleep
        self.instant = instant  # a GPU faster than the CPU: work is done when it is queued
        self.queued = 0
        self.done = 0
        self.max_in_flight = 0
        self.in_flight_at_sleep: list[int] = []

    @property
    def in_flight(self) -> int:
        return self.queued - self.done

    def enqueue(self) -> None:
        self.queued += 1
        if self.instant:
            self.done = self.queued
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def sleep(self, seconds: float) -> None:
        self.in_flight_at_sleep.append(self.in_flight)
        self.done = min(self.queued, self.done + self.layers_per_sleep)

    def synchronize(self) -> None:
        self.done = self.queued

    def new_event(self) -> FakeEvent:
        return FakeEvent(self)

    def gate(self, spec: GateSpec) -> LayerGate:
        return LayerGate(spec, new_event=self.new_event, synchronize=self.synchronize,
                         sleep=self.sleep)


class FakeEvent:
    def __init__(self, gpu: FakeGPU) -> None:
        self.gpu = gpu
        self.mark: int | None = None

    def record(self) -> None:
        self.mark = self.gpu.queued

    def query(self) -> bool:
        assert self.mark is not None, "queried an event that was never recorded"
        return self.gpu.done >= self.mark


class Layer(torch.nn.Module):
    def __init__(self, gpu: FakeGPU) -> None:
        super().__init__()
        self.gpu = gpu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.gpu.enqueue()
        return x


def run_forward(gpu: FakeGPU, spec: GateSpec, should_cancel=None,
                layers: int = LAYERS) -> LayerGate:
    stack = torch.nn.ModuleList(Layer(gpu) for _ in range(layers))
    gate = gpu.gate(spec)
    gate.install(stack)
    gate.begin(should_cancel)
    try:
        x = torch.zeros(1)
        for layer in stack:
            x = layer(x)
    finally:
        gate.end()
    return gate


@pytest.mark.parametrize("window", [1, 2, 3, 5])
@pytest.mark.parametrize("cancel_at", range(1, LAYERS))
def test_a_cancelled_forward_stops_within_w_layers(window: int, cancel_at: int) -> None:
    """The CANCEL arrives when the GPU has run ``cancel_at`` layers: the forward raises with
    at most W layers still queued, having queued at most W layers past that point. A CANCEL
    that comes after the last layer was queued finds the forward with at most W layers to go
    (it then ends with its result, as any forward past its last probe)."""
    gpu = FakeGPU()
    try:
        run_forward(gpu, GateSpec(window=window), should_cancel=lambda: gpu.done >= cancel_at)
        cancelled = False
    except Cancelled:
        cancelled = True
    assert gpu.in_flight <= window
    assert gpu.queued <= cancel_at + window
    # The last probe (pre-hook of the last layer) runs once layer LAYERS - 1 - W is done.
    assert cancelled == (cancel_at < LAYERS - window)


@pytest.mark.parametrize("cancel_at", range(1, LAYERS))
def test_without_the_gate_the_cpu_queues_the_whole_forward(cancel_at: int) -> None:
    """What the gate fixes: the old probe-only hook never sees the CANCEL, since the CPU has
    queued every layer before the GPU finished one."""
    gpu = FakeGPU()
    run_forward(gpu, GateSpec(mode="hook"), should_cancel=lambda: gpu.done >= cancel_at)
    assert (gpu.queued, gpu.done) == (LAYERS, 0)


@pytest.mark.parametrize("cancel_at", range(1, LAYERS))
def test_sync_after_every_layer_stops_at_the_next_layer(cancel_at: int) -> None:
    gpu = FakeGPU()
    with pytest.raises(Cancelled):
        run_forward(gpu, GateSpec(mode="sync"), should_cancel=lambda: gpu.done >= cancel_at)
    assert gpu.in_flight == 0 and gpu.queued == cancel_at


@pytest.mark.parametrize("window", [1, 2, 3, 5])
@pytest.mark.parametrize("layers_per_sleep", [1, 3])
def test_an_uncancelled_forward_waits_only_with_w_layers_in_flight(window: int,
                                                                    layers_per_sleep: int) -> None:
    """The gate never waits on an incomplete event beyond W: it sleeps only while W layers are
    queued and incomplete, and it keeps W queued (the GPU is never starved by the gate)."""
    gpu = FakeGPU(layers_per_sleep=layers_per_sleep)
    gate = run_forward(gpu, GateSpec(window=window), should_cancel=lambda: False)
    assert gpu.queued == LAYERS
    assert gpu.in_flight_at_sleep, "a GPU slower than the CPU makes the gate wait"
    assert min(gpu.in_flight_at_sleep) >= window
    assert gpu.max_in_flight == window
    assert 0 < gate.waits <= LAYERS - window


def test_a_gpu_ahead_of_the_cpu_costs_no_wait() -> None:
    gpu = FakeGPU(instant=True)
    gate = run_forward(gpu, GateSpec(window=1), should_cancel=lambda: False)
    assert gpu.queued == LAYERS and gpu.in_flight_at_sleep == [] and gate.waits == 0


def test_a_forward_that_cannot_be_cancelled_is_not_gated() -> None:
    gpu = FakeGPU()
    gate = run_forward(gpu, GateSpec(window=1), should_cancel=None)
    assert (gpu.queued, gpu.done, gate.waits) == (LAYERS, 0, 0)


def test_a_window_wider_than_the_model_never_waits() -> None:
    gpu = FakeGPU()
    gate = run_forward(gpu, GateSpec(window=LAYERS + 3), should_cancel=lambda: False)
    assert gpu.in_flight_at_sleep == [] and gate.waits == 0


def test_each_forward_waits_on_its_own_events() -> None:
    """A cancelled forward leaves recorded events behind; the next forward must not take
    them for its own (its layers are recorded anew before they are waited on)."""
    gpu = FakeGPU()
    stack = torch.nn.ModuleList(Layer(gpu) for _ in range(LAYERS))
    gate = gpu.gate(GateSpec(window=2))
    gate.install(stack)
    for cancel_at in (3, None):
        gate.begin(lambda c=cancel_at: c is not None and gpu.done >= c)
        try:
            x = torch.zeros(1)
            for layer in stack:
                x = layer(x)
        except Cancelled:
            pass
        finally:
            gate.end()
        gpu.synchronize()  # the next forward starts on an idle GPU
    assert gpu.max_in_flight == 2 and gpu.queued == 5 + LAYERS


def test_on_a_cpu_the_gate_only_probes() -> None:
    gate = LayerGate.for_device(torch.device("cpu"), GateSpec(window=1))
    assert not gate.active and gate.new_event is None


def test_the_spec_is_read_from_the_environment() -> None:
    assert GateSpec.from_env({}) == GateSpec(mode="gate", window=2)
    assert GateSpec.from_env({"DSI_MPI_GATE": "4"}) == GateSpec(mode="gate", window=4)
    assert GateSpec.from_env({"DSI_MPI_GATE": "hook"}).mode == "hook"
    assert GateSpec.from_env({"DSI_MPI_GATE": " SYNC "}).mode == "sync"
    for bad in ("0", "-1", "fast", "2.5"):
        with pytest.raises(ValueError, match="DSI_MPI_GATE"):
            GateSpec.from_env({"DSI_MPI_GATE": bad})


# ---------------------------------------------------------------- a real model

@pytest.fixture(scope="module")
def deep_llama(tiny_suite: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny float64 Llama with 8 decoder layers (the suite's have 2: too few to gate)."""
    from transformers import AutoTokenizer

    from dsi_mpi.tiny import build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_suite["llama"])
    return build_tiny_model(tmp_path_factory.mktemp("deep-llama"), layers=8, tokenizer=tokenizer)


def _fake_gated(path: str, device: str, gpu: FakeGPU, window: int):  # returns an HFBackend
    """The HF backend with its gate driven by a simulated GPU: the decoder layers queue work
    on it (a pre-hook that runs after the gate's), and the gate waits on its events."""
    from dsi_mpi.backends.hf import _decoder_layers

    backend = load_backend(path, dtype="float64", device=device)
    layers = _decoder_layers(backend.model)
    backend.gate.uninstall()
    backend.gate = gpu.gate(GateSpec(window=window))
    backend.gate.install(layers)
    for layer in layers:
        layer.register_forward_pre_hook(lambda module, args: gpu.enqueue())
    return backend


@pytest.mark.parametrize("window", [1, 2])
def test_a_gated_hf_forward_cancelled_mid_way_restores_the_cache(deep_llama: str, device: str,
                                                                 window: int) -> None:
    """Cancelled at every point of a verification forward: it stops within W layers, every
    cache layer is cropped back (they hold different lengths), and what follows is exactly
    what a model that never saw the cancelled forward computes."""
    reference = load_backend(deep_llama, dtype="float64", device=device)
    expected = reference.forward(PROMPT + [20, 21, 22], GREEDY).tokens[-3:].tolist()
    # The GPU passes layer 8 - W - 1 before the last probe (pre-hook of layer 7 waits for 7 - W).
    for cancel_at in range(1, 8 - window):
        gpu = FakeGPU()
        backend = _fake_gated(deep_llama, device, gpu, window)
        runner = ContextRunner(backend)
        runner.run(PROMPT, GREEDY)
        gpu.synchronize()
        start = gpu.queued
        with pytest.raises(Cancelled):
            runner.extend(len(PROMPT), [11, 12, 13, 14], GREEDY, num_outputs=5,
                          should_cancel=lambda c=cancel_at, s=start, g=gpu: g.done - s >= c)
        assert gpu.in_flight <= window and gpu.queued - start <= cancel_at + window
        assert [layer.get_seq_length() for layer in backend.cache.layers] == [len(PROMPT)] * 8
        got = runner.extend(len(PROMPT), [20, 21, 22], GREEDY, num_outputs=3).tokens.tolist()
        assert got == expected, cancel_at


def test_gated_and_ungated_forwards_agree(deep_llama: str, device: str) -> None:
    """The gate changes when the CPU launches layers, never what they compute."""
    gpu = FakeGPU()
    gated = _fake_gated(deep_llama, device, gpu, window=2)
    plain = load_backend(deep_llama, dtype="float64", device=device)
    for tokens in (PROMPT, [1, 2, 3], [4]):
        a = gated.forward(tokens, GREEDY, should_cancel=lambda: False).tokens.tolist()
        b = plain.forward(tokens, GREEDY).tokens.tolist()
        assert a == b
    assert gated.gate.waits > 0


@pytest.mark.parametrize("spec", ["hook", "1", "2", "sync"])
def test_the_real_gate_of_the_device_cancels_cleanly(deep_llama: str, device: str, spec: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate the backend builds for ``--device`` (real CUDA events on a GPU; probes alone on
    a CPU), cancelled before each layer in turn: the cache is restored exactly each time."""
    monkeypatch.setenv("DSI_MPI_GATE", spec)
    backend = load_backend(deep_llama, dtype="float64", device=device)
    assert backend.gate.spec == GateSpec.parse(spec)
    assert backend.gate.active == (device.startswith("cuda") and spec != "hook")
    reference = load_backend(deep_llama, dtype="float64", device=device)
    expected = reference.forward(PROMPT + [20, 21], GREEDY).tokens[-2:].tolist()
    runner = ContextRunner(backend)
    runner.run(PROMPT, GREEDY)
    for probes in range(2, 10):  # the probe before the forward, then one before each layer
        count = iter(range(1, 100))
        with pytest.raises(Cancelled):
            runner.extend(len(PROMPT), [11, 12, 13], GREEDY, num_outputs=4,
                          should_cancel=lambda n=probes, c=count: next(c) >= n)
        assert {layer.get_seq_length() for layer in backend.cache.layers} == {len(PROMPT)}
    assert runner.extend(len(PROMPT), [20, 21], GREEDY, num_outputs=2).tokens.tolist() == expected


def test_on_a_gpu_the_gate_bounds_the_queue(device: str) -> None:
    """Real CUDA events and kernels that take far longer to run than to launch (on a CPU
    device the layers run synchronously, so nothing is ever queued): after a CANCEL the
    stream holds at most W layers of work, where the probe-only hook queued them all."""
    if not device.startswith("cuda"):
        gate = LayerGate.for_device(torch.device(device), GateSpec(window=2))
        assert not gate.active  # on a CPU the gate is the probe alone; the rest needs a GPU
        return
    dev = torch.device(device)
    cycles = 4_000_000  # about 2 ms at an H100's 2 GHz; a launch takes microseconds

    class Slow(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch.cuda._sleep(cycles)
            return x + 1

    for spec, bound in ((GateSpec(mode="hook"), LAYERS), (GateSpec(window=2), 2 + 1)):
        stack = torch.nn.ModuleList(Slow() for _ in range(LAYERS))
        gate = LayerGate.for_device(dev, spec)
        gate.install(stack)
        finished = [torch.cuda.Event() for _ in range(LAYERS)]
        torch.cuda.synchronize(dev)
        with torch.cuda.device(dev):
            x = torch.zeros(1, device=dev)
            ran = [0]
            # CANCEL once the GPU has run 3 layers (an event never recorded counts as done).
            gate.begin(lambda r=ran, f=finished: r[0] >= 3 and f[2].query())
            try:
                for i, layer in enumerate(stack):
                    x = layer(x)
                    finished[i].record()
                    ran[0] += 1
            except Cancelled:
                pass
            finally:
                gate.end()
            pending = sum(not e.query() for e in finished[:ran[0]])
            torch.cuda.synchronize(dev)
        if spec.mode == "hook":
            assert ran[0] == LAYERS  # queued everything before the GPU finished 3 layers
        else:
            assert ran[0] < LAYERS and pending <= bound, (ran[0], pending)
