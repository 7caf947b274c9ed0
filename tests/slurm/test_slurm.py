"""The job scripts in slurm/, unchanged, under a real Slurm on this machine.

``tests/slurm/local_slurm.sh`` installs Slurm when it is missing (Debian's packages) and
starts a private cluster of two nodes (two slurmds on this host, 64 CPUs and 4 fake GPUs
each: Slurm schedules them and sets CUDA_VISIBLE_DEVICES, nothing computes on them). Each
test submits a job script with sbatch, picking the CPU variant through environment variables
and the size through sbatch options, waits for it (bounded), and checks the output exactly:
DSI and SI give the non-SI tokens for every prompt, and with a tiny real model they are the
target's own greedy output. The daemons are stopped at the end, also after a failure.
Skipped, with the reason, only where Slurm cannot be installed or run (not root, no apt).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
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
EMULATED_TARGET = "emulated:tpot_ms=20.6,ttft_ms=27.8"  # DSI_SMOKE's models
MODES = ("dsi", "si", "nonsi")


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _clean_environ() -> dict[str, str]:
    """The test's environment without settings that would change what a job does: a user's
    DSI_* parameters, or the variables of a Slurm job the tests may themselves run in."""
    drop = ("DSI_", "SLURM_", "SBATCH_", "SRUN_", "SALLOC_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


@pytest.fixture(scope="module")
def slurm() -> Iterator[dict[str, str]]:
    """The environment for sbatch: SLURM_CONF of a running private cluster."""
    if sys.platform != "linux" or shutil.which("bash") is None:
        pytest.skip("the local Slurm needs Linux and bash")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm runs its daemons as root (tests/slurm/README.md); not root here")
    env = _clean_environ() | CLUSTER
    install = subprocess.run([str(LOCAL_SLURM), "install"], env=env, capture_output=True, text=True, timeout=900)
    if install.returncode != 0:
        pytest.skip(f"Slurm cannot be installed here: {_tail(install.stderr, 8)}")
    try:
        start = subprocess.run([str(LOCAL_SLURM), "start"], env=env, capture_output=True, text=True, timeout=300)
        assert start.returncode == 0, f"local Slurm did not start:\n{_tail(start.stderr)}"
        match = re.search(r"^export SLURM_CONF=(\S+)$", start.stdout, re.M)
        assert match, start.stdout
        yield env | {"SLURM_CONF": match.group(1)}
    finally:
        stop = subprocess.run([str(LOCAL_SLURM), "stop"], env=env, capture_output=True, text=True, timeout=300)
        assert stop.returncode == 0, f"local Slurm did not stop:\n{_tail(stop.stderr)}"


def submit(slurm: dict[str, str], script: str, sbatch_args: list[str], job_env: dict[str, str],
           submit_dir: Path, expect: str = "COMPLETED") -> tuple[str, str]:
    """sbatch ``slurm/<script>`` from ``submit_dir`` and wait; returns (job id, job output)."""
    env = slurm | {
        "DSI_MPI_PLUGIN": "pmi2",  # the pip MPICH speaks PMI-1/2, not PMIx
        "DSI_PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    } | job_env
    proc = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(SLURM_DIR / script)], cwd=submit_dir, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"sbatch {script} failed: {proc.stderr}"
    job_id = proc.stdout.strip().split(";")[0]
    waited = subprocess.run([str(LOCAL_SLURM), "wait-job", job_id, str(JOB_TIMEOUT_S)], env=env,
                            capture_output=True, text=True, timeout=JOB_TIMEOUT_S + 60)
    output = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(submit_dir.glob("*.out")))
    state = (waited.stderr.strip().splitlines() or [""])[-1]
    assert state.endswith(f"job {job_id}: {expect}"), f"{script}: {state}\n{_tail(output, 60)}"
    return job_id, output


def read_records(path: Path) -> list[dict]:
    assert path.is_file(), f"no output at {path}"
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_modes_agree(records: list[dict], prompts: int, max_new_tokens: int | None = None) -> dict[int, list[int]]:
    """DSI and SI tokens equal the non-SI tokens, prompt by prompt; returns the latter."""
    assert sorted((r["mode"], r["prompt_index"]) for r in records) == sorted(
        (m, i) for m in MODES for i in range(prompts))
    nonsi = {r["prompt_index"]: r["tokens"] for r in records if r["mode"] == "nonsi"}
    for r in records:
        assert r["tokens"] == nonsi[r["prompt_index"]], f"{r['mode']} prompt {r['prompt_index']} differs from non-SI"
        if max_new_tokens is not None:
            assert r["num_new_tokens"] == max_new_tokens
    return nonsi


def bindings(output: str) -> dict[int, tuple[str, str, str]]:
    """rank -> (role, node, device) from the dry run the job scripts print (DSI_CHECK_BINDING)."""
    found = re.findall(r"device binding: rank (\d+) (\w+) on (.+?): CUDA_VISIBLE_DEVICES=\S+ \(.*?\) -> (\S+)", output)
    return {int(rank): (role, node, device) for rank, role, node, device in found}


def test_one_node_job(slurm: dict[str, str], tmp_path: Path) -> None:
    """slurm/dsi_node.sbatch: coordinator, drafter and 2 targets on a node of 3 (fake) GPUs."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_ids": [1, 2, 3]}\n{"prompt_ids": [7, 8, 9, 10, 11]}\n')
    job_id, output = submit(slurm, "dsi_node.sbatch", ["--ntasks=4", "--gpus-per-node=3"], {
        "DSI_SMOKE": "1", "DSI_PROMPT_FILE": str(prompts), "DSI_MAX_NEW_TOKENS": "24", "DSI_LOOKAHEAD": "3",
        "DSI_CHECK_BINDING": "1"}, tmp_path)
    records = read_records(tmp_path / "dsi-out" / f"{job_id}.jsonl")  # the default output place
    assert_modes_agree(records, prompts=2, max_new_tokens=24)
    dsi = [r for r in records if r["mode"] == "dsi"]
    assert all(r["sp"] == 2 and r["lookahead"] == 3 and r["target"] == EMULATED_TARGET for r in dsi)
    bound = bindings(output)
    assert [bound[r][0] for r in range(4)] == ["coordinator", "drafter", "target", "target"], output
    assert [bound[r][2] for r in range(4)] == ["cpu", "cuda:0", "cuda:1", "cuda:2"], output


