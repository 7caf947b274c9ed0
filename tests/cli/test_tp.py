"""Target servers of two ranks each (``--target-ranks 2``: transformers' tensor parallelism over
gloo), run as real ``mpiexec`` jobs of 6 ranks (1 coordinator + 1 drafter + 2 servers x 2): the
outputs equal ``generate``'s, a cancel mid-forward leaves both ranks of a server with the same
correct cache, a follower that dies or hangs ends the job within the bound with its rank, role
and server named, and a bad ``--target-ranks`` is one line, exit 2, fast (issue 23).

The tiny Llama has 4 attention and 2 key/value heads: two ranks keep one KV head each.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.jobs import MPIEXEC, Job

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpich)")

RANKS = 6
ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[5, 17, 42, 8], [1, 7, 3, 11, 5], [9, 2, 64, 30]]
NEW = 16
# --timeout of the fault tests: longer than 6 ranks take to load on 2 cores (rank 0 names a
# rank that is not ready within --timeout), the more so for the killed follower, whose job
# ends at once whatever the timeout
TIMEOUT_S = {signal.SIGSTOP: 45.0, signal.SIGKILL: 90.0}
GONE_S = 2.0  # the job ends within --timeout + this
BAD_INPUT_S = 3.0


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, DSI_MPI_QUIET_ERRORS="1", **extra)


def _args(suite: dict[str, str], prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--target", suite["llama"], "--drafter", suite["llama/perturbed"],
            "--dtype", "float64", "--target-ranks", "2", "--lookahead", "3",
            "--max-new-tokens", str(NEW), "--prompt-file", str(prompts), "--output", str(out),
            "--quiet", *extra]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tp") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in PROMPTS))
    return path


def _generate(path: str) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    out = []
    with torch.inference_mode():
        for p in PROMPTS:
            ids = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0)[0, len(p):].tolist()
            out.append(ids)
    return out


def _sampled(path: str, temperature: float, top_k: int) -> list[list[int]]:
    """The target alone with the run's shared noise (``reference.generate_nonsi``)."""
    from dsi_mpi.backends.hf import HFBackend
    from dsi_mpi.reference import generate_nonsi
    from dsi_mpi.verify import SamplingParams

    backend = HFBackend(path, dtype="float64")
    params = SamplingParams(temperature=temperature, top_k=top_k, seed=0)
    return [generate_nonsi(backend, p, NEW, params).tokens for p in PROMPTS]


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "shared-noise"])
def test_two_servers_of_two_ranks_equal_generate(tiny_suite: dict[str, str], prompts: Path,
                                                 tmp_path: Path, sampling: bool) -> None:
    out = tmp_path / "out.jsonl"
    extra = ("--temperature", "0.9", "--top-k", "40") if sampling else ()
    args = _args(tiny_suite, prompts, out, "--mode", "dsi,si,nonsi", "--timeout", "120", *extra)
    # every step, every rank of a server checks that both hold caches of the same length
    with Job(RANKS, args, tmp_path, env=_env(DSI_MPI_TP_CHECK="1")) as job:
        assert job.wait(400) == 0, job.stderr()
    want = (_sampled(tiny_suite["llama"], 0.9, 40) if sampling
            else _generate(tiny_suite["llama"]))
    records = _records(out)
    assert len(records) == 3 * len(PROMPTS)
    for r in records:
        assert r["tokens"] == want[r["prompt_index"]], (r["mode"], r["prompt_index"])
        assert r["tp_size"] == 2
        assert r["target_ranks"] == ([2, 4] if r["mode"] == "dsi" else [2])
    assert any(r["verifications_cancelled"] for r in records if r["mode"] == "dsi") or sampling


def test_a_cancel_mid_forward_leaves_both_ranks_the_same_correct_cache(
        tiny_suite: dict[str, str], tmp_path: Path) -> None:
    script = ROOT / "tests" / "cli" / "tp_cancel.py"
    import subprocess

    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py", str(script),
                           tiny_suite["llama"]], capture_output=True, text=True, timeout=400,
                          env=_env(), cwd=tmp_path)
    assert proc.returncode == 0 and "ok: 9 agreements" in proc.stdout, proc.stdout + proc.stderr


