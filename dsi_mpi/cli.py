"""The command line: ``dsi-mpi run`` (under mpiexec or srun) and the offline tools.

The only argparse in the package. Every rank parses the same arguments and builds the same
configs, so bad values fail identically everywhere; rank 0 alone prints the message, and
every rank exits with code 2 before any model is loaded. Checks that need model configs or
prompts run on rank 0 and their verdict is broadcast. Failures during the run print the
failing rank's message and abort the whole job with exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace

from dsi_mpi.config import DTYPES, MODES, VERIFY_MODES, ConfigError, RunConfig
from dsi_mpi.verify import SamplingParams

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="generate with DSI, SI or non-SI over MPI ranks",
                       description="Run under mpiexec/srun: rank 0 coordinates, rank 1 drafts, the rest verify.")
    p.add_argument("--target", required=True, help="local path, hub id or emulated:tpot_ms=..,ttft_ms=..")
    p.add_argument("--drafter", help="local path, hub id or emulated:tpot_ms=..,acceptance=..; unused by nonsi")
    p.add_argument("--mode", default="dsi", help="dsi, si, nonsi, or a comma-separated list run on the same ranks")
    p.add_argument("--lookahead", type=int, default=5, help="drafts per verification task (ignored by nonsi)")
    p.add_argument("--sp", type=int, help="target servers DSI uses (default: every target rank)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seeds the shared per-position noise")
    p.add_argument("--verify", choices=VERIFY_MODES, default="exact")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (each model rank takes a GPU of its node)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt as text")
    src.add_argument("--prompt-file", help="text (one prompt a line) or JSONL with prompt or prompt_ids")
    src.add_argument("--prompt-ids", help="one prompt as comma-separated token ids")
    p.add_argument("--output", required=True, help="JSONL file, one line per prompt and mode")
    p.add_argument("--repeats", type=int, default=1, help="run every prompt this many times per mode")
    p.add_argument("--warmup", type=int, default=0, help="untimed runs of the first prompt per mode")
    p.add_argument("--max-run-ahead", type=int, help="drafts the drafter may hold beyond the committed text")
    p.add_argument("--reuse-cache", action="store_true",
                   help="keep KV caches across prompts and reuse shared prefixes (off: each prompt pays its prefill)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds any rank waits for a message before aborting")


def build_configs(args: argparse.Namespace) -> list[RunConfig]:
    """One config per requested mode, validated."""
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise ConfigError(f"--mode must be one or more of {', '.join(MODES)}, got {args.mode!r}")
    if args.repeats < 1 or args.warmup < 0:
        raise ConfigError("--repeats must be >= 1 and --warmup >= 0")
    try:
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as exc:
        raise ConfigError(str(exc).replace("temperature", "--temperature").replace("top_p", "--top-p")
                          .replace("top_k", "--top-k").replace("seed", "--seed")) from None
    base = RunConfig(
        target=args.target, drafter=args.drafter, mode=modes[0], lookahead=args.lookahead, sp=args.sp,
        max_new_tokens=args.max_new_tokens, sampling=sampling, verify=args.verify, dtype=args.dtype,
        device=args.device, max_run_ahead=args.max_run_ahead, reuse_cache=args.reuse_cache, timeout_s=args.timeout,
    )
    # sp and lookahead are DSI's and SI's knobs; the other modes accept and ignore them, so
    # one command line serves all three.
    return [replace(base, mode=m, sp=args.sp if m == "dsi" else None) for m in modes]


def _summary(records: Sequence[dict]) -> str:
    lines = []
    for r in records:
        lines.append(
            f"{r['mode']:>5} prompt {r['prompt_index']}: {r['num_new_tokens']} tokens in {r['wall_time_s']:.3f} s "
            f"(ttft {r['ttft_s'] * 1e3:.1f} ms, tpot {r['tpot_s'] * 1e3:.1f} ms), acceptance {r['acceptance_rate']:.2f}, "
            f"{r['verifications_sent']} verifications, {r['verifications_cancelled']} cancelled"
        )
    by_mode: dict[str, float] = {}
    for r in records:
        by_mode[r["mode"]] = by_mode.get(r["mode"], 0.0) + r["wall_time_s"]
    if "dsi" in by_mode and len(by_mode) > 1:
        ratios = ", ".join(f"{m}/dsi = {t / by_mode['dsi']:.2f}x" for m, t in by_mode.items() if m != "dsi")
        lines.append(f"total wall time ratios: {ratios}")
    return "\n".join(lines)


def run_command(args: argparse.Namespace) -> int:
    from mpi4py import MPI

    from dsi_mpi.roles import make_layout

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    configs = build_configs(args)
    make_layout(comm.Get_size(), [c.mode for c in configs], args.sp)
    verdict: tuple[bool, object]
    if rank == 0:
        from dsi_mpi.preflight import preflight

        try:
            prompts, tokenizer = preflight(configs[0], args.prompt, args.prompt_file, args.prompt_ids)
            out_dir = os.path.dirname(os.path.abspath(args.output))
            if not os.path.isdir(out_dir):
                raise ConfigError(f"--output: directory {out_dir!r} does not exist")
            verdict = (True, None)
        except ConfigError as exc:
            verdict = (False, str(exc))
    else:
        verdict = (True, None)
    ok, message = comm.bcast(verdict if rank == 0 else None, root=0)
    if not ok:
        raise ConfigError(str(message))

    from dsi_mpi.runtime import run

    outcome = run(comm, configs, prompts if rank == 0 else (), tokenizer if rank == 0 else None,
                  repeats=args.repeats, warmup=args.warmup)
    if rank == 0:
        with open(args.output, "w", encoding="utf-8") as fh:
            for r in outcome.records:
                fh.write(json.dumps(r) + "\n")
        print(_summary(outcome.records), flush=True)
        print(f"wrote {len(outcome.records)} records to {args.output}", flush=True)
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsi-mpi", description="Distributed Speculative Inference over MPI")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run(sub)
    return parser


def _rank() -> int:
    """This process's MPI rank, without initialising MPI for commands that do not need it."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = make_parser().parse_args(argv)
        if args.command == "run":
            return run_command(args)
        return 0
    except ConfigError as exc:
        if _rank() == 0:
            print(f"dsi-mpi: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except Exception:  # noqa: BLE001 - any failure ends the whole job, never a hang
        if "mpi4py.MPI" in sys.modules:
            from mpi4py import MPI

            sys.stderr.flush()
            MPI.COMM_WORLD.Abort(1)
        raise


if __name__ == "__main__":
    sys.exit(main())
