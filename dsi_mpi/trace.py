"""Per-rank traces of a run on one clock (``dsi-mpi run --trace FILE.json``).

Off by default: every role loop holds :data:`NO_TRACE`, whose methods do nothing. With
``--trace`` each rank records into a :class:`Recorder`, in memory (a tuple per event, no I/O),
and at the end the events are gathered on rank 0, which joins them with what only it knows
and writes one Chrome trace-event file (it opens in https://ui.perfetto.dev and
chrome://tracing; ``dsi-mpi timeline`` draws one generation of it).

Events (``X``: a complete event with a duration; ``i``: an instant), one process per rank:

- coordinator: ``generate`` (one prompt, from its first message to its last token), ``commit``
  (handling a message that committed tokens), ``cancel`` and ``rollback`` (sent);
- drafter: ``prefill`` and ``draft`` (a forward: epoch, position, token, outcome), ``start``,
  ``rollback`` and ``stop`` (applied);
- target: ``prefill`` (a forward on an empty cache) and ``verify`` (task, epoch, keep, tokens
  fed, first position, outcome), ``cancel`` (noticed; ``late`` when its task was answered).

The outcome of a forward is known to the coordinator alone, so rank 0 joins it in by task id
(target: accepted, rejected, unused, stale or cancelled: :data:`dsi_mpi.metrics.TARGET_OUTCOMES`)
and by (epoch, position) (drafter: accepted, rejected, late, stale, or preempted). Epochs and
task ids grow across the whole run, so they also say which generation an event belongs to:
every event gets ``prompt``, ``mode``, ``repeat``, ``warmup`` and ``generation`` (the n-th
generation of the run) in its args.

One clock: each rank times with ``time.perf_counter``; when the trace starts, and again before
it is gathered, rank 0 measures every rank's offset by ping-pong (Cristian's method: the best
of 20 round trips, uncertain by half of it; :func:`dsi_mpi.clocks.offset`).
Times are mapped to rank 0's clock with the offset interpolated linearly between the two
measurements, which also corrects a steady drift. The file records each rank's offset, its
uncertainty and the drift (``otherData.clock``).
"""

from __future__ import annotations

import bisect
import json
import time
from collections.abc import Sequence
from typing import Any, Protocol

from dsi_mpi.protocol import Cancel, Cancelled, Message, Rollback, Start, Stop, Verify

ROUNDS = 20  # ping-pongs per rank and alignment


class _Clock(Protocol):
    def clock_offset(self, rounds: int = ROUNDS) -> tuple[float, float]: ...


