"""What every benchmark records beside its numbers: the commit, the host, the Slurm job."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The short commit of the checkout, with ``+dirty`` when it has uncommitted changes.
    ``$DSI_GIT_COMMIT`` wins when set: a copy of the checkout on a lent GPU machine carries
    the .git of an older commit (or none), so git would name the wrong one."""
    if os.environ.get("DSI_GIT_COMMIT"):
        return os.environ["DSI_GIT_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def provenance(ranks: int) -> dict:
    return {
        "commit": git_commit(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "ranks": ranks,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def device_name(device: str) -> str:
    """The device a benchmark ran on, in words: the GPU's name, or the CPU and its cores."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
