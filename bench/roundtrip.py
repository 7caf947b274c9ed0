"""How close the runtime's messages come to MPI's own speed, for each way of waiting (--poll).

In one run, on the ranks it is launched on, for ``--poll spin`` and ``backoff`` in turn:

- the MPI ping-pong: blocking ``Send``/``Recv`` of one 8-int64 block between rank 0 and the
  first target rank, round trip (the other ranks sleep meanwhile);
- the coordinator round trip: non-SI with an emulated target at 0.01 ms and 1 ms, 2 ranks or
  more: time per token (``tpot_s`` of the records) and overhead per token (that minus TPOT);
- the DSI commit latency (3 ranks or more): a target sends a RESULT -> the coordinator sends
  the drafter its ADVANCE or ROLLBACK, and -> a waiting drafter receives it;
- the coordinator's own time per message: receive and decode (the probe that finds it), then
  policy, encode and sends (until it waits again), medians over the non-SI and DSI runs;
- on rank 0 alone: an emulated forward's duration error and how late a cancellation stops it.

The DSI and coordinator numbers come from a transport that stamps every message (one
``perf_counter`` per event, well under a microsecond); times on different ranks compare
because every rank reads the same monotonic clock (one host; reported n/a across hosts).

    mpiexec -n 2 python -m mpi4py bench/roundtrip.py  # ping-pong, non-SI
    mpiexec -n 9 python -m mpi4py bench/roundtrip.py  # and DSI (coordinator, drafter, 7 targets)
    python bench/roundtrip.py --markdown docs/results/roundtrip-{2,9}.jsonl

Prints a table and writes one JSON line per poll strategy (config, git commit, host, Slurm job id).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from mpi4py import MPI

import dsi_mpi.runtime
from bench.common import REPO, git_commit
from dsi_mpi.backends.base import Cancelled
from dsi_mpi.backends.emulated import EmulatedBackend, EmulatedSpec
from dsi_mpi.config import RunConfig
from dsi_mpi.devices import poll_strategy
from dsi_mpi.preflight import Prompt
from dsi_mpi.protocol import Message, Tag
from dsi_mpi.runtime import Rank0, run
from dsi_mpi.transport import Incoming, Transport
from dsi_mpi.verify import SamplingParams

GREEDY = SamplingParams()
DRAFTER = 1  # with 3 ranks or more
COMMIT_TAGS = (Tag.ADVANCE, Tag.ROLLBACK)


class StampingTransport(Transport):
    """The runtime's transport, stamping each send, each message received and each wait.

    Events: ``(time, "s" | "r" | "w", peer, tag, waiting, poll_s)``; ``waiting``: the message
    was found by ``wait`` (the rank had nothing else to do); ``poll_s``: the probe, receive and
    decode that found it."""

    latest: StampingTransport | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[tuple[float, str, int, int, bool, float]] = []
        self._waiting = False
        StampingTransport.latest = self

    def send(self, dest: int, msg: Message) -> None:
        # Heartbeats are received inside poll, never returned: unstamped on both sides, so the
        # k-th message stamped as sent to a peer is the k-th it stamps as received.
        if msg.TAG != Tag.HEARTBEAT:
            self.events.append((time.perf_counter(), "s", dest, int(msg.TAG), False, 0.0))
        super().send(dest, msg)

    def poll(self, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG) -> Incoming | None:
        start = time.perf_counter()
        msg = super().poll(source, tag)
        if msg is not None:
            end = time.perf_counter()
            self.events.append((end, "r", msg.source, int(msg.message.TAG), self._waiting,
                                end - start))
        return msg

    def wait(self, *args: object, **kwargs: object) -> Incoming:
        self.events.append((time.perf_counter(), "w", -1, 0, False, 0.0))
        self._waiting = True
        try:
            return super().wait(*args, **kwargs)
        finally:
            self._waiting = False


def sleep_until_all_arrive(comm: MPI.Comm) -> None:
    """A barrier that sleeps (a blocking MPICH barrier spins and would steal the cores)."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(1e-3)


