"""``dsi-mpi run``: generate with DSI, SI or non-SI over MPI ranks (under mpiexec or srun).

Every rank parses the same arguments and builds the same configs before it imports torch or
starts MPI, so bad values fail identically everywhere in a fraction of a second; rank 0 alone
prints the message, and every rank exits with code 2. Checks that need files (the output,
model folders, prompts) run on rank 0 and every rank learns their verdict
(:func:`dsi_mpi.cli.launch.check_on_rank_0`), before any model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace

from dsi_mpi import results
from dsi_mpi.cli.common import Subparsers, add_engine_options, add_prompt_options, writable
from dsi_mpi.cli.launch import Checked, Outcome, check_on_rank_0, world_size
from dsi_mpi.config import DTYPES, MODES, POLL_CHOICES, VERIFY_MODES, ConfigError, RunConfig
from dsi_mpi.exits import (
    EXIT_OK,
    Stopped,
    attach,
    ending_of,
    install_signal_handlers,
    interruptible,
)
from dsi_mpi.roles import Layout, make_layout
from dsi_mpi.verify import SamplingError, SamplingParams


def add_run(sub: Subparsers) -> None:
    p = sub.add_parser("run", help="generate with DSI, SI or non-SI over MPI ranks",
                       description="Run under mpiexec/srun: rank 0 coordinates, rank 1 drafts, "
                                   "the rest verify.")
    p.add_argument("--target", required=True,
                   help="local path, hub id, .gguf file or emulated:tpot_ms=..,ttft_ms=..")
    p.add_argument("--drafter", help="local path, hub id, .gguf file, self:layers=N (the target's "
                                     "first N layers) or emulated:tpot_ms=..,acceptance=..; "
                                     "unused by nonsi")
    p.add_argument("--mode", default="dsi",
                   help="dsi, si, nonsi, or a comma-separated list run on the same ranks")
    p.add_argument("--lookahead", type=int, default=5,
                   help="drafts per verification task (ignored by nonsi)")
    p.add_argument("--min-drafts", type=int, default=1, metavar="M",
                   help="dsi: a task carries no drafts or at least M (where a forward of 2+ "
                        "tokens costs much more than one, as on a CPU; plan picks M)")
    p.add_argument("--sp", type=int, help="target servers DSI uses (default: every target server)")
    p.add_argument("--target-ranks", type=int, default=1, metavar="N",
                   help="ranks per target server: N consecutive ranks of one node share the "
                        "target with tensor parallelism (launch 1 + drafters + servers x N)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seeds the shared per-position noise")
    p.add_argument("--verify", choices=VERIFY_MODES, default="exact")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--device", default="cpu",
                   help="cpu, or cuda (each model rank takes a GPU of its node)")
    add_engine_options(p)
    add_prompt_options(p, "text (one prompt a line), or JSONL (.gz too) with prompt or prompt_ids")
    p.add_argument("--output", required=True,
                   help="JSONL file, one line per prompt and mode, written as each finishes")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="keep the records in --output and run only the missing ones "
                               "(a requeued job)")
    existing.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every prompt this many times per mode")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed runs of the first prompt per mode")
    p.add_argument("--max-run-ahead", type=int,
                   help="drafts the drafter may hold beyond the committed text")
    p.add_argument("--reuse-cache", action="store_true",
                   help="keep KV caches across prompts and reuse shared prefixes "
                        "(off: each prompt pays its prefill)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a rank may stay silent (hung or gone: named) before the job ends")
    p.add_argument("--poll", choices=POLL_CHOICES, default="auto",
                   help="how waiting ranks wait: spin (a core each), "
                        "backoff (sleep between probes), "
                        "auto (spin on nodes where every rank has a core of its own; "
                        "docs/cluster.md)")
    p.add_argument("--trace", metavar="FILE.json",
                   help="write what every rank did, on one clock, as a Chrome trace "
                        "(Perfetto; dsi-mpi timeline)")
    p.add_argument("--quiet", action="store_true", help="no progress report on stderr")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The sampling flags, each checked; an error names its flag."""
    try:
        return SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    except SamplingError as exc:
        raise ConfigError(f"--{exc.field.replace('_', '-')} {exc.problem}") from None


def build_configs(args: argparse.Namespace) -> list[RunConfig]:
    """One config per requested mode, validated."""
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise ConfigError(f"--mode must be one or more of {', '.join(MODES)}, got {args.mode!r}")
    if len(set(modes)) != len(modes):
        raise ConfigError(f"--mode names a mode twice: {args.mode!r}")
    if args.repeats < 1 or args.warmup < 0:
        raise ConfigError("--repeats must be >= 1 and --warmup >= 0")
    base = RunConfig(
        target=args.target, drafter=args.drafter, mode=modes[0], lookahead=args.lookahead,
        min_drafts=args.min_drafts,
        sp=args.sp, max_new_tokens=args.max_new_tokens, sampling=sampling_params(args),
        verify=args.verify, dtype=args.dtype, device=args.device, engine=args.engine,
        graph_segments=args.graph_segments, max_run_ahead=args.max_run_ahead,
        reuse_cache=args.reuse_cache, timeout_s=args.timeout, poll=args.poll,
        target_ranks=args.target_ranks,
    )
    # sp and lookahead are DSI's and SI's knobs; the other modes accept and ignore them, so
    # one command line serves all three.
    return [replace(base, mode=m, sp=args.sp if m == "dsi" else None) for m in modes]


