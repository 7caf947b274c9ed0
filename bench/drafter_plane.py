"""DSI against SI and non-SI over the whole plane of drafters: latency ratio x acceptance.

For every cell (drafter TPOT = ratio x target TPOT, acceptance a), in one run on 9 ranks
(coordinator, drafter, 7 targets) with emulated models: each mode at its best lookahead as
the simulator chooses it, the measured median of DSI, SI and non-SI over the same prompts, the
simulator's ideal (free messages) on those prompts, min(SI, non-SI) / DSI measured and
simulated, and runtime / ideal per mode. TTFT equals TPOT for both models.

    mpiexec -n 9 python -m mpi4py bench/drafter_plane.py [--prompts 5] [--tokens 50]
        [--target-tpot-ms 40] [--ratios 0.05,0.1,...] [--acceptances 0.5,0.7,0.9,0.97]
        [--out docs/results/drafter_plane.jsonl]
    python bench/drafter_plane.py --plot docs/results/drafter_plane.jsonl   # table + PNG again

Writes one JSON line per cell (with config, commit, host, Slurm job id), a Markdown table and a
PNG with the measured and the simulated min(SI, non-SI) / DSI side by side, and runtime / ideal.
Targets (docs/design.md, "Forced commits"): measured min(SI, non-SI) / DSI >= 1.0 wherever the
simulator predicts at least 1.05, and DSI's runtime / ideal <= 1.10 in every cell; the script
says which cells miss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, provenance

RATIOS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ACCEPTANCES = (0.5, 0.7, 0.9, 0.97)
SP = 7
MODES = ("dsi", "si", "nonsi")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def plan_cell(tpot: float, ratio: float, acceptance: float, tokens: int,
              sim_repeats: int) -> dict[str, int]:
    """Each mode's best lookahead by the simulator (DSI's sweep includes Eq. 1's)."""
    from dsi_mpi.plan import DEFAULT_LOOKAHEADS, best
    from dsi_mpi.simulate import Latencies, dsi_lookaheads

    lat = Latencies(tpot, ratio * tpot)
    dsi = best("dsi", lat, acceptance, dsi_lookaheads(lat, SP, DEFAULT_LOOKAHEADS), SP, tokens,
               sim_repeats, 0)
    si = best("si", lat, acceptance, DEFAULT_LOOKAHEADS, 1, tokens, sim_repeats, 0)
    return {"dsi": dsi.lookahead, "si": si.lookahead, "nonsi": 1}


def ideal(mode: str, tpot: float, ratio: float, acceptance: float, k: int, tokens: int,
          prompts: list) -> float:
    """Median simulated time (ms) over the very prompts the runtime generated for."""
    from dsi_mpi.simulate import Latencies, simulate_once

    lat = Latencies(tpot, ratio * tpot)
    return statistics.median(
        simulate_once(mode, lat, acceptance, k, SP, tokens, 0, prompt=tuple(p)).latency_ms
        for p in prompts)


def measure(args: argparse.Namespace) -> list[dict]:
    from mpi4py import MPI

    from dsi_mpi.config import RunConfig
    from dsi_mpi.preflight import Prompt
    from dsi_mpi.runtime import Rank0, run

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    prompts = [[1, 2, 3, 100 + i] for i in range(args.prompts)]
    results = []
    for acceptance in args.acceptances:
        for ratio in args.ratios:
            tpot = args.target_tpot_ms
            ks = (plan_cell(tpot, ratio, acceptance, args.tokens, args.sim_repeats)
                  if rank == 0 else None)
            ks = comm.bcast(ks, root=0)
            drafter_ms = round(ratio * tpot, 4)
            base = RunConfig(target=f"emulated:tpot_ms={tpot}",
                             drafter=f"emulated:tpot_ms={drafter_ms},acceptance={acceptance}",
                             mode="dsi", lookahead=ks["dsi"], sp=SP, max_new_tokens=args.tokens,
                             timeout_s=120.0)
            configs = [base, replace(base, mode="si", lookahead=ks["si"], sp=None),
                       replace(base, mode="nonsi", sp=None)]
            comm.Barrier()
            outcome = run(comm, configs, Rank0([Prompt(p) for p in prompts], warmup=1))
            if rank != 0:
                continue
            by_mode = {m: [r for r in outcome.records if r["mode"] == m] for m in MODES}
            measured = {m: statistics.median(r["wall_time_s"] * 1e3 for r in by_mode[m])
                        for m in MODES}
            best_ideal = {m: ideal(m, tpot, ratio, acceptance, ks[m], args.tokens, prompts)
                          for m in MODES}
            dsi = by_mode["dsi"]
            committed = sum(r["num_new_tokens"] for r in dsi)
            result = {
                "ratio": ratio, "acceptance": acceptance, "target_tpot_ms": tpot,
                "drafter_tpot_ms": drafter_ms,
                "lookahead": ks, "sp": SP, "tokens": args.tokens, "prompts": args.prompts,
                "measured_median_ms": measured, "ideal_median_ms": best_ideal,
                "measured_speedup": min(measured["si"], measured["nonsi"]) / measured["dsi"],
                "ideal_speedup": min(best_ideal["si"], best_ideal["nonsi"]) / best_ideal["dsi"],
                "runtime_over_ideal": {m: measured[m] / best_ideal[m] for m in MODES},
                "dsi_accepted_share": sum(r["accepted"] for r in dsi) / committed,
                "dsi_forced_share": sum(r["forced"] for r in dsi) / committed,
                "identical_tokens": len({tuple(r["tokens"]) for r in outcome.records
                                         if r["prompt_index"] == 0}) == 1,
                **provenance(comm.Get_size()),
            }
            results.append(result)
            print(json.dumps(result), flush=True)
    return results


