"""The job scripts in slurm/, unchanged, under a real Slurm on this machine.

``tests/slurm/local_slurm.sh`` installs Slurm when it is missing (Debian's packages) and
starts a private cluster of two nodes (two slurmds on this host, 64 CPUs and 4 fake GPUs
each: Slurm schedules them and sets CUDA_VISIBLE_DEVICES, nothing computes on them). Each
test submits a job script with sbatch as a user would: the size as sbatch options, the run as
`dsi-mpi run` flags after the script's name, the job's settings (interpreter, MPI plugin,
binding check, smoke preset) as DSI_* variables. It waits for the job (bounded) and checks
the output exactly: DSI and SI give the non-SI tokens for every prompt, and with a tiny real
model they are the target's own greedy output. The daemons are stopped at the end, also
after a failure. Skipped, with the reason, only where Slurm cannot be installed or run (not
root, no apt).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "slurm"
LOCAL_SLURM = Path(__file__).resolve().parent / "local_slurm.sh"
# A cluster of its own (state dir, ports), so that a developer's test cluster is left alone.
CLUSTER = {
    "DSI_SLURM_DIR": "/tmp/dsi-slurm-pytest",
    "DSI_SLURM_CTLD_PORT": "6827",
    "DSI_SLURM_SLURMD_PORT": "6828",  # and 6829 for the second node
    "DSI_SLURM_NODES": "2",
    "DSI_SLURM_CPUS": "64",
    "DSI_SLURM_GPUS": "4",
}
JOB_TIMEOUT_S = 240
# The first row of bench/table2.csv (Starcoder-15B / 168M on HumanEval: TTFT = TPOT x the
# paper's Table 3 ratio, 20.6 x 1.35 and 6.8 x 1.19): the sweep's first config, DSI_SMOKE's.
EMULATED_TARGET = "emulated:tpot_ms=20.6,ttft_ms=27.81"
EMULATED_DRAFTER = "emulated:tpot_ms=6.8,ttft_ms=8.092,acceptance=0.93"
MODES = ("dsi", "si", "nonsi")
ALL_MODES = ["--mode", ",".join(MODES)]


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _clean_environ() -> dict[str, str]:
    """The test's environment without settings that would change what a job does: a user's
    DSI_* parameters, or the variables of a Slurm job the tests may themselves run in."""
    drop = ("DSI_", "SLURM_", "SBATCH_", "SRUN_", "SALLOC_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def _local_slurm(env: dict[str, str], *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(LOCAL_SLURM), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def slurm() -> Iterator[dict[str, str]]:
    """The environment for sbatch: SLURM_CONF of a running private cluster."""
    if sys.platform != "linux" or shutil.which("bash") is None:
        pytest.skip("the local Slurm needs Linux and bash")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm runs its daemons as root (tests/slurm/README.md); "
                    "not root here")
    env = _clean_environ() | CLUSTER
    install = _local_slurm(env, "install", timeout=900)
    if install.returncode != 0:
        pytest.skip(f"Slurm cannot be installed here: {_tail(install.stderr, 8)}")
    try:
        start = _local_slurm(env, "start", timeout=300)
        assert start.returncode == 0, f"local Slurm did not start:\n{_tail(start.stderr)}"
        match = re.search(r"^export SLURM_CONF=(\S+)$", start.stdout, re.M)
        assert match, start.stdout
        yield env | {"SLURM_CONF": match.group(1)}
    finally:
        stop = _local_slurm(env, "stop", timeout=300)
        assert stop.returncode == 0, f"local Slurm did not stop:\n{_tail(stop.stderr)}"


def submit(slurm: dict[str, str], script: str, sbatch_args: list[str], run_args: list[str],
           job_env: dict[str, str], submit_dir: Path, expect: str = "COMPLETED"
           ) -> tuple[str, str]:
    """``sbatch SBATCH_ARGS slurm/<script> RUN_ARGS`` from ``submit_dir`` and wait; returns
    (job id, job output)."""
    env = slurm | {
        "DSI_MPI_PLUGIN": "pmi2",  # the pip MPICH speaks PMI-1/2, not PMIx
        "DSI_PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    } | job_env
    command = ["sbatch", "--parsable", *sbatch_args, str(SLURM_DIR / script), *run_args]
    proc = subprocess.run(command, cwd=submit_dir, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"sbatch {script} failed: {proc.stderr}"
    job_id = proc.stdout.strip().split(";")[0]
    waited = _local_slurm(env, "wait-job", job_id, str(JOB_TIMEOUT_S), timeout=JOB_TIMEOUT_S + 60)
    output = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}"
                       for p in sorted(submit_dir.glob("*.out")))
    state = (waited.stderr.strip().splitlines() or [""])[-1]
    assert state.endswith(f"job {job_id}: {expect}"), f"{script}: {state}\n{_tail(output, 60)}"
    return job_id, output


def read_records(path: Path) -> list[dict]:
    assert path.is_file(), f"no output at {path}"
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_modes_agree(records: list[dict], prompts: int, max_new_tokens: int | None = None,
                       modes: tuple[str, ...] = MODES) -> dict[int, list[int]]:
    """DSI and SI tokens equal the non-SI tokens, prompt by prompt; returns the latter."""
    assert sorted((r["mode"], r["prompt_index"]) for r in records) == sorted(
        (m, i) for m in modes for i in range(prompts))
    nonsi = {r["prompt_index"]: r["tokens"] for r in records if r["mode"] == "nonsi"}
    for r in records:
        assert r["tokens"] == nonsi[r["prompt_index"]], (
            f"{r['mode']} prompt {r['prompt_index']} differs from non-SI")
        if max_new_tokens is not None:
            assert r["num_new_tokens"] == max_new_tokens
    return nonsi


def bindings(output: str) -> dict[int, tuple[str, str, str]]:
    """rank -> (role, node, device) from the dry run the job scripts print (DSI_CHECK_BINDING)."""
    found = re.findall(r"device binding: rank (\d+) (\w+) on (.+?): "
                       r"CUDA_VISIBLE_DEVICES=\S+ \(.*?\) -> (\S+)", output)
    return {int(rank): (role, node, device) for rank, role, node, device in found}


def test_one_node_job(slurm: dict[str, str], tmp_path: Path) -> None:
    """slurm/dsi_node.sbatch: coordinator, drafter and 2 targets on a node of 3 (fake) GPUs."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_ids": [1, 2, 3]}\n{"prompt_ids": [7, 8, 9, 10, 11]}\n')
    run_args = ["--target", EMULATED_TARGET, "--drafter", EMULATED_DRAFTER, *ALL_MODES,
                "--prompt-file", str(prompts), "--max-new-tokens", "24", "--lookahead", "3"]
    job_id, output = submit(slurm, "dsi_node.sbatch", ["--ntasks=4", "--gpus-per-node=3"],
                            run_args, {"DSI_CHECK_BINDING": "1"}, tmp_path)
    records = read_records(tmp_path / "dsi-out" / f"{job_id}.jsonl")  # the default place
    assert_modes_agree(records, prompts=2, max_new_tokens=24)
    dsi = [r for r in records if r["mode"] == "dsi"]
    assert all(r["sp"] == 2 and r["lookahead"] == 3 and r["target"] == EMULATED_TARGET
               for r in dsi)
    bound = bindings(output)
    roles = ["coordinator", "drafter", "target", "target"]
    assert [bound[r][0] for r in range(4)] == roles, output
    assert [bound[r][2] for r in range(4)] == ["cpu", "cuda:0", "cuda:1", "cuda:2"], output
    # The job prints the command it runs: our flags, passed through after the launcher's.
    assert re.search(r"^\+ srun --ntasks=4 .* -m dsi_mpi run --output \S+ --target .* "
                     r"--lookahead 3 $", output, re.M), output