def test_multi_node_job(slurm: dict[str, str], tmp_path: Path) -> None:
    """slurm/dsi_multinode.sbatch on 2 nodes of 2 GPUs: coordinator, drafter and one target on
    the first node, two targets on the second, each model rank on its own GPU of its node."""
    job_id, output = submit(slurm, "dsi_multinode.sbatch",
                            ["--nodes=2", "--ntasks-per-node=3", "--gpus-per-node=2"],
                            {"DSI_SMOKE": "1", "DSI_MAX_NEW_TOKENS": "20", "DSI_CHECK_BINDING": "1"}, tmp_path)
    records = read_records(tmp_path / "dsi-out" / f"{job_id}.jsonl")
    assert_modes_agree(records, prompts=1, max_new_tokens=20)
    assert {r["sp"] for r in records if r["mode"] == "dsi"} == {3}
    bound = bindings(output)
    assert sorted(bound) == [0, 1, 2, 3, 4], output
    first, second = bound[0][1], bound[3][1]
    assert first != second, output
    assert [bound[r][1] for r in range(5)] == [first, first, first, second, second], output
    assert [bound[r][2] for r in range(5)] == ["cpu", "cuda:0", "cuda:1", "cuda:0", "cuda:1"], output


def test_sweep_job_array(slurm: dict[str, str], tmp_path: Path) -> None:
    """slurm/dsi_sweep.sbatch over Table 2 (emulated, CPU): tasks 0 and 3 of the grid
    rows x {1, 5} x SP {1, 2} are (Starcoder/HumanEval, k 1, SP 1) and (same row, k 5, SP 2)."""
    grid = {"DSI_LOOKAHEADS": "1 5", "DSI_SPS": "1 2", "DSI_MAX_NEW_TOKENS": "20", "DSI_REPEATS": "1",
            "DSI_WARMUP": "0"}
    job_id, _ = submit(slurm, "dsi_sweep.sbatch", ["--array=0,3", "--ntasks=4"], grid, tmp_path)
    row = "starcoder15b-168m-humaneval"
    for task, lookahead, sp in [(0, 1, 1), (3, 5, 2)]:
        records = read_records(tmp_path / "dsi-out" / f"{job_id}_{task}-{row}-k{lookahead}-sp{sp}.jsonl")
        assert_modes_agree(records, prompts=1, max_new_tokens=20)
        dsi = next(r for r in records if r["mode"] == "dsi")
        assert (dsi["lookahead"], dsi["sp"]) == (lookahead, sp)
        # TTFT = TPOT x the paper's Table 3 ratio: 20.6 x 1.35 and 6.8 x 1.19.
        assert dsi["target"] == "emulated:tpot_ms=20.6,ttft_ms=27.81"
        assert dsi["drafter"] == "emulated:tpot_ms=6.8,ttft_ms=8.09,acceptance=0.93"
    # 6 rows x 2 x 2 = 24 points: task 24 does not exist, and says how to submit.
    _, output = submit(slurm, "dsi_sweep.sbatch", ["--array=24", "--ntasks=4"], grid, tmp_path, expect="FAILED")
    assert "submit with --array=0-23" in output


def test_one_node_job_with_a_tiny_model(slurm: dict[str, str], tiny_suite: dict[str, str], tmp_path: Path) -> None:
    """slurm/dsi_node.sbatch with real (tiny, float64) models on the CPU, on a node without
    GPUs (--gpus-per-node=0): every mode gives the target's own greedy output."""
    import torch
    from transformers import AutoModelForCausalLM

    from dsi_mpi.backends.hf import load_tokenizer

    target, max_new = tiny_suite["llama"], 16
    texts = ["Once upon a time", "The coordinator owns the committed sequence"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(texts) + "\n")
    job_id, _ = submit(slurm, "dsi_node.sbatch", ["--ntasks=4", "--gpus-per-node=0"], {
        "DSI_TARGET": target, "DSI_DRAFTER": tiny_suite["llama/perturbed"], "DSI_DEVICE": "cpu",
        "DSI_DTYPE": "float64", "DSI_PROMPT_FILE": str(prompts), "DSI_MAX_NEW_TOKENS": str(max_new),
        "DSI_LOOKAHEAD": "3"}, tmp_path)
    nonsi = assert_modes_agree(read_records(tmp_path / "dsi-out" / f"{job_id}.jsonl"), prompts=2)

    tokenizer = load_tokenizer(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float64).eval()
    for index, text in enumerate(texts):
        ids = list(tokenizer(text)["input_ids"])
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)
        assert nonsi[index] == out[0, len(ids):].tolist(), f"prompt {index} is not the target's greedy output"