def pingpong(comm: MPI.Comm, peer: int, rounds: int, batches: int) -> list[float]:
    """Round trip times (s), the median of each batch of ``rounds``; rank 0 and ``peer`` only."""
    rank, block = comm.Get_rank(), np.zeros(8, dtype=np.int64)
    out = []
    if rank in (0, peer):
        other = peer if rank == 0 else 0
        for _ in range(batches + 1):  # the first batch warms up
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                if rank == 0:
                    comm.Send([block, MPI.INT64_T], other, 1)
                    comm.Recv([block, MPI.INT64_T], other, 1)
                else:
                    comm.Recv([block, MPI.INT64_T], other, 1)
                    comm.Send([block, MPI.INT64_T], other, 1)
                times.append(time.perf_counter() - start)
            out.append(statistics.median(times))
    sleep_until_all_arrive(comm)
    return out[1:]


def run_stamped(comm: MPI.Comm, config: RunConfig,
                prompts: list[Prompt]) -> tuple[list[dict], list | None]:
    """The runtime on ``comm`` with stamping transports: (records, every rank's events) on
    rank 0."""
    dsi_mpi.runtime.Transport = StampingTransport
    try:
        outcome = run(comm, [config], Rank0(prompts, warmup=1))
    finally:
        dsi_mpi.runtime.Transport = Transport
    events = comm.gather(StampingTransport.latest.events, root=0)
    sleep_until_all_arrive(comm)
    return outcome.records, events


def coordinator_costs(events: list) -> tuple[list[float], list[float]]:
    """Per message the coordinator received: (probe + receive + decode, then policy + encode +
    sends until its next wait), in seconds."""
    receive, handle = [], []
    coordinator = events[0]
    for i, (t, kind, _, _, _, poll_s) in enumerate(coordinator):
        if kind != "r":
            continue
        receive.append(poll_s)
        nxt = next((e for e in coordinator[i + 1:] if e[1] in "wr"), None)
        if nxt is not None and nxt[1] == "w":
            handle.append(nxt[0] - t)
    return receive, handle


def commit_latencies(events: list) -> tuple[list[float], list[float]]:
    """For each RESULT after which the coordinator told the drafter something (ADVANCE or
    ROLLBACK) before receiving again: (target sent -> coordinator sent, target sent -> drafter
    received, the latter only where the drafter was waiting)."""
    coordinator, drafter = events[0], events[DRAFTER]
    # MPI does not reorder messages between two ranks on one communicator, and every receiver
    # here takes any tag from its peer, so the k-th message sent is the k-th received.
    sent_by = {rank: [e for e in ev if e[1] == "s" and e[2] == 0]
               for rank, ev in enumerate(events) if rank}
    got_from: dict[int, int] = {}
    to_drafter = [e for e in coordinator if e[1] == "s" and e[2] == DRAFTER]
    drafter_got = [e for e in drafter if e[1] == "r" and e[2] == 0]
    told_index = {id(e): k for k, e in enumerate(to_drafter)}
    sent, received = [], []
    for i, (_, kind, peer, tag, _, _) in enumerate(coordinator):
        if kind != "r":
            continue
        k = got_from.get(peer, 0)
        got_from[peer] = k + 1
        if tag != Tag.RESULT:
            continue
        origin = sent_by[peer][k][0]
        for e in coordinator[i + 1:]:
            if e[1] == "r":
                break
            if e[1] == "s" and e[2] == DRAFTER and e[3] in COMMIT_TAGS:
                sent.append(e[0] - origin)
                arrival = drafter_got[told_index[id(e)]]
                if arrival[4]:
                    received.append(arrival[0] - origin)
                break
    return sent, received


