"""The command line: ``dsi-mpi run`` (under mpiexec or srun) and the offline tools.

The only argparse in the package. Every rank parses the same arguments and builds the same
configs before it imports torch or starts MPI, so bad values fail identically everywhere in a
fraction of a second; rank 0 alone prints the message, and every rank exits with code 2.
Checks that need files (the output, model folders, prompts) run on rank 0 and their verdict
is broadcast, before any model is loaded.

Every way out passes through :func:`_exit`: it prints the reason (one line, rank 0 or the one
rank that knows it), then finalizes MPI and exits with the code when every rank ends with it
(no MPI noise), or aborts the job when a rank is hung or gone. Exit codes: 0 done, 1 a rank
failed or stopped answering, 2 bad input, 128 + N stopped by signal N (143 for SIGTERM, 130
for SIGINT); ``docs/reliability.md`` lists every fault.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

from dsi_mpi import results
from dsi_mpi.config import (
    DTYPES,
    ENGINES,
    MODES,
    POLL_CHOICES,
    VERIFY_MODES,
    ConfigError,
    RunConfig,
)
from dsi_mpi.exits import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    Ending,
    Stopped,
    attach,
    ending_of,
    install_signal_handlers,
    interruptible,
    signal_exit_code,
)
from dsi_mpi.roles import make_layout
from dsi_mpi.verify import SamplingParams

ABORT_DELAY_S = 0.1  # lets the launcher forward the reason before MPI_Abort ends the job


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _add_run(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--sp", type=int, help="target servers DSI uses (default: every target rank)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seeds the shared per-position noise")
    p.add_argument("--verify", choices=VERIFY_MODES, default="exact")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--device", default="cpu",
                   help="cpu, or cuda (each model rank takes a GPU of its node)")
    _add_engine_options(p)
    _add_prompt_options(p, "text (one prompt a line), or JSONL (.gz too) with prompt or prompt_ids")
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


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    """How model ranks run their forwards (dsi_mpi/backends/engine.py)."""
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="eager (dynamic KV cache), static (one static KV cache per rank), "
                        "cudagraph (static cache, short forwards replayed as CUDA graphs; "
                        "CUDA only); auto: cudagraph on CUDA, eager on a CPU")
    p.add_argument("--graph-segments", type=int, default=1,
                   help="cudagraph: graphs per forward, CANCEL probed between them "
                        "(1: the whole forward in one graph; >1: Llama-layout models)")


def _add_prompt_options(p: argparse.ArgumentParser, file_help: str) -> None:
    """Where the prompts come from (exactly one of three), and how they are taken."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt as text")
    src.add_argument("--prompt-file", help=file_help)
    src.add_argument("--prompt-ids", help="one prompt as comma-separated token ids")
    p.add_argument("--chat", action="store_true",
                   help="wrap each text prompt in the tokenizer's chat template (instruct models)")
    p.add_argument("--num-prompts", type=int, help="take the first N prompts")


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
    try:
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as exc:
        raise ConfigError(str(exc).replace("temperature", "--temperature")
                          .replace("top_p", "--top-p").replace("top_k", "--top-k")
                          .replace("seed", "--seed")) from None
    base = RunConfig(
        target=args.target, drafter=args.drafter, mode=modes[0], lookahead=args.lookahead,
        sp=args.sp, max_new_tokens=args.max_new_tokens, sampling=sampling, verify=args.verify,
        dtype=args.dtype, device=args.device, engine=args.engine,
        graph_segments=args.graph_segments, max_run_ahead=args.max_run_ahead,
        reuse_cache=args.reuse_cache, timeout_s=args.timeout, poll=args.poll,
    )
    # sp and lookahead are DSI's and SI's knobs; the other modes accept and ignore them, so
    # one command line serves all three.
    return [replace(base, mode=m, sp=args.sp if m == "dsi" else None) for m in modes]