def _run_until(suite: dict[str, str], prompts: Path, tmp_path: Path, records: int,
               timeout_s: float) -> tuple:
    out = tmp_path / "out.jsonl"
    many = tmp_path / "many.jsonl"  # enough prompts that the job is still running at the fault
    many.write_text(prompts.read_text() * 20)
    job = Job(RANKS, _args(suite, many, out, "--mode", "dsi", "--timeout", str(timeout_s)),
              tmp_path, env=_env())
    deadline = time.monotonic() + 300
    while len(_records(out)) < records:
        assert job.poll() is None, f"the job ended before its fault: {job.stderr()}"
        assert time.monotonic() < deadline, "no records after 300 s"
        time.sleep(0.01)
    job.ranks()
    return job, out, many


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["hung", "killed"])
def test_a_follower_that_hangs_or_dies_ends_the_job_named(
        tiny_suite: dict[str, str], prompts: Path, tmp_path: Path, sig: int) -> None:
    timeout_s = TIMEOUT_S[sig]
    job, out, many = _run_until(tiny_suite, prompts, tmp_path, 2, timeout_s)
    with job:
        finished = len(_records(out))
        struck = time.monotonic()
        job.signal_rank(3, sig)  # the follower of the server led by rank 2
        code = job.wait(timeout_s + 60)
        ended = time.monotonic()
        stderr = job.stderr()
        assert code not in (None, 0), stderr
        assert ended - struck < timeout_s + GONE_S, (ended - struck, stderr)
        if sig == signal.SIGSTOP:
            assert code == 1, stderr
            assert re.search(r"rank 3 \(follower of target server 2\) (has sent nothing|did not "
                             r"reach)", stderr), stderr
        else:  # MPICH's launcher ends the job at once, as for any rank that dies, and says
            # so (naming a process id, not the rank: none of our code runs after a SIGKILL)
            said = job.stdout() + stderr
            assert "BAD TERMINATION" in said and "Killed (signal 9)" in said, said
    kept = _records(out)
    assert len(kept) >= finished
    want = _generate(tiny_suite["llama"])
    assert all(r["tokens"] == want[r["prompt_index"] % len(PROMPTS)] for r in kept)
    if sig == signal.SIGKILL:  # --resume finishes the file with the same servers
        args = _args(tiny_suite, many, out, "--mode", "dsi", "--timeout", "120", "--resume")
        with Job(RANKS, args, tmp_path, env=_env()) as again:
            assert again.wait(400) == 0, again.stderr()
        records = _records(out)
        assert len(records) == 20 * len(PROMPTS)
        assert all(r["tokens"] == want[r["prompt_index"] % len(PROMPTS)] for r in records)
        # ... and never mixes in a run with another --target-ranks
        mixed = [a if a != "2" else "1" for a in args]
        with Job(4, mixed, tmp_path, env=_env()) as other:
            assert other.wait(60) == 2
            assert "was written with tp_size 2, this run has 1" in other.stderr()


@pytest.mark.parametrize(("ranks", "target", "n", "message"), [
    (5, "llama", 2, "do not make whole servers of 2 ranks"),
    (6, "llama", 4, "--target-ranks 4 must divide the target's 2 key/value heads"),
    (6, "gpt2", 2, "transformers has no tensor-parallel plan for gpt2 models"),
    (6, "llama", 0, "--target-ranks must be >= 1, got 0"),
])
def test_a_bad_target_ranks_is_one_line_exit_2_fast(
        tiny_suite: dict[str, str], prompts: Path, tmp_path: Path, ranks: int, target: str,
        n: int, message: str) -> None:
    args = _args(tiny_suite, prompts, tmp_path / "out.jsonl", "--target", tiny_suite[target],
                 "--drafter", tiny_suite[f"{target}/perturbed"], "--target-ranks", str(n))
    with Job(ranks, args, tmp_path, env=_env()) as job:
        code = job.wait(60)
        took = job.ended - job.started
        lines = [x for x in job.stderr().splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("dsi-mpi: error: ") and message in lines[0], lines
    if target != "gpt2":  # found before transformers is imported (the plan needs it)
        assert took < BAD_INPUT_S, f"{took:.1f} s to report {lines[0]}"
    assert not (tmp_path / "out.jsonl").exists()
