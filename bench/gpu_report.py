"""What bench/gpu_check.sh prints about the machine, and its closing summary.

    python bench/gpu_report.py env
    python bench/gpu_report.py summary --steps FILE [--modes FILE] [--preemption FILE]
        [--device D] [--model SPEC] [--seconds N] [--out summary.json]

``summary`` reads the steps' record (one JSON line each: step, rc, seconds), the modes and
preemption benchmarks' JSON lines, prints a short summary, writes it as one JSON file, and
exits 1 when a step failed or timed out (0 when every step that ran passed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def env() -> int:
    import mpi4py
    import numpy
    import torch
    import transformers

    import dsi_mpi

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, "
          f"numpy {numpy.__version__}, mpi4py {mpi4py.__version__}")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    print(f"CUDA available: {torch.cuda.is_available()}, GPUs: {gpus}, CUDA {torch.version.cuda}")
    print(f"dsi_mpi from {os.path.dirname(dsi_mpi.__file__)}; CPUs: {os.cpu_count()}")
    return 0


def _lines(path: str | None) -> list[dict]:
    if not path or not os.path.isfile(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def summary(args: argparse.Namespace) -> int:
    steps = _lines(args.steps)
    modes = _lines(args.modes)
    preemption = _lines(args.preemption)
    failed = [s["step"] for s in steps if s.get("rc") not in (0, None)]
    skipped = [s["step"] for s in steps if s.get("skipped")]
    print("steps: " + ", ".join(
        f"{s['step']} " + ("skipped" if s.get("skipped") else f"rc={s['rc']} {s['seconds']}s")
        for s in steps))
    for r in modes:
        same = (f"{r['identical']}/{r['prompts']} identical to generate" if "identical" in r
                else "reference")
        acc = f", acceptance {r['acceptance']:.2f}" if r.get("acceptance") is not None else ""
        print(f"modes {r['dtype']:>8} {r['mode']:>8}: {same}{acc}, {r['wall_s']} s, "
              f"{r['tokens_per_s']} tokens/s, "
              f"non-SI/mode {r['nonsi_over_mode']}")
    for r in preemption:
        a, b = r["cancel_to_reply_ms"], r["cancel_to_idle_ms"]
        print(f"preemption {r['label'] or ''} {r['gate']:>9}: "
              f"CANCEL->reply p50/p95/max {a['p50']}/{a['p95']}/{a['max']} ms, "
              f"CANCEL->idle {b['p50']}/{b['p95']}/{b['max']} ms, "
              f"uncancelled x{r['uncancelled_ratio']}")
    result = {"device": args.device, "model": args.model, "seconds": args.seconds, "steps": steps,
              "failed": failed, "skipped": skipped, "modes": modes, "preemption": preemption,
              "device_name": next((r["device"] for r in modes + preemption if r.get("device")),
                                  None)}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    print(f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'every step that ran passed'}"
          + (f"; skipped: {', '.join(skipped)}" if skipped else "") + f" ({args.seconds} s)")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env")
    p = sub.add_parser("summary")
    p.add_argument("--steps", required=True)
    p.add_argument("--modes")
    p.add_argument("--preemption")
    p.add_argument("--device", default="")
    p.add_argument("--model", default="")
    p.add_argument("--seconds", type=int, default=0)
    p.add_argument("--out")
    args = parser.parse_args()
    return env() if args.command == "env" else summary(args)


if __name__ == "__main__":
    sys.exit(main())
