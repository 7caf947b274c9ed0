"""A real pretrained model over real MPI ranks: SmolLM2-135M (from its GGUF file, float32) with a
self-drafter of its first layers, DSI, SI and non-SI against its own ``generate``."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from mpi4py import MPI

from dsi_mpi.config import RunConfig
from dsi_mpi.preflight import read_prompts
from tests.harness import TIMEOUT_S, agree, mismatch, run_on

RANK = MPI.COMM_WORLD.Get_rank()
MAX_NEW = 24
# 22 of 30 layers: acceptance about 0.25 on HumanEval (docs/results.md), so drafts are both
# accepted and rejected, and rejections cancel verifications in flight.
LAYERS = 22


@pytest.mark.mpi(min_size=5)
@pytest.mark.parametrize("engine", ["eager", "static"])
def test_smollm2_with_a_self_drafter_equals_generate(mpi_smollm2: dict[str, str],
                                                     engine: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(mpi_smollm2["folder"])
    prompts = read_prompts(None, mpi_smollm2["humaneval"], None, tokenizer, num_prompts=3)
    base = RunConfig(target=mpi_smollm2["gguf"], drafter=f"self:layers={LAYERS}", mode="nonsi",
                     max_new_tokens=MAX_NEW, dtype="float32", timeout_s=TIMEOUT_S,
                     engine=engine)
    configs = [base, replace(base, mode="si", lookahead=4),
               replace(base, mode="dsi", lookahead=2, sp=3)]
    records, error, pending = run_on(5, configs, prompts, tokenizer)
    ok, message = error is None and pending == 0, error or f"{pending} requests left open"
    if ok and RANK == 0:
        model = AutoModelForCausalLM.from_pretrained(mpi_smollm2["folder"], dtype=torch.float32)
        model.eval()
        expected = []
        for prompt in prompts:
            with torch.inference_mode():
                out = model.generate(torch.tensor([prompt.ids]), max_new_tokens=MAX_NEW,
                                     do_sample=False)
            expected.append(out[0, len(prompt.ids):].tolist())
        assert len(records) == 3 * len(prompts)
        assert {r["engine"] for r in records} == {engine}
        wrong = mismatch(records, expected)
        if wrong is not None:
            ok, message = False, wrong
        for mode in ("si", "dsi"):
            runs = [r for r in records if r["mode"] == mode]
            if ok and not (sum(r["accepted"] for r in runs) > 0
                           and sum(r["rejected"] for r in runs) > 0):
                ok, message = False, f"{mode}: expected both accepted and rejected drafts: {runs}"
    agree(ok, message)
