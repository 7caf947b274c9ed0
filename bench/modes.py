"""DSI, SI and non-SI on one model and device: exactness against ``generate``, and the timings.

    mpiexec -n 5 python -m mpi4py bench/modes.py --prompts FILE.jsonl [--model SPEC]
        [--device cpu|cuda] [--dtypes bfloat16,float32] [--num-prompts 20] [--max-new-tokens 64]
        [--layers 15 | --drafter SPEC] [--lookahead 4] [--out FILE]

The target is ``--model`` (a folder, a ``.gguf`` file or ``random:SHAPE``, see ``models.py``;
default ``random:smollm2``); the drafter is the target's own first ``--layers`` decoder layers
(``self:layers=N`` where the package has self-drafters, else a folder holding those layers),
or ``--drafter``, a model of its own (a folder or a ``.gguf`` file; with another vocabulary
than the target's it drafts through ``dsi_mpi/translate.py``, and the rows say how).
For each dtype the runtime runs the three modes on the same ranks (coordinator, drafter, the
rest targets: DSI uses them all) over the same prompts, after one untimed warm-up prompt per
mode; then rank 0 runs ``generate(do_sample=False)`` of the same model in the same dtype on
the same device, one prompt at a time, as the reference and as an outside baseline.

Reported per dtype and mode (one JSON line each, with the device, commit and host): prompts
whose tokens equal the reference's, where the first difference falls when not, the
acceptance rate, total and median wall time, tokens per second, and non-SI/mode and SI/mode
time ratios; and one line for ``generate``. In float64 every prompt must match (exit 1
otherwise); in bfloat16 a forward over a block of tokens may round differently from
``generate``'s one-token forwards, so near-ties can flip, and more so with random weights,
whose logits are nearly flat.

A prompt file is JSONL with ``prompt_ids`` (or ``prompt`` text for a model with a tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, device_name, provenance
from bench.models import describe, resolve
from dsi_mpi.config import RunConfig
from dsi_mpi.runtime import Rank0, run

MODES = ("dsi", "si", "nonsi")


def self_drafter(folder: str, layers: int, workdir: str) -> str:
    """The drafter spec of the target's first ``layers`` decoder layers: ``self:layers=N``
    where the package supports it, else a folder saved with only those layers."""
    from dsi_mpi import backends

    if hasattr(backends, "is_self_drafter"):
        return f"self:layers={layers}"
    out = os.path.join(workdir, f"{os.path.basename(os.path.normpath(folder))}-first{layers}")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    total = config.num_hidden_layers
    for name, value in list(vars(config).items()):  # per-layer lists such as layer_types
        if isinstance(value, list) and len(value) == total and name != "architectures":
            setattr(config, name, value[:layers])
    config.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_pretrained(folder, config=config)  # later layers: unused keys
    model.save_pretrained(out)
    return out


def reference(folder: str, dtype: str, device: str, prompts: list[list[int]],
              max_new: int) -> tuple[list, list]:
    """``generate``'s greedy tokens (prompt excluded) and wall time per prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from dsi_mpi.backends.hf import resolve_dtype

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(dtype, device))
    model = model.to(device).eval()
    cuda = device.startswith("cuda")
    tokens, times = [], []
    with torch.inference_mode():
        warm = torch.tensor([prompts[0]], device=device)
        model.generate(warm, max_new_tokens=2, do_sample=False)
        for ids in prompts:
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            out = model.generate(torch.tensor([ids], device=device), max_new_tokens=max_new,
                                 do_sample=False)
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            tokens.append(out[0, len(ids):].tolist())
    del model
    return tokens, times


