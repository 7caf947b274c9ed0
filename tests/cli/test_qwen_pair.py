"""The real pair of the README, Qwen2.5-Coder-1.5B-Instruct drafted by Qwen2.5-Coder-0.5B-Instruct
(PyPI chunks, float32), on its own 3 ranks (coordinator, drafter, one target: the 1.5B model
loads on one rank only, about 6 GB): DSI and SI on a HumanEval prompt against ``generate``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.test_cli import MPIEXEC, launch

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpich)")

MAX_NEW = 12


def test_qwen_coder_pair_dsi_and_si_equal_generate(qwen_coder: dict[str, str],
                                                   tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "qwen.jsonl"
    proc = launch(3, "run", "--target", qwen_coder["target"], "--drafter", qwen_coder["drafter"],
                  "--mode", "dsi,si", "--lookahead", "3", "--min-drafts", "2",
                  "--max-new-tokens", str(MAX_NEW),
                  "--dtype", "float32", "--prompt-file", qwen_coder["humaneval"],
                  "--num-prompts", "1", "--output", str(out), "--quiet", timeout=900)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["mode"], r["min_drafts"]) for r in records) == [("dsi", 2), ("si", 1)]
    # the reference after the ranks are gone: one 1.5B model in memory at a time
    from transformers import AutoTokenizer

    from dsi_mpi.preflight import read_prompts

    tokenizer = AutoTokenizer.from_pretrained(qwen_coder["target_folder"])
    prompt = read_prompts(None, qwen_coder["humaneval"], None, tokenizer, num_prompts=1)[0]
    model = AutoModelForCausalLM.from_pretrained(qwen_coder["target_folder"], dtype=torch.float32)
    with torch.inference_mode():
        expected = model.eval().generate(torch.tensor([prompt.ids]), max_new_tokens=MAX_NEW,
                                         do_sample=False)[0, len(prompt.ids):].tolist()
    for record in records:
        assert record["tokens"] == expected, (record["mode"], record["tokens"], expected)
    # the 0.5B drafter pays: most of its drafts are the 1.5B model's tokens
    assert all(r["accepted"] > r["rejected"] for r in records), records