def misses(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        cell = f"ratio {r['ratio']}, acceptance {r['acceptance']}"
        if r["ideal_speedup"] >= 1.05 and r["measured_speedup"] < 1.0:
            out.append(f"{cell}: measured min(SI, non-SI)/DSI {r['measured_speedup']:.3f} < 1.0 "
                       f"(simulated {r['ideal_speedup']:.3f})")
        if r["runtime_over_ideal"]["dsi"] > 1.10:
            out.append(f"{cell}: DSI runtime/ideal {r['runtime_over_ideal']['dsi']:.3f} > 1.10")
        if not r["identical_tokens"]:
            out.append(f"{cell}: the modes gave different tokens")
    return out


def markdown(results: list[dict]) -> str:
    lines = ["| drafter/target | acceptance | k DSI / SI | DSI ms | SI ms | non-SI ms "
             "| DSI ideal ms | min(SI, non-SI)/DSI measured | simulated "
             "| runtime/ideal DSI, SI, non-SI | DSI accepted share |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["acceptance"], r["ratio"])):
        m, i, q = r["measured_median_ms"], r["ideal_median_ms"], r["runtime_over_ideal"]
        lines.append(f"| {r['ratio']:.2f} | {r['acceptance']:.2f} "
                     f"| {r['lookahead']['dsi']} / {r['lookahead']['si']} "
                     f"| {m['dsi']:.0f} | {m['si']:.0f} | {m['nonsi']:.0f} | {i['dsi']:.0f} "
                     f"| {r['measured_speedup']:.2f} | {r['ideal_speedup']:.2f} "
                     f"| {q['dsi']:.3f}, {q['si']:.3f}, {q['nonsi']:.3f} "
                     f"| {r['dsi_accepted_share']:.2f} |")
    return "\n".join(lines)


def plot(results: list[dict], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ratios = sorted({r["ratio"] for r in results})
    accs = sorted({r["acceptance"] for r in results})
    grids = {key: np.full((len(accs), len(ratios)), np.nan)
             for key in ("measured", "ideal", "overhead")}
    for r in results:
        i, j = accs.index(r["acceptance"]), ratios.index(r["ratio"])
        grids["measured"][i, j] = r["measured_speedup"]
        grids["ideal"][i, j] = r["ideal_speedup"]
        grids["overhead"][i, j] = r["runtime_over_ideal"]["dsi"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2), constrained_layout=True)
    titles = {"measured": "measured min(SI, non-SI) / DSI (MPI, 9 ranks)",
              "ideal": "simulated min(SI, non-SI) / DSI (ideal)", "overhead": "DSI runtime / ideal"}
    top = max(np.nanmax(grids["measured"]), np.nanmax(grids["ideal"]))
    for ax, key in zip(axes, ("measured", "ideal", "overhead"), strict=True):
        if key == "overhead":
            image = ax.imshow(grids[key], origin="lower", cmap="magma_r", vmin=1.0,
                              vmax=max(1.2, np.nanmax(grids[key])), aspect="auto")
        else:
            image = ax.imshow(grids[key], origin="lower", cmap="viridis",
                              vmin=min(0.9, np.nanmin(grids[key])), vmax=top, aspect="auto")
        for i in range(len(accs)):
            for j in range(len(ratios)):
                ax.text(j, i, f"{grids[key][i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if key != "overhead" else "black")
        ax.set_xticks(range(len(ratios)), [f"{x:g}" for x in ratios])
        ax.set_yticks(range(len(accs)), [f"{x:g}" for x in accs])
        ax.set_xlabel("drafter TPOT / target TPOT")
        ax.set_ylabel("acceptance rate")
        ax.set_title(titles[key], fontsize=10)
        fig.colorbar(image, ax=ax)
    fig.savefig(png, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=5,
                        help="prompts per mode and cell (after one warm-up)")
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--target-tpot-ms", type=float, default=40.0)
    parser.add_argument("--ratios", type=_floats, default=RATIOS)
    parser.add_argument("--acceptances", type=_floats, default=ACCEPTANCES)
    parser.add_argument("--sim-repeats", type=int, default=20,
                        help="simulated runs per lookahead when planning")
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "drafter_plane.jsonl"))
    parser.add_argument("--plot", metavar="JSONL", help="table and PNG from an earlier run's JSONL")
    args = parser.parse_args()
    if args.plot:
        with open(args.plot) as fh:
            results = [json.loads(line) for line in fh if line.strip()]
        out = args.plot
    else:
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_size() != 2 + SP:
            if MPI.COMM_WORLD.Get_rank() == 0:
                print(f"launch with mpiexec -n {2 + SP} (coordinator, drafter, {SP} targets)",
                      file=sys.stderr)
            return 2
        results = measure(args)
        if MPI.COMM_WORLD.Get_rank() != 0:
            return 0
        out = args.out
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in results)
    print(markdown(results))
    plot(results, str(Path(out).with_suffix(".png")))
    missed = misses(results)
    print(f"\n{len(results)} cells; {len(missed)} miss a target"
          + "".join(f"\n  {m}" for m in missed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