def test_multi_node_job(slurm: dict[str, str], tmp_path: Path) -> None:
    """slurm/dsi_multinode.sbatch on 2 nodes of 2 GPUs: coordinator, drafter and one target on
    the first node, two targets on the second, each model rank on its own GPU of its node.
    DSI_SMOKE=1 runs Table 2's first row in all three modes on prompt ids 1..8."""
    job_id, output = submit(slurm, "dsi_multinode.sbatch",
                            ["--nodes=2", "--ntasks-per-node=3", "--gpus-per-node=2"],
                            ["--max-new-tokens", "20"],
                            {"DSI_SMOKE": "1", "DSI_CHECK_BINDING": "1"}, tmp_path)
    records = read_records(tmp_path / "dsi-out" / f"{job_id}.jsonl")
    assert_modes_agree(records, prompts=1, max_new_tokens=20)
    dsi = next(r for r in records if r["mode"] == "dsi")
    assert (dsi["sp"], dsi["target"], dsi["drafter"]) == (3, EMULATED_TARGET, EMULATED_DRAFTER)
    bound = bindings(output)
    assert sorted(bound) == [0, 1, 2, 3, 4], output
    first, second = bound[0][1], bound[3][1]
    assert first != second, output
    assert [bound[r][1] for r in range(5)] == [first, first, first, second, second], output
    devices = ["cpu", "cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert [bound[r][2] for r in range(5)] == devices, output


def test_sweep_job_array(slurm: dict[str, str], tmp_path: Path) -> None:
    """slurm/dsi_sweep.sbatch over bench/table2.csv (emulated, CPU): of the grid rows x
    lookahead {1, 5} x SP {1, 2}, tasks 0 and 3 are Starcoder/HumanEval with (k 1, SP 1) and
    (k 5, SP 2), task 9 is Vicuna-13B/CNN-DM with (k 1, SP 2)."""
    grid = ["--lookahead", "1,5", "--sp=1,2", "--max-new-tokens", "20", "--repeats", "1",
            "--warmup", "0"]
    job_id, _ = submit(slurm, "dsi_sweep.sbatch", ["--array=0,3,9", "--ntasks=4"], grid, {},
                       tmp_path)
    starcoder = (EMULATED_TARGET, EMULATED_DRAFTER)
    vicuna = ("emulated:tpot_ms=37.7,ttft_ms=202.072",
              "emulated:tpot_ms=2.5,ttft_ms=2.6,acceptance=0.63")
    for task, row, lookahead, sp, models in [(0, "starcoder15b-168m-humaneval", 1, 1, starcoder),
                                             (3, "starcoder15b-168m-humaneval", 5, 2, starcoder),
                                             (9, "vicuna13b-68m-cnndm", 1, 2, vicuna)]:
        name = f"{job_id}_{task}-{row}-k{lookahead}-sp{sp}.jsonl"
        records = read_records(tmp_path / "dsi-out" / name)
        assert_modes_agree(records, prompts=1, max_new_tokens=20)
        dsi = next(r for r in records if r["mode"] == "dsi")
        assert (dsi["lookahead"], dsi["sp"], dsi["target"], dsi["drafter"]) == (
            lookahead, sp, *models)
    # 6 rows x 2 x 2 = 24 points: task 24 does not exist, and says how to submit.
    _, output = submit(slurm, "dsi_sweep.sbatch", ["--array=24", "--ntasks=4"], grid, {},
                       tmp_path, expect="FAILED")
    assert "submit with --array=0-23" in output


def test_one_node_job_with_a_tiny_model(slurm: dict[str, str], tiny_suite: dict[str, str],
                                        tmp_path: Path) -> None:
    """slurm/dsi_node.sbatch with real (tiny, float64) models on the CPU, on a node without
    GPUs (--gpus-per-node=0): every mode gives the target's own greedy output. The prompt
    file's folder has a space in its name, which must survive sbatch, the script and srun."""
    import torch
    from transformers import AutoModelForCausalLM

    from dsi_mpi.backends.hf import load_tokenizer

    target, max_new = tiny_suite["llama"], 16
    texts = ["Once upon a time", "The coordinator owns the committed sequence"]
    prompts = tmp_path / "my prompts" / "prompts.txt"
    prompts.parent.mkdir()
    prompts.write_text("\n".join(texts) + "\n")
    run_args = ["--target", target, "--drafter", tiny_suite["llama/perturbed"], *ALL_MODES,
                "--device", "cpu", "--dtype", "float64", "--prompt-file", str(prompts),
                "--max-new-tokens", str(max_new), "--lookahead", "3"]
    job_id, _ = submit(slurm, "dsi_node.sbatch", ["--ntasks=4", "--gpus-per-node=0"], run_args,
                       {}, tmp_path)
    nonsi = assert_modes_agree(read_records(tmp_path / "dsi-out" / f"{job_id}.jsonl"), prompts=2)

    tokenizer = load_tokenizer(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float64).eval()
    for index, text in enumerate(texts):
        ids = list(tokenizer(text)["input_ids"])
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)
        assert nonsi[index] == out[0, len(ids):].tolist(), (
            f"prompt {index} is not the target's greedy output")


