"""How soon a CANCEL preempts a target forward: the old probe-only hook, the gate, a sync per layer.

    mpiexec -n 2 python -m mpi4py bench/preemption.py [--device cpu|cuda] [--model SPEC]
        [--dtype float32] [--context 128] [--block 6] [--trials 100] [--uncancelled 30]
        [--gates hook,2,sync] [--seed 0] [--out FILE]

Rank 1 runs the real target server loop (``target.serve_target``) on an HF backend whose gate
is set per configuration (``--gates``: ``hook``, a window ``W``, ``sync``; see
``dsi_mpi/backends/gate.py``). Rank 0 plays the coordinator: each trial sends a VERIFY of
``--block`` new tokens on a cache of ``--context`` tokens, waits a random delay, sends a CANCEL
and times

- CANCEL sent -> reply received: CANCELLED, or RESULT when the forward had already passed its
  last probe (the server is free again as the coordinator sees it);
- CANCEL sent -> device idle: on a GPU, rank 1 synchronises its stream right after its reply
  and notes the time (the GPU has no queued work left); on a CPU, when the forward returned.
  Rank 1 sends that time to rank 0 on a side communicator, and rank 0 begins the next trial
  only then, so every forward starts on an idle device.

The delays are uniform in [0, T], T the median round trip of an uncancelled forward under the
first configuration, and the same for every configuration. Trials whose reply came before the
delay was over send no CANCEL and are counted as ``early``. Per configuration it also reports
the median round trip of ``--uncancelled`` uncancelled forwards, and its ratio to the first
configuration's: the price of the gate when nothing is cancelled. Both ranks read one clock
(``time.perf_counter``: CLOCK_MONOTONIC), so they must share a host.

``--model`` is a folder, a ``.gguf`` file or ``random:SHAPE`` (``bench/models.py``); the default
is ``random:cpu`` on a CPU and ``random:smollm2`` on a GPU. One JSON line per configuration
(with the device, commit and host) goes to ``--out`` and stdout, and a table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, device_name, provenance
from bench.models import describe, resolve
from dsi_mpi.protocol import Cancel, Cancelled, Message, Result, Shutdown, Verify
from dsi_mpi.transport import Transport

SERVER = 1
WARMUP = 5


class TimedTransport(Transport):
    """The target's transport: after each reply, the moment the device is idle goes to rank 0
    on a side communicator (rank 0 starts the next trial only then, on an idle device)."""

    def __init__(self, comm: MPI.Comm, side: MPI.Comm, device: str, **kwargs) -> None:
        super().__init__(comm, **kwargs)
        self.side = side
        self.device = device

    def send(self, dest: int, msg: Message) -> None:
        replied = time.perf_counter()
        super().send(dest, msg)
        if isinstance(msg, Result | Cancelled):
            idle = replied  # a CPU forward is over when it returns
            if self.device.startswith("cuda"):
                import torch

                torch.cuda.current_stream(self.device).synchronize()  # no queued work left
                idle = time.perf_counter()
            self.side.send((msg.task_id, idle), dest=0)


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p95 and max in milliseconds (None for no values)."""
    if not values:
        return {"p50": None, "p95": None, "max": None}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]
    return {"p50": round(1e3 * statistics.median(ordered), 3), "p95": round(1e3 * p95, 3),
            "max": round(1e3 * ordered[-1], 3)}


