"""``dsi-mpi report OUT.jsonl [more.jsonl] --out DIR``: tables and plots from run records.

Writes ``DIR/report.md`` (also printed) and PNG plots beside it:

- one Markdown table per mode, a row per file and configuration (lookahead, SP): records,
  median and mean wall time, TTFT and TPOT (medians), tokens per second (all tokens over all
  wall time), acceptance rate and mean accepted length (pooled over the records), the share of
  target time wasted and the targets' mean busy fraction (when the records have them);
- speedups of DSI over SI and non-SI, each computed from records of one file only, over the
  prompts (and repeats) both configurations ran: the ratio of mean wall times, the median of
  the per-prompt ratios, and how many of those prompts gave identical tokens;
- ``latency.png`` (wall time per configuration), ``acceptance_by_position.png`` (vLLM's
  per-position acceptance, pooled over the records), and ``latency_vs_lookahead.png`` /
  ``latency_vs_sp.png`` when a mode ran with several lookaheads or SP values.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

MODE_ORDER = ("dsi", "si", "nonsi")
REQUIRED = ("mode", "lookahead", "sp", "prompt_index", "tokens", "num_new_tokens", "wall_time_s",
            "ttft_s", "tpot_s", "accepted", "rejected", "forced")


class ReportError(ValueError):
    """Input the report cannot read (a missing file, a line that is not a record)."""


@dataclass
class Group:
    """The records of one configuration in one file."""

    file: str
    mode: str
    lookahead: int
    sp: int
    records: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.mode == "nonsi":
            return "nonsi"
        return f"{self.mode} k={self.lookahead}" + (f" sp={self.sp}" if self.mode == "dsi" else "")

    def walls(self) -> list[float]:
        return [r["wall_time_s"] for r in self.records]

    def by_prompt(self) -> dict[tuple[int, int], dict]:
        return {(r["prompt_index"], r.get("repeat", 0)): r for r in self.records}

    def acceptance(self) -> tuple[float | None, float | None]:
        """Pooled acceptance rate and mean accepted length (None for non-SI)."""
        if self.mode == "nonsi":
            return None, None
        accepted = sum(r["accepted"] for r in self.records)
        rejected = sum(r["rejected"] for r in self.records)
        forced = sum(r["forced"] for r in self.records)
        rate = accepted / (accepted + rejected) if accepted + rejected else 0.0
        rounds = rejected + forced
        return rate, (accepted + rounds) / rounds if rounds else None

    def per_position(self) -> list[float] | None:
        """vLLM's per-position acceptance pooled over the records (None without the fields)."""
        if self.mode == "nonsi" or not all("blocks_per_position" in r for r in self.records):
            return None
        width = max((len(r["blocks_per_position"]) for r in self.records), default=0)
        accepted, blocks = [0] * width, [0] * width
        for r in self.records:
            for i, n in enumerate(r["blocks_per_position"]):
                blocks[i] += n
            for i, n in enumerate(r["accepted_per_position"]):
                accepted[i] += n
        return [a / b for a, b in zip(accepted, blocks, strict=True) if b] or None