def _summary(records: Sequence[dict]) -> str:
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
    size = _world_size()
    if size is not None:
        make_layout(size, modes, args.sp)
    install_signal_handlers()  # SIGTERM and SIGINT now ask the run to stop (exits.py)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    layout = make_layout(comm.Get_size(), modes, args.sp)
    checked = _check_on_rank_0(args, configs, layout) if rank == 0 else None
    kind, value = comm.bcast(checked[0] if checked else None, root=0)
    if kind == "bad":
        raise ConfigError(str(value))
    if kind == "stopped":
        stopped = Stopped(int(value))
        reason = f"{stopped} before the run began"
        raise attach(stopped, Ending(signal_exit_code(stopped.signum), reason, everyone=True))
    if kind == "failed":
        raise attach(RuntimeError(value), Ending(1, str(value), everyone=True))
    prompts, tokenizer, output, resumed = checked[1] if checked else ((), None, None, None)
    if kind == "done":
        if rank == 0:
            print(f"nothing to do: {args.output} holds all {len(resumed.done)} records of this run",
                  flush=True)
        return EXIT_OK

    from dsi_mpi.progress import Progress
    from dsi_mpi.runtime import run

    total = len(configs) * args.repeats * len(prompts)
    progress = None
    if rank == 0:  # the records this run makes (a resumed run has some already)
        progress = Progress(total - len(resumed.done if resumed else ()), quiet=args.quiet)
    try:
        run(comm, configs, prompts, tokenizer, repeats=args.repeats, warmup=args.warmup,
            sink=output.append if output is not None else None,
            done=resumed.done if resumed else (), trace=args.trace, progress=progress)
    except BaseException as exc:
        ending = ending_of(exc)
        if output is not None:  # rank 0: how far the output got
            kept = len(resumed.done) + output.written
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
    if rank == 0:
        records, _ = results.read_records(args.output)
        print(_summary(records), flush=True)
        before = f" ({len(resumed.done)} were there already)" if resumed.done else ""
        print(f"wrote {output.written} records to {args.output}{before}", flush=True)
        if args.trace:
            print(f"wrote the trace of {comm.Get_size()} ranks to {args.trace} "
                  f"(dsi-mpi timeline {args.trace})", flush=True)
    return EXIT_OK


def _check_on_rank_0(args: argparse.Namespace, configs: list[RunConfig], layout: object) -> tuple:
    """Rank 0's checks, then the output opened: ((kind, value) for every rank, what rank 0 keeps).

    kind: ok, done (a resumed output already complete), bad (a ConfigError's message), stopped
    (the signal), failed (an unexpected error; rank 0 printed its traceback)."""
    from dsi_mpi.preflight import preflight

    try:
        with interruptible():  # nothing to keep yet: a signal stops the checks at once
            results.check_flags(args.output, args.resume, args.overwrite)
            _writable(args.output, "--output")
            if args.trace:
                _writable(args.trace, "--trace")
            prompts, tokenizer = preflight(configs[0], args.prompt, args.prompt_file,
                                           args.prompt_ids, args.chat, args.num_prompts)
            from dsi_mpi.runtime import planned

            plan = planned(configs, layout, prompts, args.repeats)
            output, resumed = results.open_output(args.output, args.resume, args.overwrite, plan)
    except ConfigError as exc:
        return ("bad", str(exc)), None
    except Stopped as exc:
        return ("stopped", exc.signum), None
    except Exception as exc:  # every rank must learn it
        import traceback

        traceback.print_exc()
        failure = f"error: rank 0 failed checking the input: {type(exc).__name__}: {exc}"
        return ("failed", failure), None
    if resumed.dropped_tail:
        print(f"dsi-mpi: --resume: cut a torn last line off {args.output} (a write cut short)",
              file=sys.stderr, flush=True)
    if set(plan) <= resumed.done:
        output.close()
        return ("done", None), (prompts, tokenizer, None, resumed)
    return ("ok", None), (prompts, tokenizer, output, resumed)


LATENCY_FLAGS = ("target_tpot_ms", "target_ttft_ms", "drafter_tpot_ms", "drafter_ttft_ms",
                 "acceptance")


