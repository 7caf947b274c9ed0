"""``dsi-mpi timeline FILE.json --out timeline.png``: one generation of a trace as a Gantt chart.

One row per rank (coordinator on top, then the drafter, then the target servers). Each forward
is a bar coloured by its outcome (hatched: a prefill); the coordinator's row shows each commit
as a tick, and a faint line runs down the chart at every commit; crosses mark cancels (sent on
rank 0, noticed on a target) and triangles rollbacks (sent, then applied by the drafter). The
trace comes from ``dsi-mpi run --trace`` (:mod:`dsi_mpi.trace`).
"""

from __future__ import annotations

import json
from typing import Any

COLOURS = {
    "accepted": "#2ca02c",
    "rejected": "#ff7f0e",
    "late": "#bcbd22",
    "unused": "#9ecae1",
    "stale": "#8c8c8c",
    "cancelled": "#d62728",
    "preempted": "#d62728",
}
EXPLAIN = {
    "accepted": "accepted (committed)",
    "rejected": "rejected: its correction committed",
    "late": "draft came after its position was committed",
    "unused": "unused (built on committed text)",
    "stale": "stale (built on a rejected draft)",
    "cancelled": "cancelled part-way",
    "preempted": "draft preempted part-way",
}


class TraceError(ValueError):
    """The trace cannot give what was asked (no such generation, not a dsi-mpi trace)."""


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    if not isinstance(doc, dict) or "generations" not in doc.get("otherData", {}):
        raise TraceError(f"{path}: not a trace written by dsi-mpi run --trace")
    return doc


def choose(doc: dict, prompt: int | None = None, mode: str | None = None,
           repeat: int | None = None) -> dict:
    """The generation asked for: the first timed (not warm-up) one that matches."""
    generations = doc["otherData"]["generations"]
    matches = [g for g in generations if not g["warmup"]
               and (prompt is None or g["prompt"] == prompt) and (mode is None or g["mode"] == mode)
               and (repeat is None or g["repeat"] == repeat)]
    if not matches:
        have = sorted({(g["mode"], g["prompt"]) for g in generations if not g["warmup"]})
        raise TraceError(f"no generation with prompt {prompt}, mode {mode}, repeat {repeat} in the "
                         "trace; "
                         f"it has (mode, prompt): {have}")
    return matches[0]


def rows(doc: dict) -> list[tuple[int, str]]:
    """(rank, name) of every process, in rank order."""
    names = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"]
             if e["ph"] == "M" and e["name"] == "process_name"}
    return sorted(names.items())


def events_of(doc: dict, generation: int) -> list[dict]:
    return [e for e in doc["traceEvents"]
            if e["ph"] != "M" and e["args"].get("generation") == generation]


def draw(doc: dict, out: str, prompt: int | None = None, mode: str | None = None,
         repeat: int | None = None,
         width: float = 12.0) -> dict:
    """Draw one generation to ``out`` (PNG); returns the generation drawn."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    gen = choose(doc, prompt, mode, repeat)
    origin = gen["start_us"]
    lanes = rows(doc)
    y_of = {rank: len(lanes) - 1 - i for i, (rank, _) in enumerate(lanes)}  # coordinator on top
    events = events_of(doc, gen["generation"])
    fig = Figure(figsize=(width, 1.2 + 0.55 * len(lanes)))
    ax = fig.add_subplot()
    seen: set[str] = set()
    right = (gen["end_us"] - origin) / 1e3

    def ms(us: float) -> float:
        return (us - origin) / 1e3

    for e in events:
        y, name, args = y_of[e["pid"]], e["name"], e["args"]
        if e["ph"] == "X" and name in ("prefill", "draft", "verify"):
            outcome = args.get("outcome", "stale")
            ax.broken_barh([(ms(e["ts"]), e["dur"] / 1e3)], (y - 0.35, 0.7),
                           facecolors=COLOURS.get(outcome, "k"), edgecolors="white", linewidth=0.5,
                           hatch="///" if name == "prefill" else None)
            seen.add(outcome)
            right = max(right, ms(e["ts"] + e["dur"]))
        elif e["ph"] == "X" and name == "commit":
            t = ms(e["ts"] + e["dur"])
            ax.axvline(t, color="k", alpha=0.12, linewidth=0.8, zorder=0)
            ax.plot([t], [y], marker="|", markersize=14, color="k", markeredgewidth=1.5)
        elif e["ph"] == "i" and name == "cancel":
            ax.plot([ms(e["ts"])], [y + 0.3], marker="x", markersize=6, color="#d62728",
                    markeredgewidth=1.5)
            right = max(right, ms(e["ts"]))
        elif e["ph"] == "i" and name == "rollback":
            ax.plot([ms(e["ts"])], [y - 0.3], marker="^", markersize=6, color="#9467bd")
    ax.set_yticks([y_of[rank] for rank, _ in lanes], [name for _, name in lanes])
    ax.set_ylim(-0.6, len(lanes) - 0.4)
    ax.set_xlim(0, right * 1.01 if right > 0 else 1)
    ax.set_xlabel("time since the prompt began (ms)")
    wall_ms = (gen["end_us"] - gen["start_us"]) / 1e3
    detail = f"lookahead {gen['lookahead']}, SP {gen['sp']}"
    if gen["mode"] == "nonsi":
        detail = "one target"
    ax.set_title(f"{gen['mode']} ({detail}), prompt {gen['prompt']}, repeat {gen['repeat']}: "
                 f"{gen['tokens']} tokens in {wall_ms:.1f} ms; {gen['accepted']} drafts accepted, "
                 f"{gen['rejected']} rejected, "
                 f"{gen['target_forwards']} target forwards finished", fontsize=10)
    ax.axvline(wall_ms, color="k", linestyle="--", linewidth=0.8)
    handles: list[Any] = [Patch(facecolor=COLOURS[o], label=EXPLAIN[o])
                          for o in COLOURS if o in seen]
    handles.append(Patch(facecolor="white", edgecolor="k", hatch="///", label="prefill"))
    handles += [ax.plot([], [], marker=m, linestyle="", color=c, label=label)[0]
                for m, c, label in (("|", "k", "commit"), ("x", "#d62728", "cancel"),
                                    ("^", "#9467bd", "rollback"))]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18 - 0.25 / len(lanes)),
              ncol=5,
              fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    note = doc["otherData"].get("clock_note", "")
    fig.text(0.99, 0.005, note, ha="right", va="bottom", fontsize=6, alpha=0.6)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return gen

