"""``dsi-mpi simulate``, ``plan`` and ``heatmap``: the policy on a virtual clock, no MPI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from dsi_mpi.cli.common import Subparsers, positive
from dsi_mpi.config import ConfigError

if TYPE_CHECKING:
    from dsi_mpi.simulate import Latencies

LATENCY_FLAGS = ("target_tpot_ms", "target_ttft_ms", "drafter_tpot_ms", "drafter_ttft_ms",
                 "acceptance")


def add_latency_flags(p: argparse.ArgumentParser, drafter_required: bool = False) -> None:
    p.add_argument("--profile", help="a JSON file written by dsi-mpi profile, in place of the "
                                     "latency and acceptance flags")
    p.add_argument("--target-tpot-ms", type=float, help="required unless --profile")
    p.add_argument("--target-ttft-ms", type=float, help="default: the target's TPOT")
    required = " (required unless --profile)" if drafter_required else ""
    p.add_argument("--drafter-tpot-ms", type=float, help="the drafter's TPOT" + required)
    p.add_argument("--drafter-ttft-ms", type=float, help="default: the drafter's TPOT")
    p.add_argument("--acceptance", type=float, help="i.i.d. per token, in [0, 1]" + required)


def add_offline(sub: Subparsers) -> None:
    p = sub.add_parser("simulate",
                       help="ideal latency of dsi, si or nonsi on a virtual clock (no MPI)")
    p.add_argument("--mode", choices=("dsi", "si", "nonsi"), required=True)
    add_latency_flags(p)
    p.add_argument("--lookahead", default="5", help="an integer, or auto (the planner's choice)")
    p.add_argument("--sp", type=int, default=7, help="target servers (dsi)")
    p.add_argument("--min-drafts", type=int, default=1, metavar="M",
                   help="dsi: a task carries no drafts or at least M (auto lookahead: swept)")
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
    add_latency_flags(p, drafter_required=True)
    p.add_argument("--gpus", type=int, required=True,
                   help="GPUs for model ranks: one drafter, the rest targets")
    p.add_argument("--tp-profile", action="append", metavar="FILE",
                   help="a profile of a target server of N ranks (profile --target-ranks N); "
                        "repeat it for several N: plan weighs SP against TP for --gpus")
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


def _latencies(args: argparse.Namespace, need_drafter: bool) -> tuple[Latencies, float | None]:
    """The latencies and the acceptance rate, from the flags or from --profile."""
    from dsi_mpi.simulate import Latencies

    if args.profile is not None:
        from dsi_mpi.plan import from_profile

        given = [f"--{name.replace('_', '-')}" for name in LATENCY_FLAGS
                 if getattr(args, name) is not None]
        if given:
            raise ConfigError("--profile gives the latencies and the acceptance; "
                              f"drop {', '.join(given)}")
        try:
            return from_profile(args.profile)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--profile {args.profile!r}: {exc}") from None
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
    lat = Latencies(args.target_tpot_ms, args.drafter_tpot_ms or 0.0, args.target_ttft_ms,
                    args.drafter_ttft_ms)
    return lat, args.acceptance


def simulate_command(args: argparse.Namespace) -> int:
    from dsi_mpi.plan import DEFAULT_LOOKAHEADS, best
    from dsi_mpi.simulate import MessageModel, dsi_lookaheads, simulate

    positive(args, "sp", "tokens", "repeats")
    lat, acceptance = _latencies(args, need_drafter=args.mode != "nonsi")
    try:
        messages = MessageModel(args.message_latency_ms, args.cancel_check_ms, args.poll_misses)
    except ValueError:
        raise ConfigError("--message-latency-ms, --cancel-check-ms and --poll-misses "
                          "must be >= 0") from None
    acceptance = acceptance if acceptance is not None else 0.0
    if args.mode == "nonsi":
        summary = simulate("nonsi", lat, acceptance, 1, 1, args.tokens, args.repeats, args.seed,
                           messages=messages)
    elif args.lookahead == "auto":
        sweep: Iterable[int] = DEFAULT_LOOKAHEADS
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
        positive(argparse.Namespace(lookahead=lookahead), "lookahead")
        if args.mode == "dsi" and not 1 <= args.min_drafts <= lookahead:
            raise ConfigError(f"--min-drafts must be from 1 to --lookahead ({lookahead}), "
                              f"got {args.min_drafts}")
        summary = simulate(args.mode, lat, acceptance, lookahead, args.sp, args.tokens,
                           args.repeats, args.seed, messages=messages,
                           min_drafts=args.min_drafts if args.mode == "dsi" else 1)
    out = summary.as_dict()
    if not messages.ideal:
        out["messages"] = dataclasses.asdict(messages)
    print(json.dumps(out))
    return 0


def plan_command(args: argparse.Namespace) -> int:
    from dsi_mpi.plan import make_plan

    positive(args, "tokens", "repeats")
    if args.gpus < 2:
        raise ConfigError(
            f"--gpus must be >= 2 (one drafter and at least one target), got {args.gpus}")
    if args.tp_profile:
        return _plan_tp(args)
    lat, acceptance = _latencies(args, need_drafter=True)
    assert acceptance is not None  # required with a drafter
    plan = make_plan(lat, acceptance, args.gpus, args.tokens, args.repeats, args.seed)
    d = plan.as_dict()
    print(f"recommended: --mode dsi --lookahead {d['lookahead']}{_min_drafts_flag(d)} "
          f"--sp {d['sp']} (mpiexec -n {d['ranks']}: coordinator, drafter, {d['sp']} targets)")
    print(f"Eq. 1 lookahead with {args.gpus - 1} target servers: {d['eq1_lookahead']}; "
          f"SI's best lookahead: {d['si_lookahead']}")
    print(f"expected latency for {args.tokens} tokens: DSI {d['dsi_ms']:.1f} ms, "
          f"SI {d['si_ms']:.1f} ms, non-SI {d['nonsi_ms']:.1f} ms")
    print(f"expected speedup: {d['speedup_over_si']:.2f}x over SI, "
          f"{d['speedup_over_nonsi']:.2f}x over non-SI")
    print(json.dumps(d))
    return 0


def _plan_tp(args: argparse.Namespace) -> int:
    """plan --tp-profile: one plan per TP degree for the same GPUs, the fastest recommended."""
    from dsi_mpi.plan import from_profile, tp_degree, weigh_tp

    if args.profile is not None or args.target_tpot_ms is not None:
        raise ConfigError("--tp-profile gives the latencies: drop --profile and the latency flags")
    options = []
    for path in args.tp_profile:
        try:
            options.append((tp_degree(path), *from_profile(path)))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--tp-profile {path!r}: {exc}") from None
    if len({n for n, _, _ in options}) != len(options):
        raise ConfigError("--tp-profile: two profiles of the same --target-ranks")
    plans = weigh_tp(options, args.gpus, args.tokens, args.repeats, args.seed)
    rows = []
    for n, plan in sorted(plans.items()):
        if plan is None:
            print(f"TP {n}: no server of {n} GPUs fits beside the drafter in {args.gpus} GPUs")
            continue
        d = plan.as_dict() | {"tp": n, "ranks": 2 + plan.sp * n}
        rows.append(d)
        print(f"TP {n}: --sp {d['sp']} --lookahead {d['lookahead']}{_min_drafts_flag(d)} "
              f"(mpiexec -n {d['ranks']}): "
              f"DSI {d['dsi_ms']:.1f} ms, SI {d['si_ms']:.1f} ms, non-SI {d['nonsi_ms']:.1f} ms "
              f"for {args.tokens} tokens")
    if not rows:
        raise ConfigError(f"--gpus {args.gpus}: no profiled TP degree fits")
    d = min(rows, key=lambda r: r["dsi_ms"])
    print(f"recommended: --mode dsi --target-ranks {d['tp']} --sp {d['sp']} --lookahead "
          f"{d['lookahead']}{_min_drafts_flag(d)} (mpiexec -n {d['ranks']}: coordinator, "
          f"drafter, {d['sp']} servers x {d['tp']} ranks)")
    print(json.dumps(d))
    return 0


def _min_drafts_flag(plan: dict) -> str:
    """`` --min-drafts M`` where the plan wants it (M > 1: a cost curve with a step)."""
    return f" --min-drafts {plan['min_drafts']}" if plan["min_drafts"] > 1 else ""


def heatmap_command(args: argparse.Namespace) -> int:
    from dsi_mpi import heatmap

    positive(args, "grid", "sp", "tokens", "repeats")
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