def _add_latency_flags(p: argparse.ArgumentParser, drafter_required: bool = False) -> None:
    p.add_argument("--profile", help="a JSON file written by dsi-mpi profile, in place of the "
                                     "latency and acceptance flags")
    p.add_argument("--target-tpot-ms", type=float, help="required unless --profile")
    p.add_argument("--target-ttft-ms", type=float, help="default: the target's TPOT")
    required = " (required unless --profile)" if drafter_required else ""
    p.add_argument("--drafter-tpot-ms", type=float, help="the drafter's TPOT" + required)
    p.add_argument("--drafter-ttft-ms", type=float, help="default: the drafter's TPOT")
    p.add_argument("--acceptance", type=float, help="i.i.d. per token, in [0, 1]" + required)


def _add_offline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate",
                       help="ideal latency of dsi, si or nonsi on a virtual clock (no MPI)")
    p.add_argument("--mode", choices=("dsi", "si", "nonsi"), required=True)
    _add_latency_flags(p)
    p.add_argument("--lookahead", default="5", help="an integer, or auto (the planner's choice)")
    p.add_argument("--sp", type=int, default=7, help="target servers (dsi)")
    p.add_argument("--tokens", type=int, default=50)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--message-latency-ms", type=float, default=0.0,
                   help="one-way time of every message "
                        "(default 0: the ideal; bench/roundtrip.py measures it)")
    p.add_argument("--cancel-check-ms", type=float, default=0.0,
                   help="a target notices a CANCEL only at checks this far apart (0: at once)")
    p.add_argument("--poll-misses", type=int, default=0,
                   help="polls of a busy rank that miss a message already delivered "
                        "(0 with this transport)")

    p = sub.add_parser("plan", help="recommended lookahead and SP for a target/drafter pair")
    _add_latency_flags(p, drafter_required=True)
    p.add_argument("--gpus", type=int, required=True,
                   help="GPUs for model ranks: one drafter, the rest targets")
    p.add_argument("--tokens", type=int, default=50)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("heatmap", help="the paper's Figure 2 panels as PNG and CSV")
    p.add_argument("--out", required=True, help="path prefix: writes PREFIX.png and PREFIX.csv")
    p.add_argument("--grid", type=int, default=101, help="cells per axis")
    p.add_argument("--sp", type=int, default=7)
    p.add_argument("--tokens", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lookaheads", default="1,2,3,5,8",
                   help="the sweep each algorithm takes its best from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, help="processes (default: every core)")


def _latencies(args: argparse.Namespace, need_drafter: bool):  # a simulate.Latencies
    """The latencies from the flags or from --profile (which also sets ``args.acceptance``)."""
    from dsi_mpi.simulate import Latencies

    if args.profile is not None:
        from dsi_mpi.plan import from_profile

        given = [f"--{name.replace('_', '-')}" for name in LATENCY_FLAGS
                 if getattr(args, name) is not None]
        if given:
            raise ConfigError("--profile gives the latencies and the acceptance; "
                              f"drop {', '.join(given)}")
        try:
            lat, args.acceptance = from_profile(args.profile)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--profile {args.profile!r}: {exc}") from None
        return lat
    if args.target_tpot_ms is None:
        raise ConfigError("--target-tpot-ms is required (or --profile FILE from dsi-mpi profile)")
    if need_drafter and (args.drafter_tpot_ms is None or args.acceptance is None):
        raise ConfigError("--drafter-tpot-ms and --acceptance are required for dsi and si "
                          "(or --profile FILE)")
    if need_drafter and not 0.0 <= args.acceptance <= 1.0:
        raise ConfigError(f"--acceptance must be in [0, 1], got {args.acceptance}")
    values = [args.target_tpot_ms, args.target_ttft_ms, args.drafter_tpot_ms, args.drafter_ttft_ms]
    if any(v is not None and v < 0 for v in values) or args.target_tpot_ms <= 0:
        raise ConfigError("latencies must be >= 0 ms and the target's TPOT > 0")
    return Latencies(args.target_tpot_ms, args.drafter_tpot_ms or 0.0, args.target_ttft_ms,
                     args.drafter_ttft_ms)


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def simulate_command(args: argparse.Namespace) -> int:
    from dsi_mpi.plan import DEFAULT_LOOKAHEADS, best
    from dsi_mpi.simulate import MessageModel, dsi_lookaheads, simulate

    _positive(args, "sp", "tokens", "repeats")
    # may set args.acceptance from --profile
    lat = _latencies(args, need_drafter=args.mode != "nonsi")
    try:
        messages = MessageModel(args.message_latency_ms, args.cancel_check_ms, args.poll_misses)
    except ValueError:
        raise ConfigError("--message-latency-ms, --cancel-check-ms and --poll-misses "
                          "must be >= 0") from None
    acceptance = args.acceptance if args.acceptance is not None else 0.0
    if args.mode == "nonsi":
        summary = simulate("nonsi", lat, acceptance, 1, 1, args.tokens, args.repeats, args.seed,
                           messages=messages)
    elif args.lookahead == "auto":
        sweep = DEFAULT_LOOKAHEADS
        if args.mode == "dsi":
            sweep = dsi_lookaheads(lat, args.sp, DEFAULT_LOOKAHEADS)
        summary = best(args.mode, lat, acceptance, sweep, args.sp, args.tokens, args.repeats,
                       args.seed, messages=messages)
    else:
        try:
            lookahead = int(args.lookahead)
        except ValueError:
            raise ConfigError(
                f"--lookahead must be an integer or auto, got {args.lookahead!r}") from None
        _positive(argparse.Namespace(lookahead=lookahead), "lookahead")
        summary = simulate(args.mode, lat, acceptance, lookahead, args.sp, args.tokens,
                           args.repeats, args.seed, messages=messages)
    out = summary.as_dict()
    if not messages.ideal:
        out["messages"] = dataclasses.asdict(messages)
    print(json.dumps(out))
    return 0


def plan_command(args: argparse.Namespace) -> int:
    from dsi_mpi.plan import make_plan

    _positive(args, "tokens", "repeats")
    if args.gpus < 2:
        raise ConfigError(
            f"--gpus must be >= 2 (one drafter and at least one target), got {args.gpus}")
    lat = _latencies(args, need_drafter=True)  # may set args.acceptance from --profile
    plan = make_plan(lat, args.acceptance, args.gpus, args.tokens, args.repeats, args.seed)
    d = plan.as_dict()
    print(f"recommended: --mode dsi --lookahead {d['lookahead']} --sp {d['sp']} "
          f"(mpiexec -n {d['ranks']}: coordinator, drafter, {d['sp']} targets)")
    print(f"Eq. 1 lookahead with {args.gpus - 1} target servers: {d['eq1_lookahead']}; "
          f"SI's best lookahead: {d['si_lookahead']}")
    print(f"expected latency for {args.tokens} tokens: DSI {d['dsi_ms']:.1f} ms, "
          f"SI {d['si_ms']:.1f} ms, non-SI {d['nonsi_ms']:.1f} ms")
    print(f"expected speedup: {d['speedup_over_si']:.2f}x over SI, "
          f"{d['speedup_over_nonsi']:.2f}x over non-SI")
    print(json.dumps(d))
    return 0


def heatmap_command(args: argparse.Namespace) -> int:
    from dsi_mpi import heatmap

    _positive(args, "grid", "sp", "tokens", "repeats")
    try:
        lookaheads = tuple(int(x) for x in args.lookaheads.split(","))
    except ValueError:
        raise ConfigError(
            f"--lookaheads must be comma-separated integers, got {args.lookaheads!r}") from None
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise ConfigError(f"--out: directory {out_dir!r} does not exist")
    result = heatmap.run(args.out, args.grid, args.sp, args.tokens, args.repeats, args.seed,
                         lookaheads, args.workers)
    print(json.dumps(result))
    return 0


def _add_profile(sub: argparse._SubParsersAction) -> None:
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
    _add_prompt_options(p, "text, JSONL or JSONL.gz (HumanEval) with prompt or prompt_ids")
    p.add_argument("--max-new-tokens", type=int, default=20,
                   help="target tokens generated per prompt")
    p.add_argument("--lookahead", type=int, default=5,
                   help="block length of the per-position acceptance")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations of the first prompt")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both models on it)")
    _add_engine_options(p)
    p.add_argument("--output", default="profile.json",
                   help="JSON file for plan --profile and simulate --profile")


