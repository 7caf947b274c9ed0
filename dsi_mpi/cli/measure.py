"""``dsi-mpi profile`` (what plan and simulate need, measured in one process), ``timeline`` and
``report`` (what a run recorded, drawn and tabulated)."""

from __future__ import annotations

import argparse
import json
import os

from dsi_mpi.cli.common import (
    Subparsers,
    add_engine_options,
    add_prompt_options,
    need_matplotlib,
    writable,
)
from dsi_mpi.cli.launch import rank, world_size
from dsi_mpi.config import DTYPES, MODES, ConfigError, RunConfig


def add_profile(sub: Subparsers) -> None:
    p = sub.add_parser("profile", help="measure TTFT, TPOT and acceptance of a model pair "
                                       "(one process, no MPI)",
                       description="What plan and simulate need, measured as in the paper's "
                                   "appendix F: each model's TTFT and TPOT per prompt after a "
                                   "warm-up, and the drafter's acceptance of the target's greedy "
                                   "tokens.")
    p.add_argument("--target", required=True,
                   help="local path, hub id, .gguf file or emulated: spec")
    p.add_argument("--drafter", required=True,
                   help="local path, hub id, .gguf file, self:layers=N or emulated: spec")
    add_prompt_options(p, "text, JSONL or JSONL.gz (HumanEval) with prompt or prompt_ids")
    p.add_argument("--max-new-tokens", type=int, default=20,
                   help="target tokens generated per prompt")
    p.add_argument("--lookahead", type=int, default=5,
                   help="block length of the per-position acceptance")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations of the first prompt")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both models on it)")
    add_engine_options(p)
    p.add_argument("--target-ranks", type=int, default=1, metavar="N",
                   help="profile the target as one server of N ranks (tensor parallelism): "
                        "launch with mpiexec -n N; rank 0 writes the output")
    p.add_argument("--threads", type=int,
                   help="torch threads, as each rank of the run will have (default: torch's)")
    p.add_argument("--alone", action="store_true",
                   help="skip timing each model with the other running beside it (the run's "
                        "conditions when the drafter and the targets share a machine)")
    p.add_argument("--output", default="profile.json",
                   help="JSON file for plan --profile and simulate --profile")


def profile_command(args: argparse.Namespace) -> int:
    from dsi_mpi.preflight import preflight
    from dsi_mpi.profile import profile, table

    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    # The run's own checks: the same errors as dsi-mpi run, before any weights load.
    device = args.device
    if args.target_ranks > 1 and device == "cuda":  # one node: rank j takes its j-th GPU
        device = f"cuda:{rank()}"
    config = RunConfig(target=args.target, drafter=args.drafter, mode="si",
                       lookahead=args.lookahead, max_new_tokens=args.max_new_tokens,
                       dtype=args.dtype, device=device, engine=args.engine,
                       graph_segments=args.graph_segments, target_ranks=args.target_ranks)
    writable(args.output, "--output")
    size = world_size() or 1
    if size != args.target_ranks:
        raise ConfigError(f"--target-ranks {args.target_ranks} profiles one server of "
                          f"{args.target_ranks} ranks: launch with mpiexec -n "
                          f"{args.target_ranks} (got {size} ranks)")
    prompts, _ = preflight(config, args.prompt, args.prompt_file, args.prompt_ids, args.chat,
                           args.num_prompts)
    group = None
    if args.target_ranks > 1:
        from mpi4py import MPI

        from dsi_mpi.roles import Layout
        from dsi_mpi.servergroup import ServerGroup

        comm = MPI.COMM_WORLD
        layout = Layout(size, drafters=(), targets=(0,), target_ranks=size)
        group = ServerGroup(comm.Dup(), layout, comm.Get_rank(), timeout_s=600.0)
    result = profile(config, [p.ids for p in prompts], warmup=args.warmup, group=group,
                     threads=args.threads, shared=not args.alone)
    if group is not None:
        group.close()
        if not group.is_leader:
            return 0
    with open(args.output, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
        fh.write("\n")
    print(table(result), flush=True)
    print(f"wrote {args.output}", flush=True)
    return 0


def add_views(sub: Subparsers) -> None:
    p = sub.add_parser("timeline", help="one generation of a --trace file as a Gantt chart (PNG)")
    p.add_argument("trace", help="a file written by dsi-mpi run --trace")
    p.add_argument("--out", default="timeline.png", help="PNG file to write")
    p.add_argument("--prompt", type=int, help="prompt index (default: the first traced)")
    p.add_argument("--mode", choices=MODES, help="dsi, si or nonsi (default: the first traced)")
    p.add_argument("--repeat", type=int, help="which repeat (default: the first)")

    p = sub.add_parser("report", help="Markdown tables, speedups and plots from run records")
    p.add_argument("records", nargs="+", help="JSONL files written by dsi-mpi run --output")
    p.add_argument("--out", required=True, help="directory for report.md and the PNG plots")


def timeline_command(args: argparse.Namespace) -> int:
    from dsi_mpi import timeline

    need_matplotlib("timeline")
    writable(args.out, "--out")
    try:
        doc = timeline.load(args.trace)
        gen = timeline.draw(doc, args.out, args.prompt, args.mode, args.repeat)
    except OSError as exc:
        raise ConfigError(f"{args.trace}: {exc.strerror or exc}") from None
    except (timeline.TraceError, json.JSONDecodeError) as exc:
        raise ConfigError(str(exc)) from None
    print(f"wrote {args.out}: {gen['mode']} prompt {gen['prompt']} repeat {gen['repeat']}, "
          f"{gen['tokens']} tokens in {(gen['end_us'] - gen['start_us']) / 1e3:.1f} ms")
    return 0


def report_command(args: argparse.Namespace) -> int:
    from dsi_mpi import report

    need_matplotlib("report")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise ConfigError(f"--out: directory {parent!r} does not exist")
    try:
        markdown, written = report.report(args.records, args.out)
    except report.ReportError as exc:
        raise ConfigError(str(exc)) from None
    print(markdown)
    print(f"wrote {', '.join(written)}")
    return 0