class Driver:
    """Rank 0: sends VERIFY and CANCEL as a coordinator would, and times the replies."""

    def __init__(self, transport: Transport, side: MPI.Comm, context: list[int],
                 blocks: list[list[int]]) -> None:
        self.transport = transport
        self.side = side
        self.context = context
        self.blocks = blocks
        self.task = 0

    def _verify(self, tokens: list[int], keep: int, outputs: int) -> int:
        self.task += 1
        first = keep + len(tokens) - outputs + 1  # the server returns `outputs` tokens
        self.transport.send(SERVER, Verify(0, self.task, keep, first, tuple(tokens)))
        return self.task

    def _reply(self, task: int) -> Result | Cancelled:
        msg = self.transport.wait(source=SERVER, what=f"the reply to task {task}").message
        assert isinstance(msg, Result | Cancelled) and msg.task_id == task, msg
        return msg

    def _idle(self, task: int) -> float:
        """When the server's device was idle after its reply to ``task`` (bounded wait)."""
        deadline = time.monotonic() + self.transport.timeout_s
        while not self.side.Iprobe(source=SERVER):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 1 never said when its device was idle after task {task}")
            time.sleep(1e-5)
        ident, idle = self.side.recv(source=SERVER)
        assert ident == task, (ident, task)
        return idle

    def prime(self) -> None:
        """Fill the server's cache with the context (its runner starts empty)."""
        task = self._verify(self.context + self.blocks[0], 0, 1)
        self._reply(task)
        self._idle(task)

    def block(self, i: int) -> list[int]:
        return self.blocks[i % len(self.blocks)]

    def uncancelled(self, i: int) -> float:
        tokens = self.block(i)
        start = time.perf_counter()
        task = self._verify(tokens, len(self.context), min(len(tokens), 8))
        msg = self._reply(task)
        elapsed = time.perf_counter() - start
        assert isinstance(msg, Result), msg
        self._idle(task)
        return elapsed

    def cancelled(self, i: int, delay: float) -> dict:
        tokens = self.block(i)
        start = time.perf_counter()
        task = self._verify(tokens, len(self.context), min(len(tokens), 8))
        deadline = start + delay
        while (left := deadline - time.perf_counter()) > 0:
            if left > 3e-4:
                time.sleep(left - 2e-4)
            early = self.transport.poll(source=SERVER)
            if early is not None:
                assert isinstance(early.message, Result) and early.message.task_id == task, early
                self._idle(task)
                return {"task": task, "early": True}
        sent = time.perf_counter()
        self.transport.send(SERVER, Cancel(0, task))
        msg = self._reply(task)
        received = time.perf_counter()
        idle = self._idle(task)
        return {"task": task, "early": False, "sent": sent, "received": received, "idle": idle,
                "kind": int(msg.TAG)}


def serve(comm: MPI.Comm, side: MPI.Comm, args: argparse.Namespace, folder: str,
          specs: list) -> list[int]:
    """Rank 1: one HF backend; the real server loop once per gate configuration."""
    import torch

    from dsi_mpi.backends.gate import LayerGate
    from dsi_mpi.backends.hf import HFBackend, _decoder_layers
    from dsi_mpi.target import serve_target
    from dsi_mpi.verify import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    backend = HFBackend(folder, dtype=args.dtype, device=args.device)
    layers = _decoder_layers(backend.model)
    waits = []
    for spec in specs:
        backend.gate.uninstall()
        backend.gate = LayerGate.for_device(backend.device, spec)
        backend.gate.install(layers)
        transport = TimedTransport(comm, side, args.device, timeout_s=args.timeout)
        try:
            serve_target(transport, backend, SamplingParams())
            transport.flush()
        finally:
            transport.close()
        waits.append(backend.gate.waits)
    return waits


def drive(comm: MPI.Comm, side: MPI.Comm, args: argparse.Namespace, specs: list,
          vocab: int) -> list[dict]:
    """Rank 0: per configuration, uncancelled forwards, then cancelled ones."""
    import random

    rng = random.Random(args.seed)
    context = [rng.randrange(3, vocab) for _ in range(args.context)]
    blocks = [[rng.randrange(3, vocab) for _ in range(args.block)] for _ in range(16)]
    results, delays, horizon = [], None, 0.0
    for spec in specs:
        transport = Transport(comm, timeout_s=args.timeout, poll_max_s=1e-5)
        driver = Driver(transport, side, context, blocks)
        try:
            driver.prime()
            for i in range(WARMUP):
                driver.uncancelled(i)
            plain = [driver.uncancelled(i) for i in range(args.uncancelled)]
            if delays is None:  # the first configuration sets the delays for all
                horizon = statistics.median(plain)
                delays = [rng.uniform(0.0, horizon) for _ in range(args.trials)]
            trials = [driver.cancelled(i, d) for i, d in enumerate(delays)]
            transport.send(SERVER, Shutdown())
            transport.flush()
        finally:
            transport.close()
        results.append({"spec": spec, "plain": plain, "trials": trials, "horizon": horizon})
    return results


def summarise(result: dict, waits: int, base_plain: float, meta: dict) -> dict:
    sent = [t for t in result["trials"] if not t["early"]]
    to_reply = [t["received"] - t["sent"] for t in sent]
    to_idle = [t["idle"] - t["sent"] for t in sent]
    cancelled = [t for t in sent if t["kind"] == Cancelled.TAG]
    plain = statistics.median(result["plain"])
    return {
        "bench": "preemption", "gate": str(result["spec"]), **meta,
        "trials": len(result["trials"]), "early": len(result["trials"]) - len(sent),
        "cancelled": len(cancelled), "completed": len(sent) - len(cancelled),
        "cancel_to_reply_ms": percentiles(to_reply),
        "cancel_to_idle_ms": percentiles(to_idle),
        "cancel_to_reply_cancelled_only_ms": percentiles(
            [t["received"] - t["sent"] for t in cancelled]),
        "uncancelled_ms": {"median": round(1e3 * plain, 3),
                           "p95": percentiles(result["plain"])["p95"]},
        "uncancelled_ratio": round(plain / base_plain, 4),
        "delay_max_ms": round(1e3 * result["horizon"], 3),
        "gate_waits": waits,
    }


