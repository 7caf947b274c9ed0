"""The fault table of docs/reliability.md: what a user sees when a batch run meets each fault,
and what is kept.

The run of the issue: 5 ranks under mpiexec, emulated models, 40 prompts x 200 tokens, one
mode; each fault strikes at 40% of the generation phase (after the start-up, measured with a
one-token run). For each fault: mpiexec's exit code, how long after the fault mpiexec and then
every process of the job were gone, what stderr held (lines, tracebacks, MPICH's ``Abort(N)``
lines and its BAD TERMINATION banner, dsi-mpi's own lines), how many records the output file
kept (valid JSON lines) of those finished when the fault struck and, where the code under
test has ``--resume``, whether resuming completes the file to equal an uninterrupted run.
Bad inputs run the same 5 ranks and report the time to the message.

    flock /tmp/dsi-cpu.lock python bench/faults.py --out docs/results/faults-after.jsonl

``--code DIR`` runs another checkout of dsi_mpi (for the table before a change: ``git archive
COMMIT | tar -x -C DIR``). One JSON line per fault in ``--out``, then a markdown table on stdout.
About 8 minutes on 2 cores (the hung-coordinator row of an old checkout waits 90 s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REPO, provenance
from tests.jobs import Job

EMU_T = "emulated:tpot_ms=2,ttft_ms=4"
EMU_D = "emulated:tpot_ms=0.5,ttft_ms=1,acceptance=0.8"
HANG_TIMEOUT_S = 20
NEVER_S = 90  # a job still running this long after its fault is reported as never ending


@dataclass
class Fault:
    name: str
    act: Callable[[Job], None] | None  # None: bad input, no fault during the run
    args: list[str] = field(default_factory=list)  # replaces flags of the base command line
    env: dict[str, str] = field(default_factory=dict)
    bound_s: float = 30.0  # how long to wait for the job after the fault
    setup: Callable[[Path], None] | None = None  # prepares the work folder
    resume: bool = False  # then resume the run and compare with the uninterrupted one


def _read_records(path: Path) -> tuple[list[dict], int]:
    """Valid records and torn (unparseable) lines of a JSONL output."""
    if not path.exists():
        return [], 0
    good, torn = [], 0
    for line in path.read_text(errors="replace").splitlines(keepends=True):
        try:
            if not line.endswith("\n"):
                raise ValueError
            good.append(json.loads(line))
        except ValueError:
            torn += 1
    return good, torn


def _key(r: dict) -> tuple:
    return (r["mode"], r["prompt_index"], r.get("repeat", 0))


def _flags(base: list[str], replace: list[str]) -> list[str]:
    """``base`` with the flags in ``replace`` set (a flag then value, or a flag alone)."""
    out = list(base)
    sources = (
        "--prompt",
        "--prompt-file",
        "--prompt-ids",
    )  # one of them: a new one replaces the old
    for flag in sources:
        if flag in replace and flag not in out:
            for old in sources:
                if old in out:
                    del out[out.index(old) : out.index(old) + 2]
    i = 0
    while i < len(replace):
        flag = replace[i]
        value = (
            replace[i + 1] if i + 1 < len(replace) and not replace[i + 1].startswith("--") else None
        )
        if flag in out:
            j = out.index(flag)
            has_value = j + 1 < len(out) and not out[j + 1].startswith("--")
            del out[j : j + (2 if has_value else 1)]
        out += [flag] + ([value] if value is not None else [])
        i += 2 if value is not None else 1
    return out


def _summary(stderr: str, stdout: str) -> dict:
    """What the user saw on stderr (MPICH prints its banner on stdout: looked for in both)."""
    lines = [x for x in stderr.splitlines() if x.strip()]
    banner = re.search(r"PID (\d+) RUNNING AT", stderr + stdout)
    return {
        "stderr_lines": len(lines),
        "tracebacks": stderr.count("Traceback (most recent call last)"),
        "abort_lines": sum("Abort(" in x for x in lines),
        "banner": "BAD TERMINATION" in stderr + stdout,
        "banner_pid": int(banner.group(1)) if banner else None,
        "segfault": "signal 11" in stderr or "Segmentation fault" in stderr,
        "dsi_lines": [x for x in lines if x.startswith("dsi-mpi")][:4],
        "last_line": lines[-1][:200] if lines else "",
    }


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.env = dict(os.environ)
        if args.code:
            self.env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [args.code, self.env.get("PYTHONPATH")])
            )
        prompts = workdir / "prompts.jsonl"
        with open(prompts, "w") as fh:
            for i in range(args.prompts):
                fh.write(
                    json.dumps({"prompt_ids": [1 + i, 7, 3 + 2 * i, 11, 5 + i % 7, 2, 9]}) + "\n"
                )
        self.base = [
            "run",
            "--target",
            EMU_T,
            "--drafter",
            EMU_D,
            "--mode",
            "dsi",
            "--lookahead",
            "3",
            "--max-new-tokens",
            str(args.tokens),
            "--prompt-file",
            str(prompts),
        ]
        help_text = subprocess.run(
            [sys.executable, "-m", "dsi_mpi", "run", "--help"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        self.has_resume = "--resume" in help_text
        self.clean: dict[tuple, list[int]] = {}
        self.startup_s = self.clean_s = 0.0
        self.clean_walls: list[float] = []

    def launch(self, args: list[str], output: Path, env: dict[str, str] | None = None) -> Job:
        return Job(
            self.args.ranks,
            [*args, "--output", str(output)],
            self.workdir,
            env=self.env | (env or {}),
        )

    def reference(self) -> None:
        """The start-up time (a one-token run) and the uninterrupted run."""
        out = self.workdir / "startup.jsonl"
        with self.launch(
            _flags(self.base, ["--max-new-tokens", "1", "--num-prompts", "1"]), out
        ) as job:
            assert job.wait(300) == 0, job.stderr()
            self.startup_s = job.ended - job.started
        out = self.workdir / "clean.jsonl"
        with self.launch(self.base, out) as job:
            assert job.wait(600) == 0, job.stderr()
            self.clean_s = job.ended - job.started
        records, torn = _read_records(out)
        assert torn == 0 and len(records) == self.args.prompts
        self.clean = {_key(r): r["tokens"] for r in records}
        self.clean_walls = [r["wall_time_s"] for r in records]

    def fault_time(self) -> float:
        return self.startup_s + 0.4 * (self.clean_s - self.startup_s)

    def estimated_finished(self, elapsed: float) -> int:
        """Records finished ``elapsed`` s after launch in the uninterrupted run (an estimate
        for code that writes nothing before the end)."""
        t, n = self.startup_s, 0
        for wall in self.clean_walls:
            t += wall
            if t > elapsed:
                break
            n += 1
        return n

    def run(self, fault: Fault) -> dict:
        tag = re.sub(r"\W+", "-", fault.name).strip("-")[:40]
        out = self.workdir / f"{tag}.jsonl"
        if fault.setup is not None:
            fault.setup(out)
        args = _flags(self.base, fault.args)
        row: dict = {"fault": fault.name}
        with self.launch(args, out, fault.env) as job:
            if fault.act is None:
                code = job.wait(fault.bound_s)
                row |= {
                    "exit": code,
                    "message_s": round(job.ended - job.started, 2) if code is not None else None,
                }
            else:
                job.wait_for_ranks()
                pids = job.ranks()
                at = job.started + self.fault_time()
                while time.monotonic() < at and job.poll() is None:
                    time.sleep(0.01)
                finished, _ = _read_records(out)
                struck = time.monotonic()
                if job.poll() is not None:
                    raise RuntimeError(
                        f"{fault.name}: the run ended before its fault; use more prompts"
                    )
                fault.act(job)
                code = job.wait(fault.bound_s)
                gone = job.wait_gone(5.0 if code is not None else 0.0)
                row |= {
                    "exit": code,
                    "ended_s": round(job.ended - struck, 2) if code is not None else None,
                    "gone_s": round(gone - struck, 2) if gone is not None else None,
                    "finished_at_fault": len(finished) if self.has_resume else None,
                    "finished_estimate": self.estimated_finished(struck - job.started),
                    "rank_pids": pids,
                }
            stderr, stdout = job.stderr(), job.stdout()
        records, torn = _read_records(out)
        row |= {"records_kept": len(records), "torn_lines": torn, "output_exists": out.exists()}
        row |= _summary(stderr, stdout)
        if row.get("banner_pid") is not None and "rank_pids" in row:
            names = {pid: rank for rank, pid in row["rank_pids"].items()}
            row["banner_rank"] = names.get(row["banner_pid"])
        if fault.resume and self.has_resume:
            row |= self.resume(args, out)
        return row

    def resume(self, args: list[str], out: Path) -> dict:
        with self.launch(args + ["--resume"], out) as job:
            code = job.wait(600)
        records, torn = _read_records(out)
        same = {_key(r): r["tokens"] for r in records} == self.clean and len(records) == len(
            self.clean
        )
        return {
            "resume_exit": code,
            "resume_records": len(records),
            "resume_equals_clean": same and torn == 0,
        }


def faults(bench: Bench, tiny: dict[str, str]) -> list[Fault]:
    def kill(rank: int) -> Callable[[Job], None]:
        return lambda job: job.signal_rank(rank, signal.SIGKILL)

    def stop(rank: int) -> Callable[[Job], None]:
        return lambda job: job.signal_rank(rank, signal.SIGSTOP)

    def exists(path: Path) -> None:
        path.write_text('{"an": "old file"}\n')

    def no_weights(_: Path) -> None:
        import shutil

        folder = bench.workdir / "no-weights"
        if not folder.exists():
            shutil.copytree(tiny["llama"], folder)
            for weights in folder.glob("*.safetensors"):
                weights.unlink()

    def empty(_: Path) -> None:
        (bench.workdir / "empty").mkdir(exist_ok=True)

    def prompt_file(name: str, line: str) -> Callable[[Path], None]:
        return lambda _: (bench.workdir / name).write_text(line + "\n")

    hung = ["--timeout", str(HANG_TIMEOUT_S)]
    hang_bound = HANG_TIMEOUT_S + NEVER_S - 20
    wd = bench.workdir
    return [
        Fault("SIGKILL rank 0 (coordinator)", kill(0), resume=True),
        Fault("SIGKILL rank 1 (drafter)", kill(1), resume=True),
        Fault("SIGKILL rank 2 (target)", kill(2), resume=True),
        Fault("SIGKILL rank 4 (target)", kill(4), resume=True),
        Fault("SIGTERM to mpiexec", lambda job: job.signal_launcher(signal.SIGTERM), resume=True),
        Fault(
            "SIGTERM to every process (Slurm time limit)",
            lambda job: job.signal_all(signal.SIGTERM),
            resume=True,
        ),
        Fault(
            "SIGTERM to rank 3 alone", lambda job: job.signal_rank(3, signal.SIGTERM), resume=True
        ),
        Fault(
            "Ctrl-C (SIGINT to mpiexec's process group)",
            lambda job: job.signal_launcher(signal.SIGINT),
            resume=True,
        ),
        Fault("target hung (SIGSTOP rank 3), --timeout 20", stop(3), hung, bound_s=hang_bound),
        Fault("drafter hung (SIGSTOP rank 1), --timeout 20", stop(1), hung, bound_s=hang_bound),
        Fault("coordinator hung (SIGSTOP rank 0), --timeout 20", stop(0), hung, bound_s=hang_bound),
        Fault(
            "--target HuggingFaceTB/SmolLM2-135M (a hub id), offline",
            None,
            ["--target", "HuggingFaceTB/SmolLM2-135M", "--mode", "nonsi", "--prompt-ids", "1,2,3"],
            env={"HF_HUB_OFFLINE": "1"},
            bound_s=120,
        ),
        Fault(
            "--target HuggingFaceTB/SmolLM2-135M (a hub id), no network",
            None,
            ["--target", "HuggingFaceTB/SmolLM2-135M", "--mode", "nonsi", "--prompt-ids", "1,2,3"],
            bound_s=120,
        ),
        Fault(
            "an empty folder as --target",
            None,
            ["--target", str(wd / "empty"), "--mode", "nonsi", "--prompt-ids", "1,2,3"],
            setup=empty,
            bound_s=120,
        ),
        Fault(
            '"prompt_ids": [1, "abc", 3]',
            None,
            ["--prompt-file", str(wd / "abc.jsonl")],
            setup=prompt_file("abc.jsonl", '{"prompt_ids": [1, "abc", 3]}'),
            bound_s=120,
        ),
        Fault(
            '"prompt_ids": 5',
            None,
            ["--prompt-file", str(wd / "five.jsonl")],
            setup=prompt_file("five.jsonl", '{"prompt_ids": 5}'),
            bound_s=120,
        ),
        Fault(
            "a model folder with config.json but no weights",
            None,
            [
                "--target",
                str(wd / "no-weights"),
                "--drafter",
                str(wd / "no-weights"),
                "--prompt-ids",
                "1,2,3",
                "--max-new-tokens",
                "8",
            ],
            setup=no_weights,
            bound_s=180,
        ),
        Fault("bad input: --lookahead 0", None, ["--lookahead", "0"], bound_s=120),
        Fault(
            "an existing --output file",
            None,
            ["--num-prompts", "2", "--max-new-tokens", "4"],
            setup=exists,
            bound_s=120,
        ),
    ]


def table(rows: list[dict]) -> str:
    out = [
        "| fault | exit | ended after | all gone after | stderr | kept / finished | message |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "ended_s" in r:
            ended = (
                f"{r['ended_s']} s" if r["exit"] is not None else f"still running after {NEVER_S} s"
            )
            gone = f"{r['gone_s']} s" if r.get("gone_s") is not None else "-"
            finished = (
                r["finished_at_fault"]
                if r.get("finished_at_fault") is not None
                else f"~{r['finished_estimate']}"
            )
            kept = f"{r['records_kept']} / {finished}"
            if r.get("resume_exit") is not None:
                same = "equal" if r["resume_equals_clean"] else "NOT equal"
                kept += f"; resumed: {r['resume_records']}, {same}"
        else:
            ended = f"{r['message_s']} s" if r.get("message_s") is not None else "-"
            gone, kept = "-", f"{r['records_kept']} lines" if r["output_exists"] else "no file"
        noise = []
        if r["tracebacks"]:
            noise.append(f"{r['tracebacks']} tracebacks")
        if r["abort_lines"]:
            noise.append(f"{r['abort_lines']} Abort lines")
        if r["banner"]:
            rank = r.get("banner_rank")
            noise.append("MPICH banner" + (f" (names rank {rank})" if rank is not None else ""))
        if r["segfault"]:
            noise.append("segfault")
        stderr = f"{r['stderr_lines']} lines" + (f": {', '.join(noise)}" if noise else "")
        message = "; ".join(r["dsi_lines"][:2]) or r["last_line"]
        out.append(
            f"| {r['fault']} | {r['exit']} | {ended} | {gone} | {stderr} | {kept} | "
            f"{message.replace('|', '/')[:220]} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=5)
    p.add_argument("--prompts", type=int, default=40)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--code", help="a checkout of dsi_mpi to run instead of this one")
    p.add_argument("--only", help="comma-separated substrings of the fault names to run")
    p.add_argument("--out", help="JSONL file for the rows")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="dsi-faults-") as tmp:
        workdir = Path(tmp)
        bench = Bench(args, workdir)
        from dsi_mpi.tiny import build_suite

        tiny = build_suite(str(workdir / "tiny"))
        bench.reference()
        meta = provenance(args.ranks) | {
            "code": args.code or str(REPO),
            "has_resume": bench.has_resume,
            "startup_s": round(bench.startup_s, 2),
            "clean_s": round(bench.clean_s, 2),
            "fault_at_s": round(bench.fault_time(), 2),
            "target": EMU_T,
            "drafter": EMU_D,
            "prompts": args.prompts,
            "tokens": args.tokens,
        }
        print(json.dumps(meta), flush=True)
        rows = []
        for fault in faults(bench, tiny):
            if args.only and not any(s in fault.name for s in args.only.split(",")):
                continue
            row = bench.run(fault)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "w") as fh:
                fh.write(json.dumps(meta) + "\n")
                for row in rows:
                    fh.write(json.dumps(row) + "\n")
        print(table(rows))


if __name__ == "__main__":
    main()