def forward_precision(tpot_ms: float, trials: int, seed: int = 0) -> dict:
    """Rank 0 alone: an emulated forward's duration error, and a cancellation's lateness (the
    cancellation check turns true at a random moment of the forward)."""
    backend = EmulatedBackend(EmulatedSpec.parse(f"emulated:tpot_ms={tpot_ms}"))
    backend.forward([1], GREEDY)  # the prompt
    errors, late, rng = [], [], random.Random(seed)
    for _ in range(trials):
        start = time.perf_counter()
        backend.forward([2], GREEDY, should_cancel=lambda: False)
        errors.append(time.perf_counter() - start - tpot_ms / 1e3)
        backend.crop(1)
        fire = time.perf_counter() + rng.uniform(0, tpot_ms / 1e3)
        try:
            backend.forward([2], GREEDY,
                            should_cancel=lambda fire=fire: time.perf_counter() >= fire)
        except Cancelled:
            late.append(time.perf_counter() - fire)
        else:  # the check fired between the last probe and the end: not a cancellation
            backend.crop(1)
    return {"tpot_ms": tpot_ms, "duration_error_us": _stats(errors), "cancel_late_us": _stats(late)}


def _stats(seconds: list[float]) -> dict | None:
    if not seconds:
        return None
    us = sorted(x * 1e6 for x in seconds)
    return {"median": round(statistics.median(us), 1),
            "p90": round(us[math.ceil(0.9 * len(us)) - 1], 1),
            "max": round(us[-1], 1), "n": len(us)}


def measure(comm: MPI.Comm, poll: str, args: argparse.Namespace) -> dict | None:
    size, rank = comm.Get_size(), comm.Get_rank()
    first_target = 1 if size == 2 else 2
    same_host = len(set(comm.allgather(socket.gethostname()))) == 1
    result: dict = {"poll": poll, "ranks": size}
    rtt = pingpong(comm, first_target, args.pingpong_rounds, args.repeats)
    result["pingpong_us"] = _stats(rtt)
    receive, handle = [], []
    for tpot in (0.01, 1.0):
        config = RunConfig(target=f"emulated:tpot_ms={tpot}", mode="nonsi",
                           max_new_tokens=args.tokens, poll=poll, timeout_s=120.0)
        prompts = [Prompt([1, 2, 3, i]) for i in range(args.repeats)]
        records, events = run_stamped(comm, config, prompts)
        if rank == 0:
            per_token = [r["tpot_s"] for r in records]
            result[f"nonsi_{tpot}ms"] = {"per_token_us": _stats(per_token),
                                         "overhead_us": _stats([x - tpot / 1e3 for x in per_token])}
            r, h = coordinator_costs(events)
            receive += r
            handle += h
    if size >= 3:
        target = f"emulated:tpot_ms={args.dsi_target_ms}"
        drafter = f"emulated:tpot_ms={args.dsi_drafter_ms},acceptance={args.acceptance}"
        config = RunConfig(target=target, drafter=drafter, mode="dsi", lookahead=args.lookahead,
                           max_new_tokens=args.tokens, poll=poll, timeout_s=120.0)
        prompts = [Prompt([1, 2, 3, i]) for i in range(args.repeats)]
        records, events = run_stamped(comm, config, prompts)
        if rank == 0:
            sent, received = commit_latencies(events) if same_host else ([], [])
            result["dsi"] = {"target_tpot_ms": args.dsi_target_ms,
                             "drafter_tpot_ms": args.dsi_drafter_ms,
                             "acceptance": args.acceptance, "lookahead": args.lookahead,
                             "sp": size - 2,
                             "per_token_us": _stats([r["wall_time_s"] / r["num_new_tokens"]
                                                     for r in records]),
                             "commit_sent_us": _stats(sent), "commit_received_us": _stats(received)}
            r, h = coordinator_costs(events)
            result["dsi_coordinator"] = {"receive_us": _stats(r), "handle_us": _stats(h)}
    if rank == 0:
        result["nonsi_coordinator"] = {"receive_us": _stats(receive), "handle_us": _stats(handle)}
    return result if rank == 0 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--polls", default="spin,backoff", help="poll strategies, in order")
    parser.add_argument("--tokens", type=int, default=400, help="tokens per prompt")
    parser.add_argument("--repeats", type=int, default=5, help="timed prompts per measurement")
    parser.add_argument("--pingpong-rounds", type=int, default=2000)
    parser.add_argument("--dsi-target-ms", type=float, default=1.0)
    parser.add_argument("--dsi-drafter-ms", type=float, default=0.1)
    parser.add_argument("--acceptance", type=float, default=0.8)
    parser.add_argument("--lookahead", type=int, default=2)
    parser.add_argument("--forward-trials", type=int, default=200)
    parser.add_argument("--out", help="JSONL (default docs/results/roundtrip-<ranks>.jsonl)")
    parser.add_argument("--markdown", nargs="+", metavar="JSONL",
                        help="print earlier runs as a Markdown table")
    args = parser.parse_args()
    if args.markdown:
        rows = [json.loads(line) for path in args.markdown for line in open(path) if line.strip()]
        print(markdown_table(rows))
        return 0
    comm = MPI.COMM_WORLD
    if comm.Get_size() < 2:
        print("launch with mpiexec -n 2 or more (2: non-SI only; 3 or more: also DSI)",
              file=sys.stderr)
        return 2
    rank = comm.Get_rank()
    auto = poll_strategy(comm, "auto")
    results = []
    for poll in args.polls.split(","):
        result = measure(comm, poll, args)
        if rank == 0:
            result.update(auto_choice=auto, tokens=args.tokens, repeats=args.repeats,
                          commit=git_commit(), host=platform.node(),
                          slurm_job_id=os.environ.get("SLURM_JOB_ID"),
                          time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            results.append(result)
            print(json.dumps(result), flush=True)
    if rank == 0:
        precision = [forward_precision(ms, args.forward_trials) for ms in (1.0, 20.0)]
        print(json.dumps({"emulated_forward": precision}), flush=True)
        for r in results:
            r["emulated_forward"] = precision
        out = Path(args.out or REPO / "docs" / "results" / f"roundtrip-{comm.Get_size()}.jsonl")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in results))
        print(markdown_table(results))
        print(forward_table(precision))
    sleep_until_all_arrive(comm)
    return 0


