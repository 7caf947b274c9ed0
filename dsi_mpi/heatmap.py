"""The paper's Figure 2: speedups over a grid of drafter latency x acceptance rate.

Each cell simulates non-SI, SI and DSI (SP = 7 by default), SI and DSI each at their best
lookahead from a sweep, with the same acceptance draws for all three (common random numbers),
and records non-SI/SI, SI/DSI, non-SI/DSI and min(SI, non-SI)/DSI. Rows run in parallel
processes.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from dsi_mpi.plan import best
from dsi_mpi.simulate import Latencies, dsi_lookaheads, simulate

PANELS = (
    ("nonsi_over_si", "non-SI / SI"),
    ("si_over_dsi", "SI / DSI"),
    ("nonsi_over_dsi", "non-SI / DSI"),
    ("baseline_over_dsi", "min(SI, non-SI) / DSI"),
)


def _row(args: tuple) -> list[dict]:
    fraction, acceptances, sp, tokens, repeats, lookaheads, seed = args
    lat = Latencies(target_tpot_ms=1.0, drafter_tpot_ms=fraction)
    out = []
    for a in acceptances:
        nonsi = simulate("nonsi", lat, a, 1, 1, tokens, repeats, seed).mean_ms
        si = best("si", lat, a, lookaheads, 1, tokens, repeats, seed)
        # DSI's sweep includes Eq. 1's lookahead, the smallest for which SP servers suffice.
        dsi = best("dsi", lat, a, dsi_lookaheads(lat, sp, lookaheads), sp, tokens, repeats, seed)
        out.append({
            "drafter_fraction": fraction, "acceptance": a, "nonsi_ms": nonsi,
            "si_ms": si.mean_ms, "si_lookahead": si.lookahead, "dsi_ms": dsi.mean_ms,
            "dsi_lookahead": dsi.lookahead, "nonsi_over_si": nonsi / si.mean_ms,
            "si_over_dsi": si.mean_ms / dsi.mean_ms, "nonsi_over_dsi": nonsi / dsi.mean_ms,
            "baseline_over_dsi": min(si.mean_ms, nonsi) / dsi.mean_ms,
        })
    return out


def compute(grid: int = 101, sp: int = 7, tokens: int = 50, repeats: int = 1, seed: int = 0,
            lookaheads: Sequence[int] = (1, 2, 3, 5, 7, 10),
            workers: int | None = None) -> list[dict]:
    """Cells for drafter latency in [0.01, 1] (fraction of the target's) x acceptance in [0, 1]."""
    fractions = np.linspace(0.01, 1.0, grid)
    acceptances = [float(a) for a in np.linspace(0.0, 1.0, grid)]
    jobs = [(float(f), acceptances, sp, tokens, repeats, tuple(lookaheads), seed)
            for f in fractions]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        rows = list(pool.map(_row, jobs))
    return [cell for row in rows for cell in row]


def write_csv(cells: Sequence[dict], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(cells[0]))
        writer.writeheader()
        writer.writerows(cells)


def plot(cells: Sequence[dict], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    fractions = sorted({c["drafter_fraction"] for c in cells})
    acceptances = sorted({c["acceptance"] for c in cells})
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6), constrained_layout=True)
    for ax, (key, label) in zip(axes, PANELS, strict=True):
        grid = np.zeros((len(acceptances), len(fractions)))
        index = {(c["drafter_fraction"], c["acceptance"]): c[key] for c in cells}
        for i, a in enumerate(acceptances):
            for j, f in enumerate(fractions):
                grid[i, j] = index[(f, a)]
        vmax = max(float(grid.max()), 1.0001)
        vmin = min(float(grid.min()), 0.9999)
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="RdBu",
                          extent=(fractions[0], fractions[-1], acceptances[0], acceptances[-1]),
                          norm=TwoSlopeNorm(vcenter=1.0, vmin=vmin, vmax=vmax))
        ax.contour(fractions, acceptances, grid, levels=[1.0], colors="k", linewidths=0.8)
        ax.set_title(f"{label} (max {grid.max():.2f}x, min {grid.min():.2f}x)")
        ax.set_xlabel("drafter latency / target latency")
        ax.set_ylabel("acceptance rate")
        fig.colorbar(image, ax=ax, shrink=0.85)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out_prefix: str, grid: int = 101, sp: int = 7, tokens: int = 50, repeats: int = 1,
        seed: int = 0, lookaheads: Sequence[int] = (1, 2, 3, 5, 7, 10),
        workers: int | None = None) -> dict:
    started = time.perf_counter()
    cells = compute(grid, sp, tokens, repeats, seed, lookaheads, workers)
    elapsed = time.perf_counter() - started
    write_csv(cells, out_prefix + ".csv")
    plot(cells, out_prefix + ".png",
         f"dsi_mpi simulator: SP={sp}, {tokens} tokens, "
         f"best lookahead of {list(lookaheads)}, {repeats} repeat(s)")
    summary = {key: {"min": min(c[key] for c in cells), "max": max(c[key] for c in cells)}
               for key, _ in PANELS}
    return {"grid": grid, "cells": len(cells), "seconds": elapsed, "csv": out_prefix + ".csv",
            "png": out_prefix + ".png", "summary": summary}