def table(rows: list[dict]) -> str:
    lines = ["| gate | CANCEL->reply p50 / p95 / max (ms) | CANCEL->idle p50 / p95 / max (ms) "
             "| cancelled / sent | uncancelled median (ms) | ratio |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["cancel_to_reply_ms"], r["cancel_to_idle_ms"]
        lines.append(f"| {r['gate']} | {a['p50']} / {a['p95']} / {a['max']} "
                     f"| {b['p50']} / {b['p95']} / {b['max']} "
                     f"| {r['cancelled']} / {r['trials'] - r['early']} "
                     f"| {r['uncancelled_ms']['median']} | {r['uncancelled_ratio']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (rank 1's model)")
    parser.add_argument("--model",
                        help="folder, .gguf or random:SHAPE (default random:cpu / random:smollm2)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--context", type=int, default=128,
                        help="tokens cached before each VERIFY")
    parser.add_argument("--block", type=int, default=6,
                        help="new tokens per VERIFY (lookahead + 1)")
    parser.add_argument("--trials", type=int, default=100,
                        help="cancelled forwards per configuration")
    parser.add_argument("--uncancelled", type=int, default=30,
                        help="uncancelled forwards per configuration")
    parser.add_argument("--gates", default="hook,2,sync",
                        help="configurations: hook, a window W, sync")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads on rank 1 (default 1 on a CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--workdir", default=None, help="where random or converted models are kept")
    parser.add_argument("--label", default="", help="a name for this workload in the JSON lines")
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "preemption.jsonl"))
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    if comm.Get_size() != 2:
        if rank == 0:
            print("launch with mpiexec -n 2 (rank 0 drives, rank 1 serves)", file=sys.stderr)
        return 2
    from dsi_mpi.backends.gate import GateSpec

    specs = [GateSpec.parse(g) for g in args.gates.split(",")]
    if args.threads is None and not args.device.startswith("cuda"):
        args.threads = 1
    spec = args.model or ("random:smollm2" if args.device.startswith("cuda") else "random:cpu")
    # Rank 0 builds or converts the model once; rank 1 loads it.
    verdict = (None, None)
    if rank == 0:
        try:
            workdir = args.workdir or os.path.join(tempfile.gettempdir(), "dsi-mpi-bench-models")
            os.makedirs(workdir, exist_ok=True)
            verdict = (resolve(spec, workdir), None)
        except Exception as exc:  # every rank must learn it
            verdict = (None, f"{type(exc).__name__}: {exc}")
    folder, error = comm.bcast(verdict, root=0)
    if error is not None:
        if rank == 0:
            print(f"preemption: cannot prepare --model {spec}: {error}", file=sys.stderr)
        return 2
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    hosts = comm.allgather(platform.node())
    assert len(set(hosts)) == 1, f"both ranks must share a host (one clock): {hosts}"
    side = comm.Dup()  # rank 1 -> rank 0: when the device went idle after each reply
    if rank == SERVER:
        waits = serve(comm, side, args, folder, specs)
        comm.send((waits, device_name(args.device)), dest=0)
        side.Free()
        return 0
    results = drive(comm, side, args, specs, config.vocab_size)
    waits, device = comm.recv(source=SERVER)
    side.Free()
    import torch
    import transformers

    meta = {"label": args.label, "device": device, "device_arg": args.device,
            "model": describe(spec),
            "layers": config.num_hidden_layers, "dtype": args.dtype, "context": args.context,
            "block": args.block, "threads": args.threads, "torch": torch.__version__,
            "transformers": transformers.__version__, **provenance(comm.Get_size())}
    base = statistics.median(results[0]["plain"])
    rows = [summarise(r, w, base, meta) for r, w in zip(results, waits, strict=True)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as fh:
        for row in rows:
            line = json.dumps(row)
            fh.write(line + "\n")
            print(line, flush=True)
    print(f"\n{device}, {describe(spec)} ({config.num_hidden_layers} layers, {args.dtype}), "
          f"context {args.context}, block {args.block}; "
          f"delays uniform in [0, {rows[0]['delay_max_ms']} ms]\n")
    print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