class Recorder:
    """This rank's events, buffered in memory; ``enabled`` is False for :data:`NO_TRACE`."""

    enabled = True

    def __init__(self, rank: int = 0, role: str = "", offset_s: float = 0.0,
                 uncertainty_s: float = 0.0) -> None:
        self.rank, self.role = rank, role
        # (ph, name, t, dur, args)
        self.events: list[tuple[str, str, float, float, dict[str, Any]]] = []
        self.prompts: list[dict[str, Any]] = []  # rank 0: one entry per generation
        self.sync = {"t_start": self.now(), "offset_start": offset_s,
                     "uncertainty_start": uncertainty_s}

    now = staticmethod(time.perf_counter)

    def complete(self, name: str, start: float, end: float, **args: Any) -> None:
        self.events.append(("X", name, start, end - start, args))

    def instant(self, name: str, when: float | None = None, **args: Any) -> None:
        self.events.append(("i", name, self.now() if when is None else when, 0.0, args))

    # ------------------------------------------------------------ hooks, one per role loop

    def target_forward(self, msg: Verify, reply: Message, start: float, end: float) -> None:
        self.complete("prefill" if msg.keep == 0 else "verify", start, end, task=msg.task_id,
                      epoch=msg.epoch, keep=msg.keep, fed=len(msg.tokens),
                      first_position=msg.first_position,
                      outcome="cancelled" if isinstance(reply, Cancelled) else "done")

    def target_cancel(self, msg: Cancel, late: bool) -> None:
        self.instant("cancel", task=msg.task_id, epoch=msg.epoch, late=late)

    def drafter_forward(self, cold: bool, epoch: int, position: int, token: int | None,
                        start: float, end: float) -> None:
        self.complete("prefill" if cold else "draft", start, end, epoch=epoch, position=position,
                      token=token, outcome="preempted" if token is None else "done")

    def drafter_message(self, msg: Message) -> None:
        if isinstance(msg, Start):
            self.instant("start", epoch=msg.epoch, prompt_tokens=len(msg.prompt))
        elif isinstance(msg, Rollback):
            self.instant("rollback", epoch=msg.epoch, keep=msg.keep, forced=len(msg.forced))
        elif isinstance(msg, Stop):
            self.instant("stop", epoch=msg.epoch)

    def coordinator_step(self, received: float, actions: Sequence[tuple[int, Message]],
                         committed: int | None, policy: Any | None) -> None:
        """The coordinator handled one message (received at ``received``) and sent ``actions``;
        ``committed``: the output's length before, so a commit shows as an event."""
        end = self.now()
        if policy is not None and committed is not None and len(policy.output) > committed:
            self.complete("commit", received, end, epoch=policy.epoch,
                          tokens=len(policy.output) - committed, committed=len(policy.output))
        for to, msg in actions:
            if isinstance(msg, Cancel):
                self.instant("cancel", end, task=msg.task_id, epoch=msg.epoch, server=to)
            elif isinstance(msg, Rollback):
                self.instant("rollback", end, epoch=msg.epoch, keep=msg.keep)

    def generation(self, result: Any, **labels: Any) -> None:
        """Rank 0, after each generation (``result``: a coordinator's PromptResult): what the
        join needs, and the ``generate`` event. ``labels``: mode, prompt, repeat, warmup, ..."""
        policy = result.policy
        labels["generation"] = len(self.prompts)
        self.prompts.append({
            "labels": labels, "epochs": policy.epochs, "tasks": policy.task_outcomes(),
            "drafts": policy.draft_outcomes(), "start": result.start, "end": result.end,
            "tokens": len(result.tokens), "counters": policy.counters.as_dict(),
        })
        self.complete("generate", result.start, result.end, **labels, tokens=len(result.tokens))

    # ------------------------------------------------------------ the end

    def part(self, offset_s: float, uncertainty_s: float) -> dict[str, Any]:
        """What this rank sends to rank 0: its events and both clock measurements."""
        sync = dict(self.sync, t_end=self.now(), offset_end=offset_s, uncertainty_end=uncertainty_s)
        return {"rank": self.rank, "role": self.role, "events": self.events,
                "prompts": self.prompts, "sync": sync}


class _NoTrace(Recorder):
    """Tracing off: every hook returns at once (each takes what its Recorder twin takes)."""

    enabled = False

    def __init__(self) -> None:
        self.events, self.prompts = [], []

    def _nothing(self, *args: Any, **kwargs: Any) -> None:
        pass

    complete = instant = target_forward = target_cancel = drafter_forward = _nothing
    drafter_message = coordinator_step = generation = _nothing


NO_TRACE: Recorder = _NoTrace()


def start(transport: _Clock, rank: int, role: str) -> Recorder:
    """A recorder for this rank, its clock aligned with rank 0's (collective)."""
    offset, uncertainty = transport.clock_offset(ROUNDS)
    return Recorder(rank, role, offset, uncertainty)


# ----------------------------------------------------------------- rank 0: the file


def _role_names(parts: Sequence[dict]) -> dict[int, str]:
    names, targets = {}, 0
    for part in sorted(parts, key=lambda p: p["rank"]):
        role = part["role"]
        if role == "target":
            targets += 1
            role = f"target {targets}"
        names[part["rank"]] = f"{role} (rank {part['rank']})"
    return names


def _mapping(sync: dict) -> tuple[float, float, float]:
    """(t0, offset at t0, drift per second): local time t maps to t + offset0 + drift * (t - t0)."""
    span = sync["t_end"] - sync["t_start"]
    drift = (sync["offset_end"] - sync["offset_start"]) / span if span > 0 else 0.0
    return sync["t_start"], sync["offset_start"], drift


