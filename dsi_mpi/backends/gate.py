"""A per-layer gate: bounds how far the CPU runs ahead of the GPU, so a CANCEL preempts a
forward within ``W`` decoder layers.

CUDA kernels launch asynchronously. A check for CANCEL in a forward pre-hook runs when the
CPU *enqueues* a layer, and on a large model the CPU enqueues the whole forward long before
the GPU has run its first layers: the check then only sees a CANCEL after everything is
queued, and the stale forward runs to its end on a server that DSI needs. Kernels already
queued cannot be killed, so the gate keeps few of them queued:

    pre-hook of layer i:   probe for CANCEL; then wait until the event recorded after layer
                           i - W has completed, probing for CANCEL while waiting
                           (``event.query()`` polling with a short sleep, never a device sync)
    post-hook of layer i:  record an event on the model's current stream

so at most ``W`` layers are queued when a CANCEL is seen: the GPU is idle again at most ``W``
layers (plus the output head of a forward already past its last layer, plus one poll
interval) after the CANCEL arrives, and an uncancelled forward only waits when ``W`` layers
are in flight, which keeps the GPU fed. Forwards without a ``should_cancel`` (the drafter's,
``generate``-style use) pass through untouched.

Modes, chosen with ``DSI_MPI_GATE`` (read when a backend is built):

- ``2`` (default) or any ``W >= 1``: the gate above with window ``W``;
- ``hook``: probe only, the behaviour before the gate (the CPU may queue the whole forward);
- ``sync``: synchronise the stream after every layer (no run-ahead at all; the slowest).

On a CPU device every mode is the probe alone: CPU ops run synchronously, nothing is queued.
In a target server of several ranks (``collective``) the probe is an agreement among them and
runs once per layer, after the wait, so every rank makes the same number of checks.
The gate's logic takes its events, stream synchronisation and sleep as arguments, so the unit
tests drive it with a simulated GPU (``tests/unit/test_gate.py``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch

from dsi_mpi.backends.base import Cancelled

ENV = "DSI_MPI_GATE"
MODES = ("hook", "gate", "sync")


class Event(Protocol):
    """What the gate needs of a CUDA event (``torch.cuda.Event`` on the model's stream)."""

    def record(self) -> None: ...

    def query(self) -> bool: ...


@dataclass(frozen=True)
class GateSpec:
    mode: str = "gate"  # hook (probe only), gate (bounded run-ahead) or sync (sync every layer)
    window: int = 2  # W: layers the CPU may run ahead of the GPU (mode gate)
    poll_s: float = 2e-5  # sleep between polls of a pending event (Linux rounds it up to ~60 us)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"gate mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.window < 1:
            raise ValueError(f"gate window must be >= 1 layer, got {self.window}")

    @classmethod
    def parse(cls, text: str) -> GateSpec:
        """``hook``, ``sync``, or a window ``W >= 1`` (the gate)."""
        text = text.strip().lower()
        if text in ("hook", "sync"):
            return cls(mode=text)
        try:
            window = int(text)
        except ValueError:
            window = 0
        if window < 1:
            raise ValueError(f"{ENV}={text!r}: write a window W >= 1 (default 2), hook or sync")
        return cls(mode="gate", window=window)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> GateSpec:
        text = environ.get(ENV, "")
        return cls.parse(text) if text.strip() else cls()

    def __str__(self) -> str:
        return f"gate W={self.window}" if self.mode == "gate" else self.mode


class _StreamEvent:
    """A ``torch.cuda.Event`` recorded on one device's current stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.event = torch.cuda.Event()

    def record(self) -> None:
        self.event.record(torch.cuda.current_stream(self.device))

    def query(self) -> bool:
        return self.event.query()


class LayerGate:
    """Cancellation probes and bounded run-ahead around the decoder layers of one model.

    ``new_event`` makes the events (None: a CPU device, no events and no waiting);
    ``synchronize`` waits for the stream (mode ``sync``); ``sleep`` is the pause between polls.
    """

    def __init__(self, spec: GateSpec = GateSpec(), new_event: Callable[[], Event] | None = None,
                 synchronize: Callable[[], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.spec = spec
        self.new_event = new_event
        self.synchronize = synchronize
        self.sleep = sleep
        self._should_cancel: Callable[[], bool] | None = None
        # A ring of W + 1 events: layer j's event lives in slot j mod (W + 1), and is waited on
        # (pre-hook of j + W) before the slot is recorded again (post-hook of j + W + 1).
        self._events: list[Event] = []
        self._recorded: list[tuple[int, int] | None] = []  # (forward, layer) each slot holds
        self._forward = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.waits = 0  # pre-hooks that found their event pending (for tests and benchmarks)
        # A server of several ranks (servergroup.py): ``should_cancel`` is a collective, so it
        # is called exactly once per layer on every rank, never from the wait's poll loop.
        self.collective = False

    @classmethod
    def for_device(cls, device: torch.device, spec: GateSpec | None = None) -> LayerGate:
        """The gate of a model on ``device``; ``spec`` defaults to ``DSI_MPI_GATE``'s."""
        spec = GateSpec.from_env() if spec is None else spec
        if device.type != "cuda":
            return cls(spec)  # CPU ops are synchronous: probing is all there is to do
        stream = partial(torch.cuda.current_stream, device)
        return cls(spec, new_event=partial(_StreamEvent, device),
                   synchronize=lambda: stream().synchronize())

    @property
    def active(self) -> bool:
        """Whether this gate does more than probe (a GPU and a mode other than hook)."""
        return self.new_event is not None and self.spec.mode != "hook"

    def install(self, layers: Sequence[torch.nn.Module]) -> None:
        """Hook every decoder layer, in the order the forward runs them."""
        for index, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(partial(self._pre_hook, index)))
            self._handles.append(layer.register_forward_hook(partial(self._post_hook, index)))

    def uninstall(self) -> None:
        """Remove the hooks (to put another gate in this one's place)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def begin(self, should_cancel: Callable[[], bool] | None) -> None:
        """A forward starts; ``should_cancel`` (None: not cancellable, no gating) is polled."""
        self._should_cancel = should_cancel
        self._forward += 1

    def end(self) -> None:
        self._should_cancel = None

    @contextmanager
    def forward(self, should_cancel: Callable[[], bool] | None,
                undo: Callable[[], None]) -> Iterator[None]:
        """One forward of an engine under the gate, between :meth:`begin` and :meth:`end`: a
        :class:`Cancelled` raised in it (by a probe, or by the engine's own check) calls
        ``undo``, which takes back what the forward wrote to the cache, then propagates."""
        self.begin(should_cancel)
        try:
            yield
        except Cancelled:
            undo()
            raise
        finally:
            self.end()

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """The layer hooks pass through (a graph segment replayed eagerly probes only between
        segments, where the engine calls :meth:`before_layer` itself)."""
        cancel, self._should_cancel = self._should_cancel, None
        try:
            yield
        finally:
            self._should_cancel = cancel

    # ------------------------------------------------------------------ hooks

    def _pre_hook(self, index: int, module: torch.nn.Module, args: object) -> None:
        self.before_layer(index)

    def _post_hook(self, index: int, module: torch.nn.Module, args: object, output: object) -> None:
        self.after_layer(index)

    def before_layer(self, index: int) -> None:
        cancel = self._should_cancel
        if cancel is None:
            return
        if self.collective:  # one check per layer, after the wait: the same count on every rank
            self._wait_for_layer(index, None)
            if cancel():
                raise Cancelled()
            return
        if cancel():
            raise Cancelled()
        self._wait_for_layer(index, cancel)

    def _wait_for_layer(self, index: int, cancel: Callable[[], bool] | None) -> None:
        """Wait until the event of layer ``index - W`` has completed (probing ``cancel``, if
        given, while waiting)."""
        if not self.active or self.spec.mode != "gate" or index < self.spec.window:
            return
        earlier = index - self.spec.window
        slot = earlier % (self.spec.window + 1)
        if not self._recorded or self._recorded[slot] != (self._forward, earlier):
            return  # that layer did not run in this forward
        event = self._events[slot]
        if event.query():
            return
        self.waits += 1
        while True:
            if cancel is not None and cancel():
                raise Cancelled()
            self.sleep(self.spec.poll_s)
            if event.query():
                return

    def after_layer(self, index: int) -> None:
        if self._should_cancel is None or not self.active:
            return
        if self.spec.mode == "sync":
            assert self.synchronize is not None  # an active gate has its device's hooks
            self.synchronize()
            return
        if not self._events:
            assert self.new_event is not None  # an active gate has its device's hooks
            new_event = self.new_event
            self._events = [new_event() for _ in range(self.spec.window + 1)]
            self._recorded = [None] * len(self._events)
        slot = index % len(self._events)
        self._events[slot].record()
        self._recorded[slot] = (self._forward, index)