def profile_command(args: argparse.Namespace) -> int:
    from dsi_mpi.preflight import preflight
    from dsi_mpi.profile import profile, table

    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    # The run's own checks: the same errors as dsi-mpi run, before any weights load.
    config = RunConfig(target=args.target, drafter=args.drafter, mode="si",
                       lookahead=args.lookahead, max_new_tokens=args.max_new_tokens,
                       dtype=args.dtype, device=args.device, engine=args.engine,
                       graph_segments=args.graph_segments)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise ConfigError(f"--output: directory {out_dir!r} does not exist")
    prompts, _ = preflight(config, args.prompt, args.prompt_file, args.prompt_ids, args.chat,
                           args.num_prompts)
    result = profile(config, [p.ids for p in prompts], warmup=args.warmup)
    with open(args.output, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
        fh.write("\n")
    print(table(result), flush=True)
    print(f"wrote {args.output}", flush=True)
    return 0


def _add_views(sub: argparse._SubParsersAction) -> None:
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

    _need_matplotlib("timeline")
    _writable(args.out, "--out")
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

    _need_matplotlib("report")
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


def _need_matplotlib(command: str) -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError(f"dsi-mpi {command} draws with matplotlib: pip install matplotlib "
                          "(or dsi_mpi[plot])")


def _writable(path: str, flag: str) -> None:
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise ConfigError(f"{flag}: directory {out_dir!r} does not exist")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsi-mpi", description="Distributed Speculative Inference over MPI")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run(sub)
    _add_offline(sub)
    _add_profile(sub)
    _add_views(sub)
    return parser


def _rank() -> int:
    """This process's MPI rank, without initialising MPI: from the launcher's environment."""
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            return MPI.COMM_WORLD.Get_rank()
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def _world_size() -> int | None:
    """The job's size from the launcher's environment, or None where it does not say."""
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None


def _exit(code: int, reason: str | None, everyone: bool) -> int:
    """The one way out: print the reason, then end MPI: finalize when every rank ends with this
    one (``everyone``: no MPI noise, the code is the exit code), abort the job otherwise (a
    rank is hung or gone: MPI_Abort is the only way to end it)."""
    if reason:
        print(f"dsi-mpi: {reason}", file=sys.stderr, flush=True)
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            if not everyone:
                sys.stdout.flush()
                time.sleep(ABORT_DELAY_S)
                MPI.COMM_WORLD.Abort(code)
            # Finalized here, a non-zero exit does not make ``python -m mpi4py`` abort the job
            # (and print MPICH's "Abort(N)" lines) on its way out.
            MPI.Finalize()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = make_parser().parse_args(argv)
        commands = {"run": run_command, "simulate": simulate_command, "plan": plan_command,
                    "heatmap": heatmap_command, "profile": profile_command,
                    "timeline": timeline_command, "report": report_command}
        return _exit(commands[args.command](args), None, everyone=True)
    except ConfigError as exc:  # found alike on every rank (or broadcast by rank 0)
        return _exit(EXIT_BAD_INPUT, f"error: {exc}" if _rank() == 0 else None, everyone=True)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, already printed)
        code = exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
        return _exit(code, None, everyone=True)
    except BaseException as exc:  # a signal, a failure: the job ends, never hangs
        ending = ending_of(exc)
        if "ending" not in vars(exc) and not isinstance(exc, (Stopped, KeyboardInterrupt)):
            import traceback

            traceback.print_exc()  # outside the run: a bug, its traceback helps
        # A clean ending is told by rank 0 alone; a rank that ends the job alone says why.
        speak = _rank() == 0 or not ending.everyone
        return _exit(ending.code if speak else EXIT_OK, ending.reason if speak else None,
                     ending.everyone)


if __name__ == "__main__":
    sys.exit(main())