def summary(records: Sequence[dict]) -> str:
    """Rank 0's closing lines: one per record, and the modes' total wall times over DSI's."""
    lines = []
    for r in records:
        lines.append(
            f"{r['mode']:>5} prompt {r['prompt_index']}: {r['num_new_tokens']} tokens "
            f"in {r['wall_time_s']:.3f} s "
            f"(ttft {r['ttft_s'] * 1e3:.1f} ms, tpot {r['tpot_s'] * 1e3:.1f} ms), "
            f"acceptance {r['acceptance_rate']:.2f}, "
            f"{r['verifications_sent']} verifications, {r['verifications_cancelled']} cancelled"
        )
    by_mode: dict[str, float] = {}
    for r in records:
        by_mode[r["mode"]] = by_mode.get(r["mode"], 0.0) + r["wall_time_s"]
    if "dsi" in by_mode and len(by_mode) > 1:
        ratios = ", ".join(f"{m}/dsi = {t / by_mode['dsi']:.2f}x"
                           for m, t in by_mode.items() if m != "dsi")
        lines.append(f"total wall time ratios: {ratios}")
    return "\n".join(lines)


def run_command(args: argparse.Namespace) -> int:
    configs = build_configs(args)  # every rank, before MPI and torch: the same errors everywhere
    modes = [c.mode for c in configs]
    size = world_size()
    if size is not None:
        make_layout(size, modes, args.sp, target_ranks=args.target_ranks)
    install_signal_handlers()  # SIGTERM and SIGINT now ask the run to stop (exits.py)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    layout = make_layout(comm.Get_size(), modes, args.sp, target_ranks=args.target_ranks)
    verdict, checked = check_on_rank_0(comm, lambda: _checks(args, configs, layout))
    if verdict.outcome is Outcome.DONE:
        if checked is not None:
            print(f"nothing to do: {args.output} holds all {len(checked.resumed.done)} records of "
                  "this run", flush=True)
        return EXIT_OK

    from dsi_mpi.progress import Progress
    from dsi_mpi.runtime import Rank0, run

    prompts = checked.prompts if checked is not None else []
    output = checked.output if checked is not None else None
    done = checked.resumed.done if checked is not None else frozenset()
    total = len(configs) * args.repeats * len(prompts)
    progress = None
    if rank == 0:  # the records this run makes (a resumed run has some already)
        progress = Progress(total - len(done), quiet=args.quiet)
    try:
        rank0 = None
        if checked is not None and output is not None:
            rank0 = Rank0(prompts, checked.tokenizer, args.repeats, args.warmup, output.append,
                          done, progress)
        run(comm, configs, rank0, trace=args.trace)
    except BaseException as exc:
        ending = ending_of(exc)
        if output is not None:  # rank 0: how far the output got
            kept = len(done) + output.written
            if isinstance(exc, Stopped):
                reason = (f"{ending.reason} after {kept} of {total} prompts; rerun with --resume "
                          "to finish")
            elif kept == 0:
                reason = f"error: {ending.reason}; no prompt had finished"
            else:
                reason = (f"error: {ending.reason}; {kept} of {total} prompts are in "
                          f"{args.output}: rerun with --resume to finish")
        else:
            reason = (f"error: {ending.reason}; the prompts finished are in {args.output}: rerun "
                      "with --resume")
        raise attach(exc, replace(ending, reason=reason)) from None
    finally:
        if progress is not None:
            progress.close()
        if output is not None:
            output.close()
    if output is not None:  # rank 0
        records, _ = results.read_records(args.output)
        print(summary(records), flush=True)
        before = f" ({len(done)} were there already)" if done else ""
        print(f"wrote {output.written} records to {args.output}{before}", flush=True)
        if args.trace:
            print(f"wrote the trace of {comm.Get_size()} ranks to {args.trace} "
                  f"(dsi-mpi timeline {args.trace})", flush=True)
    return EXIT_OK


def _checks(args: argparse.Namespace, configs: list[RunConfig], layout: Layout) -> Checked:
    """Rank 0's checks, then the output opened (none when it already holds every record)."""
    from dsi_mpi.preflight import preflight

    with interruptible():  # nothing to keep yet: a signal stops the checks at once
        results.check_flags(args.output, args.resume, args.overwrite)
        writable(args.output, "--output")
        if args.trace:
            writable(args.trace, "--trace")
        prompts, tokenizer = preflight(configs[0], args.prompt, args.prompt_file,
                                       args.prompt_ids, args.chat, args.num_prompts)
        plan = results.planned(configs, layout, prompts, args.repeats)
        output, resumed = results.open_output(args.output, args.resume, args.overwrite, plan)
    if resumed.dropped_tail:
        print(f"dsi-mpi: --resume: cut a torn last line off {args.output} (a write cut short)",
              file=sys.stderr, flush=True)
    if set(plan) <= resumed.done:
        output.close()
        return Checked(prompts, tokenizer, None, resumed)
    return Checked(prompts, tokenizer, output, resumed)