def test_a_job_stopped_before_its_time_limit_requeues_and_resumes(slurm: dict[str, str],
                                                                   tmp_path: Path) -> None:
    """The TERM that --signal=B:TERM@120 sends the batch shell before the time limit (sent
    here with scancel --batch, mid-run): the step stops keeping its records, the job requeues
    itself and runs again with --resume, and the output ends complete: every (mode, prompt)
    once, DSI equal to non-SI."""
    prompts = tmp_path / "prompts.jsonl"
    count = 24
    prompts.write_text("".join(json.dumps({"prompt_ids": [1 + i, 5, 2 + i % 5]}) + "\n"
                               for i in range(count)))
    out = tmp_path / "out.jsonl"
    run_args = ["--target", "emulated:tpot_ms=3,ttft_ms=4", "--drafter",
                "emulated:tpot_ms=1,ttft_ms=1,acceptance=0.8", "--mode", "dsi,nonsi",
                "--prompt-file", str(prompts), "--max-new-tokens", "40", "--output", str(out)]
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = slurm | {"DSI_MPI_PLUGIN": "pmi2", "DSI_PYTHON": sys.executable, "PYTHONPATH": path}
    proc = subprocess.run(["sbatch", "--parsable", "--ntasks=4", "--gpus-per-node=0",
                           str(SLURM_DIR / "dsi_node.sbatch"), *run_args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not out.exists() or len(out.read_text().splitlines()) < 3:
        assert time.monotonic() < deadline, "no records"
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=TERM", "--batch", job_id], env=env, check=True, timeout=30)
    # Slurm holds a requeued job for 2 minutes (its BeginTime). Lifting the hold (scontrol
    # update StartTime=now) made the resumed step fail in PMI2 at its end ("failed to send temp
    # kvs"), probably as the first step's PMI state was not gone yet: the test waits.
    waited = _local_slurm(env, "wait-job", job_id, str(JOB_TIMEOUT_S), timeout=JOB_TIMEOUT_S + 60)
    log = "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("*.out")))
    assert waited.returncode == 0, f"{waited.stderr}\n{_tail(log, 60)}"
    show = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True,
                          text=True, timeout=30).stdout
    assert "Restarts=1" in show, show
    assert "stopped by SIGTERM after" in log and "--resume" in log, log
    assert re.search(r"wrote \d+ records to \S+ \(\d+ were there already\)", log), log
    assert_modes_agree(read_records(out), prompts=count, modes=("dsi", "nonsi"))