def _cell(stats: dict | None, key: str = "median") -> str:
    if stats is None:
        return "n/a"
    return f"{stats[key]:.0f}" if stats[key] >= 100 else f"{stats[key]:.1f}"


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| ranks | poll | MPI ping-pong | non-SI 0.01 ms: per token, overhead "
        "| non-SI 1 ms: per token, overhead | DSI commit: told, received (p90) "
        "| coordinator per message: receive, handle (non-SI; DSI) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        a, b = r["nonsi_0.01ms"], r["nonsi_1.0ms"]
        dsi, nc, dc = r.get("dsi"), r["nonsi_coordinator"], r.get("dsi_coordinator")
        commit = (f"{_cell(dsi['commit_sent_us'])} ({_cell(dsi['commit_sent_us'], 'p90')}), "
                  f"{_cell(dsi['commit_received_us'])} ({_cell(dsi['commit_received_us'], 'p90')})"
                  if dsi else "n/a (3+ ranks)")
        coordinator = f"{_cell(nc['receive_us'])}, {_cell(nc['handle_us'])}"
        if dc:
            coordinator += f"; {_cell(dc['receive_us'])}, {_cell(dc['handle_us'])}"
        lines.append(
            f"| {r['ranks']} | {r['poll']} | {_cell(r['pingpong_us'])} "
            f"| {_cell(a['per_token_us'])}, {_cell(a['overhead_us'])} "
            f"| {_cell(b['per_token_us'])}, {_cell(b['overhead_us'])} | {commit} | {coordinator} |")
    return "\n".join(lines) + "\n\nAll times in microseconds, medians (p90 in parentheses)."


def forward_table(precision: list[dict]) -> str:
    lines = ["| emulated forward | duration error: median, p90, max "
             "| cancellation late: median, p90, max |",
             "|---|---|---|"]
    for p in precision:
        d, c = p["duration_error_us"], p["cancel_late_us"]
        lines.append(f"| {p['tpot_ms']} ms | {d['median']}, {d['p90']}, {d['max']} "
                     f"| {c['median']}, {c['p90']}, {c['max']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