class _Join:
    """Which generation an event belongs to (by task id or epoch), and the outcomes."""

    def __init__(self, prompts: Sequence[dict]) -> None:
        self.prompts = sorted(prompts, key=lambda p: p["epochs"][0])
        self.first_epochs = [p["epochs"][0] for p in self.prompts]
        self.by_task = {task: p for p in self.prompts for task in p["tasks"]}

    def find(self, args: dict) -> dict | None:
        if "task" in args and args["task"] in self.by_task:
            return self.by_task[args["task"]]
        if "epoch" in args:
            i = bisect.bisect_right(self.first_epochs, args["epoch"]) - 1
            if i >= 0 and args["epoch"] <= self.prompts[i]["epochs"][1]:
                return self.prompts[i]
        return None

    def annotate(self, role: str, args: dict) -> dict:
        if "generation" in args:  # rank 0's generate: labelled when it was made
            return args
        prompt = self.find(args)
        out = dict(args)
        if prompt is not None:
            out.update(prompt["labels"])
            if out.get("outcome") == "done":
                if role == "target":
                    out["outcome"] = prompt["tasks"].get(args["task"], "stale")
                else:
                    draft = (args["epoch"], args["position"])
                    out["outcome"] = prompt["drafts"].get(draft, "stale")
        else:
            out.update(prompt=None, mode=None)
        return out


def chrome(parts: Sequence[dict], meta: dict | None = None) -> dict:
    """The Chrome trace-event document for the gathered ``parts`` (one per rank)."""
    by_rank = {p["rank"]: p for p in parts}
    origin_t, origin_offset, _ = _mapping(by_rank[0]["sync"])
    origin = origin_t + origin_offset
    join = _Join(by_rank[0]["prompts"])
    names = _role_names(parts)
    events: list[dict] = []
    clock = []
    for rank in sorted(by_rank):
        part = by_rank[rank]
        t0, offset0, drift = _mapping(part["sync"])
        sync = part["sync"]
        clock.append({"rank": rank, "role": names[rank], "offset_us": offset0 * 1e6,
                      "uncertainty_us": 1e6 * max(sync["uncertainty_start"],
                                                  sync["uncertainty_end"]),
                      "drift_us": (sync["offset_end"] - sync["offset_start"]) * 1e6})
        events.append({"ph": "M", "name": "process_name", "pid": rank, "tid": 0,
                       "args": {"name": names[rank]}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0,
                       "args": {"sort_index": rank}})
        for ph, name, t, dur, args in part["events"]:
            ts = (t + offset0 + drift * (t - t0) - origin) * 1e6
            event = {"ph": ph, "name": name, "cat": part["role"], "pid": rank, "tid": 0,
                     "ts": round(ts, 3), "args": join.annotate(part["role"], args)}
            if ph == "X":
                event["dur"] = round(dur * 1e6, 3)
            else:
                event["s"] = "p"  # an instant marks its process's row
            events.append(event)
    prompts = []
    for p in join.prompts:
        prompts.append({**p["labels"], "tokens": p["tokens"],
                        "start_us": round((p["start"] - origin) * 1e6, 3),
                        "end_us": round((p["end"] - origin) * 1e6, 3),
                        "target_forwards": p["counters"]["target_forwards"],
                        "accepted": p["counters"]["accepted"],
                        "rejected": p["counters"]["rejected"]})
    worst = max((c["uncertainty_us"] for c in clock), default=0.0)
    other = {
        "clock": clock,
        "clock_note": ("every rank's perf_counter mapped to rank 0's by ping-pong at the start "
                       f"and the end (best of {ROUNDS} round trips each): aligned within "
                       f"+-{worst:.1f} us"),
        "generations": prompts,
        **(meta or {}),
    }
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}


def write(path: str, parts: Sequence[dict], meta: dict | None = None) -> dict:
    """Write the trace file; returns its document."""
    doc = chrome(parts, meta)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, separators=(",", ":"))
        fh.write("\n")
    return doc


def gather(recorder: Recorder, transport: Any) -> list[dict] | None:
    """Collective, after the run: the clocks measured again and every rank's events on rank 0
    (None elsewhere). A bounded barrier first, so a rank that failed aborts it, never hangs it."""
    transport.barrier("every rank to finish the run, to gather the trace")
    offset, uncertainty = transport.clock_offset(ROUNDS)
    return transport.gather(recorder.part(offset, uncertainty))