def first_difference(a: list[int], b: list[int]) -> int | None:
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def summarise(dtype: str, records: list[dict], expected: list[list[int]], gen_times: list[float],
              meta: dict) -> list[dict]:
    rows = []
    totals = {m: sum(r["wall_time_s"] for r in records if r["mode"] == m) for m in MODES}
    for mode in MODES:
        mine = sorted((r for r in records if r["mode"] == mode), key=lambda r: r["prompt_index"])
        firsts = [first_difference(r["tokens"], expected[r["prompt_index"]]) for r in mine]
        tokens = sum(r["num_new_tokens"] for r in mine)
        walls = [r["wall_time_s"] for r in mine]
        rows.append({
            "bench": "modes", "dtype": dtype, "mode": mode, **meta, "prompts": len(mine),
            "identical": sum(f is None for f in firsts), "first_difference": firsts,
            "acceptance": (statistics.fmean(r["acceptance_rate"] for r in mine)
                           if mode != "nonsi" else None),
            "lookahead": mine[0]["lookahead"], "sp": mine[0]["sp"], "tokens": tokens,
            "translation": mine[0].get("translation"),
            "wall_s": round(totals[mode], 4), "median_prompt_s": round(statistics.median(walls), 4),
            "tokens_per_s": round(tokens / totals[mode], 2),
            "nonsi_over_mode": round(totals["nonsi"] / totals[mode], 3),
            "si_over_mode": round(totals["si"] / totals[mode], 3),
        })
    gen_tokens = sum(len(e) for e in expected)
    rows.append({"bench": "modes", "dtype": dtype, "mode": "generate", **meta,
                 "prompts": len(expected),
                 "tokens": gen_tokens, "wall_s": round(sum(gen_times), 4),
                 "median_prompt_s": round(statistics.median(gen_times), 4),
                 "tokens_per_s": round(gen_tokens / sum(gen_times), 2),
                 "nonsi_over_mode": round(totals["nonsi"] / sum(gen_times), 3)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| dtype | mode | identical to generate | acceptance | wall (s) | tokens/s "
             "| non-SI / mode | SI / mode |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = f"{r['identical']}/{r['prompts']}" if "identical" in r else "(reference)"
        acc = f"{r['acceptance']:.3f}" if r.get("acceptance") is not None else "-"
        lines.append(f"| {r['dtype']} | {r['mode']} | {same} | {acc} | {r['wall_s']} "
                     f"| {r['tokens_per_s']} "
                     f"| {r['nonsi_over_mode']} | {r.get('si_over_mode', '-')} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:smollm2", help="folder, .gguf or random:SHAPE")
    parser.add_argument("--prompts", required=True, help="JSONL with prompt_ids (or prompt text)")
    parser.add_argument("--num-prompts", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=15, help="decoder layers of the self-drafter")
    parser.add_argument("--drafter", default=None,
                        help="a drafter model (folder or .gguf) instead of the self-drafter")
    parser.add_argument("--lookahead", type=int, default=4)
    parser.add_argument("--engine", default="auto", help="eager, static, cudagraph or auto")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--workdir", default=None,
                        help="where random, converted and drafter models are kept")
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "modes.jsonl"))
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size < 3:
        if rank == 0:
            print("launch with mpiexec -n 3 or more (coordinator, drafter, targets)",
                  file=sys.stderr)
        return 2
    # Rank 0 prepares the models and checks the input (preflight) before any rank loads one.
    verdict: tuple = (None, None)
    if rank == 0:
        try:
            from dsi_mpi.preflight import preflight

            workdir = args.workdir or os.path.join(tempfile.gettempdir(), "dsi-mpi-bench-models")
            os.makedirs(workdir, exist_ok=True)
            folder = resolve(args.model, workdir)
            drafter = (resolve(args.drafter, workdir) if args.drafter
                       else self_drafter(folder, args.layers, workdir))
            check = RunConfig(target=folder, drafter=drafter, mode="si", lookahead=args.lookahead,
                              max_new_tokens=args.max_new_tokens, device=args.device)
            prompts, _ = preflight(check, prompt_file=args.prompts)
            verdict = ((folder, drafter, [p.ids for p in prompts[: args.num_prompts]]), None)
        except Exception as exc:  # every rank must learn it
            verdict = (None, f"{type(exc).__name__}: {exc}")
    prepared, error = comm.bcast(verdict, root=0)
    if error is not None:
        if rank == 0:
            print(f"modes: {error}", file=sys.stderr)
        return 2
    folder, drafter, prompts = prepared
    base = RunConfig(target=folder, drafter=drafter, mode="nonsi",
                     max_new_tokens=args.max_new_tokens,
                     device=args.device, timeout_s=args.timeout, engine=args.engine)
    configs = [replace(base, mode="dsi", lookahead=args.lookahead, sp=size - 2),
               replace(base, mode="si", lookahead=args.lookahead), base]
    drafter_name = describe(args.drafter) if args.drafter else f"first {args.layers} layers"
    meta = {"device": None, "model": describe(args.model), "drafter": drafter_name,
            "max_new_tokens": args.max_new_tokens, "engine": base.engine_name,
            **provenance(size)}
    rows, failed = [], []
    for dtype in args.dtypes.split(","):
        dtyped = [replace(c, dtype=dtype) for c in configs]
        comm.Barrier()
        outcome = run(comm, dtyped, Rank0(prompts, warmup=1))
        if rank != 0:
            continue
        expected, gen_times = reference(folder, dtype, args.device, prompts, args.max_new_tokens)
        meta["device"] = device_name(args.device)
        dtype_rows = summarise(dtype, outcome.records, expected, gen_times, meta)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as fh:  # dtype by dtype: a run cut short keeps what it finished
            for row in dtype_rows:
                fh.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
        rows += dtype_rows
        if dtype == "float64":
            failed += [r["mode"] for r in dtype_rows
                       if r.get("identical", r["prompts"]) != r["prompts"]]
    if rank != 0:
        return 0
    print(f"\n{meta['device']}, {describe(args.model)}, drafter: {drafter_name}, "
          f"lookahead {args.lookahead}, {len(prompts)} prompts x {args.max_new_tokens} tokens, "
          f"{size} ranks\n")
    print(table(rows), flush=True)
    if failed:
        print(f"FAIL: float64 outputs differ from generate in {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
