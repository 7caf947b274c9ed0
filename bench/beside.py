"""What a model beside the target costs it: the target's cost curve alone, with the drafter in
a second thread of the same process, and with the drafter in a process of its own (as another
rank would be), on the same prompts (why ``dsi-mpi profile`` runs the model beside in a
process: docs/results.md, issue 22).

    OMP_NUM_THREADS=1 python bench/beside.py --target SPEC --drafter SPEC \\
        [--prompt-file FILE] [--num-prompts 3] [--max-new-tokens 32] [--lengths 6]

Prints the median ms of a forward of 1 .. ``--lengths`` new tokens (every position's logits,
as a verification) in each setting, and each setting over alone; one thread per model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch

    from dsi_mpi.backends import load_backend
    from dsi_mpi.config import RunConfig
    from dsi_mpi.costcurve import Background, InProcess, curve
    from dsi_mpi.preflight import preflight
    from dsi_mpi.pretrained import humaneval_prompts
    from dsi_mpi.profile import generate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--drafter", required=True)
    parser.add_argument("--prompt-file", default=None, help="default: HumanEval")
    parser.add_argument("--num-prompts", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lengths", type=int, default=6)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = RunConfig(target=args.target, drafter=args.drafter, mode="si", lookahead=1,
                       dtype=args.dtype)
    found, _ = preflight(config, prompt_file=args.prompt_file or humaneval_prompts(),
                         num_prompts=args.num_prompts)  # checks, GGUF conversions, prompts
    prompts = [p.ids for p in found]
    target = load_backend(args.target, args.dtype, "cpu")
    drafter = load_backend(args.drafter, args.dtype, "cpu")
    tokens = [generate(target, p, args.max_new_tokens)[0] for p in prompts]
    curve(target, prompts[0], tokens[0], args.lengths)  # warm-up
    rows: dict[str, list[list[float]]] = {"alone": [], "thread": [], "process": []}
    with InProcess(partial(load_backend, args.drafter, args.dtype, "cpu"), threads=1) as beside:
        for prompt, toks in zip(prompts, tokens, strict=True):
            rows["alone"].append(curve(target, prompt, toks, args.lengths))
            with Background(drafter, prompt):
                rows["thread"].append(curve(target, prompt, toks, args.lengths))
            with beside(prompt, 1):
                rows["process"].append(curve(target, prompt, toks, args.lengths))
    medians = {k: [statistics.median(c[i] for c in v) for i in range(args.lengths)]
               for k, v in rows.items()}
    print("| beside the target | " + " | ".join(f"{n} tokens" for n in range(1, args.lengths + 1))
          + " |\n|---|" + "---|" * args.lengths)
    for name, ms in medians.items():
        ratio = [m / a for m, a in zip(ms, medians["alone"], strict=True)]
        print(f"| {name} | " + " | ".join(f"{m:.0f} ms ({r:.2f}x)" for m, r in zip(ms, ratio,
                                                                                  strict=True))
              + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