def read(paths: Sequence[str]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for path in paths:
        try:
            with open(path, encoding="utf-8") as fh:
                lines = [line for line in fh if line.strip()]
        except OSError as exc:
            raise ReportError(f"{path}: {exc.strerror or exc}") from None
        for number, line in enumerate(lines, 1):
            try:
                r = json.loads(line)
                missing = [name for name in REQUIRED if name not in r]
                if missing:
                    raise KeyError(", ".join(missing))
                key = (path, r["mode"], int(r["lookahead"]), int(r["sp"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise ReportError(f"{path}, line {number}: not a dsi-mpi run record "
                                  f"(missing or bad {exc})") from None
            groups.setdefault(key, Group(*key)).records.append(r)
    if not groups:
        raise ReportError("no records in " + ", ".join(paths))
    order = {m: i for i, m in enumerate(MODE_ORDER)}
    return sorted(groups.values(),
                  key=lambda g: (paths.index(g.file), order.get(g.mode, 9), g.lookahead, g.sp))


def _fmt(value: float | None, digits: int = 3, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def mode_table(groups: Sequence[Group], many_files: bool) -> str:
    head = ["file"] if many_files else []
    head += ["configuration", "records", "wall median (s)", "wall mean (s)", "TTFT median (ms)",
             "TPOT median (ms)", "tokens/s", "acceptance", "mean accepted length",
             "wasted target time", "target busy (mean)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        rs = g.records
        walls = g.walls()
        tokens = sum(r["num_new_tokens"] for r in rs)
        rate, length = g.acceptance()
        wasted = busy = None
        if all("wasted_target_time_s" in r for r in rs):
            total = sum(r["target_time_s"] for r in rs)
            wasted = sum(r["wasted_target_time_s"] for r in rs) / total if total else 0.0
            busy = statistics.fmean(f for r in rs for f in r["target_busy_fraction"])
        row = [os.path.basename(g.file)] if many_files else []
        row += [g.label, str(len(rs)), _fmt(_median(walls)), _fmt(statistics.fmean(walls)),
                _fmt(_median([r["ttft_s"] for r in rs]), 1, 1e3),
                _fmt(_median([r["tpot_s"] for r in rs]), 2, 1e3),
                _fmt(tokens / sum(walls) if sum(walls) else None, 1), _fmt(rate), _fmt(length, 2),
                "-" if wasted is None else f"{100 * wasted:.1f}%",
                "-" if busy is None else f"{100 * busy:.0f}%"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def speedups(groups: Sequence[Group]) -> list[dict]:
    """DSI over every SI and non-SI configuration of the same file, on the prompts both ran."""
    out = []
    for dsi in (g for g in groups if g.mode == "dsi"):
        for base in (g for g in groups if g.file == dsi.file and g.mode in ("si", "nonsi")):
            mine, theirs = dsi.by_prompt(), base.by_prompt()
            shared = sorted(set(mine) & set(theirs))
            if not shared:
                continue
            ratios = [theirs[k]["wall_time_s"] / mine[k]["wall_time_s"] for k in shared]
            out.append({
                "file": dsi.file, "dsi": dsi.label, "baseline": base.label, "prompts": len(shared),
                "mean_ratio": statistics.fmean(theirs[k]["wall_time_s"] for k in shared)
                / statistics.fmean(mine[k]["wall_time_s"] for k in shared),
                "median_ratio": statistics.median(ratios),
                "identical": sum(theirs[k]["tokens"] == mine[k]["tokens"] for k in shared),
            })
    return out


def speedup_table(rows: Sequence[dict], many_files: bool) -> str:
    head = (["file"] if many_files else []) + ["DSI", "over", "prompts", "speedup (mean wall)",
                                                 "speedup (median per prompt)", "identical tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        row = ([os.path.basename(r["file"])] if many_files else []) + [
            r["dsi"], r["baseline"], str(r["prompts"]), f"{r['mean_ratio']:.2f}x",
            f"{r['median_ratio']:.2f}x", f"{r['identical']}/{r['prompts']}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------- plots


def _name(g: Group, many_files: bool) -> str:
    return f"{os.path.basename(g.file)}: {g.label}" if many_files else g.label


def plot_latency(groups: Sequence[Group], path: str, many_files: bool) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 1.1 * len(groups) + 2), 4))
    ax = fig.add_subplot()
    ax.boxplot([g.walls() for g in groups], showmeans=True)
    ax.set_xticks(range(1, len(groups) + 1), [_name(g, many_files) for g in groups], rotation=20,
                  ha="right", fontsize=8)
    ax.set_ylabel("wall time per generation (s)")
    ax.set_title("Latency per configuration (box: quartiles; triangle: mean)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_acceptance(groups: Sequence[Group], path: str, many_files: bool) -> bool:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    curves = [(g, p) for g in groups if (p := g.per_position())]
    if not curves:
        return False
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for g, p in curves:
        ax.plot(range(1, len(p) + 1), p, marker="o", label=_name(g, many_files))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("draft position in a block")
    ax.set_ylabel("share of blocks with this draft accepted")
    ax.set_ylim(0, 1.02)
    ax.set_title("Acceptance by position (vLLM's definition)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def plot_against(groups: Sequence[Group], knob: str, path: str) -> bool:
    """Median wall time against ``knob`` (lookahead or sp), a line per (file, mode, other knob)
    that ran with at least two values of it."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    other = "sp" if knob == "lookahead" else "lookahead"
    lines: dict[tuple, list[tuple[Any, Any]]] = {}
    for g in groups:
        if g.mode == "nonsi" or (knob == "sp" and g.mode != "dsi"):
            continue
        point = (getattr(g, knob), _median(g.walls()))
        lines.setdefault((g.file, g.mode, getattr(g, other)), []).append(point)
    lines = {k: sorted(v) for k, v in lines.items() if len(v) >= 2}
    if not lines:
        return False
    many_files = len({k[0] for k in lines}) > 1
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for (file, mode, fixed), points in lines.items():
        label = (f"{os.path.basename(file)}: " if many_files else "") + f"{mode}, {other} {fixed}"
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("lookahead" if knob == "lookahead" else "SP (target servers)")
    ax.set_ylabel("median wall time (s)")
    ax.set_title(f"Latency against {'lookahead' if knob == 'lookahead' else 'SP'}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def report(paths: Sequence[str], out_dir: str) -> tuple[str, list[str]]:
    """Write the report; returns its Markdown and the files written."""
    paths = list(paths)
    groups = read(paths)
    many_files = len(paths) > 1
    os.makedirs(out_dir, exist_ok=True)
    parts = [f"# dsi-mpi report\n\nRecords from {', '.join(f'`{p}`' for p in paths)}.\n"]
    for mode in [m for m in MODE_ORDER if any(g.mode == m for g in groups)]:
        table = mode_table([g for g in groups if g.mode == mode], many_files)
        parts.append(f"## {mode}\n\n{table}\n")
    rows = speedups(groups)
    if rows:
        parts.append("## DSI's speedups\n\nEach from one file's records, over the prompts both "
                     "configurations ran.\n\n" + speedup_table(rows, many_files) + "\n")
    written = []
    plots = [("latency.png", "Latency per configuration")]
    plot_latency(groups, os.path.join(out_dir, "latency.png"), many_files)
    if plot_acceptance(groups, os.path.join(out_dir, "acceptance_by_position.png"), many_files):
        plots.append(("acceptance_by_position.png", "Acceptance by position in a block"))
    for knob in ("lookahead", "sp"):
        name = f"latency_vs_{knob}.png"
        if plot_against(groups, knob, os.path.join(out_dir, name)):
            plots.append((name, f"Latency against {knob}"))
    parts.append("## Plots\n\n" + "\n".join(f"![{title}]({name})" for name, title in plots) + "\n")
    written += [os.path.join(out_dir, name) for name, _ in plots]
    markdown = "\n".join(parts)
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w", encoding="utf-8") as fh:
        fh.write(markdown)
    return markdown, [md_path, *written]
