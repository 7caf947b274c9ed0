"""Real weights, predicted: DSI, SI and non-SI on Qwen2.5-Coder-1.5B drafted by its 0.5B sibling,
against the simulator's prediction from a profile of the same prompts.

    OMP_NUM_THREADS=1 mpiexec -n 3 python -m mpi4py bench/real_pair.py --profile FILE.json \\
        [--num-prompts 10] [--max-new-tokens 32] [--out FILE.jsonl]

``FILE.json`` is ``dsi-mpi profile`` of the same pair on the same prompts (HumanEval's first
``--num-prompts``), the same number of tokens and the same threads per rank. Rank 0 asks the
planner for the lookaheads at this rank count (``make_plan`` with one GPU per model rank: DSI's
and SI's best lookahead, within the profile's cost curve, and DSI's ``min_drafts``), predicts
each mode's time per prompt with the simulator (that prompt's TTFTs and acceptance, the
profile's cost curves, the shared latencies where the other model runs at once; 20 seeds each),
then the three modes run on the ranks (coordinator, drafter, targets) after one untimed warm-up
prompt each, and rank 0 runs ``generate`` (greedy, float32) as the reference for every prompt.

Printed and appended to ``--out`` (one JSON line per mode and one summary line): each mode's
median and mean wall time per prompt, the prediction's mean, runtime over prediction, prompts
identical to ``generate``, and DSI's ratios over SI and non-SI (from this one run).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, provenance
from bench.modes import first_difference, reference
from dsi_mpi.config import RunConfig
from dsi_mpi.runtime import Rank0, run

MODES = ("dsi", "si", "nonsi")
REPEATS = 20


def prompt_latencies(lat, entry: dict):  # a simulate.Latencies for one prompt
    """The profile's latencies with this prompt's TTFTs (alone and shared)."""
    shared = lat.shared
    if shared is not None and entry.get("target_ttft_shared_ms") is not None:
        shared = replace(shared, target_ttft_ms=entry["target_ttft_shared_ms"],
                         drafter_ttft_ms=entry["drafter_ttft_shared_ms"])
    return replace(lat, target_ttft_ms=entry["target_ttft_ms"],
                   drafter_ttft_ms=entry["drafter_ttft_ms"], shared=shared)


def predict(profile_path: str, ranks: int, tokens: int) -> dict:
    """The planner's lookaheads for ``ranks`` ranks and the simulator's time per mode and
    prompt (ms) from the profile."""
    from dsi_mpi.plan import from_profile, make_plan
    from dsi_mpi.simulate import simulate

    lat, acceptance = from_profile(profile_path)
    data = json.loads(Path(profile_path).read_text())
    # the planner's sweep, within what the cost curve covers (plan.within_curve: DSI's tasks at
    # SP 1 reach 2k + 1 tokens, SI's k + 1), as `dsi-mpi plan --profile` weighs them
    plan = make_plan(lat, acceptance, ranks - 1, tokens, REPEATS)
    lookahead = {"dsi": plan.lookahead, "si": plan.si_lookahead, "nonsi": 1}
    per_prompt = {mode: [] for mode in MODES}
    for entry in data["per_prompt"]:
        lat_i = prompt_latencies(lat, entry)
        for mode in MODES:
            summary = simulate(mode, lat_i, entry["acceptance"], lookahead[mode], ranks - 2,
                               tokens, REPEATS,
                               min_drafts=plan.min_drafts if mode == "dsi" else 1)
            per_prompt[mode].append(summary.mean_ms)
    return {"plan": plan.as_dict(), "lookahead": lookahead, "predicted_ms": per_prompt,
            "acceptance": acceptance}


def summarise(records: list[dict], expected: list[list[int]], prediction: dict,
              meta: dict) -> list[dict]:
    rows, means = [], {}
    for mode in MODES:
        mine = sorted((r for r in records if r["mode"] == mode), key=lambda r: r["prompt_index"])
        walls = [r["wall_time_s"] for r in mine]
        predicted = prediction["predicted_ms"][mode][: len(mine)]
        means[mode] = statistics.fmean(walls)
        firsts = [first_difference(r["tokens"], expected[r["prompt_index"]]) for r in mine]
        rows.append({
            "bench": "real_pair", "mode": mode, **meta, "prompts": len(mine),
            "lookahead": mine[0]["lookahead"], "min_drafts": mine[0].get("min_drafts", 1),
            "sp": mine[0]["sp"],
            "identical": sum(f is None for f in firsts), "first_difference": firsts,
            "median_s": round(statistics.median(walls), 3), "mean_s": round(means[mode], 3),
            "predicted_mean_s": round(statistics.fmean(predicted) / 1e3, 3),
            "runtime_over_prediction": round(means[mode] * 1e3 / statistics.fmean(predicted), 3),
            "acceptance": (statistics.fmean(r["acceptance_rate"] for r in mine)
                           if mode != "nonsi" else None),
            "forced": sum(r["forced"] for r in mine),
            "verifications_sent": sum(r["verifications_sent"] for r in mine),
            "verifications_cancelled": sum(r["verifications_cancelled"] for r in mine),
            "wall_s_per_prompt": [round(w, 3) for w in walls],
        })
    predicted = {m: statistics.fmean(prediction["predicted_ms"][m]) for m in MODES}
    rows.append({"bench": "real_pair", "mode": "summary", **meta,
                 "plan": prediction["plan"], "profile_acceptance": prediction["acceptance"],
                 "si_over_dsi": round(means["si"] / means["dsi"], 3),
                 "nonsi_over_dsi": round(means["nonsi"] / means["dsi"], 3),
                 "predicted_si_over_dsi": round(predicted["si"] / predicted["dsi"], 3),
                 "predicted_nonsi_over_dsi": round(predicted["nonsi"] / predicted["dsi"], 3)})
    return rows


def explain(trace_path: str, profile_path: str) -> list[dict]:
    """Where each mode's time went, from the run's trace: its generations' total, the target's
    busy time and forwards, those same forwards at the profile's prices (the cost curve; the
    shared one for DSI, whose drafter drafts beside the target), and the drafter's median
    draft against the profile's TPOT. Runtime over prediction splits into forwards dearer than
    profiled (busy / repriced) and a different mix of forwards or idle time."""
    from dsi_mpi.plan import from_profile

    lat, _ = from_profile(profile_path)
    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    rows = []
    for mode in MODES:
        mine = [e for e in events if e.get("ph") == "X" and e["args"].get("mode") == mode
                and not e["args"].get("warmup")]
        prices = lat.shared if mode == "dsi" and lat.shared is not None else lat
        forwards = [e for e in mine if e["pid"] == 2 and e["name"] in ("verify", "prefill")]
        repriced = sum(prices.target_ttft if e["name"] == "prefill"
                       else prices.target_forward_ms(e["args"]["fed"]) for e in forwards)
        drafts = [e["dur"] / 1e3 for e in mine if e["pid"] == 1 and e["name"] == "draft"]
        rows.append({
            "mode": mode,
            "generate_s": round(sum(e["dur"] for e in mine if e["name"] == "generate") / 1e6, 2),
            "target_busy_s": round(sum(e["dur"] for e in forwards) / 1e6, 2),
            "target_forwards": len(forwards),
            "repriced_s": round(repriced / 1e3, 2),
            "draft_ms": round(statistics.median(drafts), 1) if drafts else None,
            "profiled_draft_ms": round(prices.drafter_tpot_ms, 1) if drafts else None,
        })
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| mode | lookahead | identical | median (s) | mean (s) | predicted mean (s) "
             "| runtime / prediction |", "|---|---|---|---|---|---|---|"]
    for r in rows[:-1]:
        lines.append(f"| {r['mode']} | {r['lookahead']} | {r['identical']}/{r['prompts']} "
                     f"| {r['median_s']} | {r['mean_s']} | {r['predicted_mean_s']} "
                     f"| {r['runtime_over_prediction']} |")
    s = rows[-1]
    lines.append(f"\nSI / DSI {s['si_over_dsi']}x (predicted {s['predicted_si_over_dsi']}x), "
                 f"non-SI / DSI {s['nonsi_over_dsi']}x (predicted "
                 f"{s['predicted_nonsi_over_dsi']}x)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", required=True, help="dsi-mpi profile of the pair")
    parser.add_argument("--num-prompts", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--trace", metavar="FILE.json",
                        help="also write every rank's trace (dsi-mpi timeline FILE.json)")
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "real_pair.jsonl"))
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size < 3:
        if rank == 0:
            print("launch with mpiexec -n 3 or more (coordinator, drafter, targets)",
                  file=sys.stderr)
        return 2
    verdict: tuple = (None, None)
    if rank == 0:
        try:
            from dsi_mpi.backends import gguf
            from dsi_mpi.preflight import preflight
            from dsi_mpi.pretrained import humaneval_prompts, qwen_coder_gguf

            target = gguf.convert(qwen_coder_gguf("qwen-coder-1.5b"))
            drafter = gguf.convert(qwen_coder_gguf("qwen-coder-0.5b"))
            check = RunConfig(target=target, drafter=drafter, mode="si", lookahead=1,
                              max_new_tokens=args.max_new_tokens, dtype="float32")
            prompts, _ = preflight(check, prompt_file=humaneval_prompts(),
                                   num_prompts=args.num_prompts)
            prediction = predict(args.profile, size, args.max_new_tokens)
            print(f"plan: {json.dumps(prediction['plan'])}", flush=True)
            verdict = ((target, drafter, [p.ids for p in prompts], prediction), None)
        except Exception as exc:  # every rank must learn it
            verdict = (None, f"{type(exc).__name__}: {exc}")
    prepared, error = comm.bcast(verdict, root=0)
    if error is not None:
        if rank == 0:
            print(f"real_pair: {error}", file=sys.stderr)
        return 2
    target, drafter, prompts, prediction = prepared
    base = RunConfig(target=target, drafter=drafter, mode="nonsi", dtype="float32",
                     max_new_tokens=args.max_new_tokens, timeout_s=args.timeout)
    k = prediction["lookahead"]
    configs = [replace(base, mode="dsi", lookahead=k["dsi"], sp=size - 2,
                       min_drafts=prediction["plan"]["min_drafts"]),
               replace(base, mode="si", lookahead=k["si"]), base]
    comm.Barrier()
    outcome = run(comm, configs, Rank0(prompts, warmup=1), trace=args.trace)
    gc.collect()  # the ranks' models go before rank 0 loads the reference
    comm.Barrier()
    if rank != 0:
        return 0
    expected, _ = reference(target, "float32", "cpu", prompts, args.max_new_tokens)
    meta = {"model": "Qwen2.5-Coder-1.5B-Instruct", "drafter": "Qwen2.5-Coder-0.5B-Instruct",
            "dtype": "float32", "max_new_tokens": args.max_new_tokens,
            "profile": args.profile, **provenance(size)}
    rows = summarise(outcome.records, expected, prediction, meta)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    print(table(rows), flush=True)
    if args.trace:
        gaps = explain(args.trace, args.profile)
        with open(args.out, "a") as fh:
            fh.write(json.dumps({"bench": "real_pair", "mode": "explain", **meta,
                                 "rows": gaps}) + "\n")
        print("\n| mode | generations (s) | target busy (s) | its forwards | at the profile's "
              "prices (s) | draft (ms) | profiled draft (ms) |\n|---|---|---|---|---|---|---|")
        for g in gaps:
            print(f"| {g['mode']} | {g['generate_s']} | {g['target_busy_s']} "
                  f"| {g['target_forwards']} | {g['repriced_s']} | {g['draft_ms']} "
                  f"| {g['profiled_draft_ms']} |", flush=True)
    return 0 if all(r["identical"] == r["prompts"] for r in rows[:-1]) else 1


if __name__ == "__main__":
    sys.exit(main())
