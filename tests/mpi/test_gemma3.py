"""A real pair with two vocabularies: Gemma 3 270M (vocabulary 262144, sliding-window
attention on 5 layers of 6) verified over MPI, SmolLM2-135M (vocabulary 49152) drafting
through the translating drafter, in float32, against Gemma's own ``generate``.

Lean on purpose (the CPU CI runs it): 3 HumanEval prompts, a few tokens, DSI and SI; the
measured acceptance and times are in docs/results.md (bench/modes.py --drafter)."""

from __future__ import annotations

import functools

import pytest
import torch
from mpi4py import MPI

from dsi_mpi.config import RunConfig
from dsi_mpi.preflight import read_prompts
from tests.harness import TIMEOUT_S, agree, run_on

RANK = MPI.COMM_WORLD.Get_rank()
MAX_NEW = 12
WINDOW = 512  # Gemma 3's sliding window


@functools.cache
def _reference(folder: str):  # Gemma for generate, loaded once (on rank 0)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _generate(folder: str, ids: list[int], max_new_tokens: int) -> list[int]:
    model = _reference(folder)
    with torch.inference_mode():  # the cache transformers builds: sliding layers keep the window
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.mpi(min_size=5)
def test_gemma3_with_a_smollm2_drafter_equals_generate(mpi_gemma3: dict[str, str],
                                                       mpi_smollm2: dict[str, str]) -> None:
    """DSI and SI, both equal to Gemma's ``generate``. SI waits for every block of drafts, so its
    acceptance is the pair's and must be above 0 (the translation works over MPI); DSI does
    not wait, and on 2 oversubscribed cores SmolLM2, as slow as Gemma per Gemma token, may see
    every draft arrive after the target's token was committed: it must only have drafted."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(mpi_gemma3["folder"])
    prompts = read_prompts(None, mpi_smollm2["humaneval"], None, tokenizer, num_prompts=3)
    dsi = RunConfig(target=mpi_gemma3["gguf"], drafter=mpi_smollm2["gguf"], mode="dsi",
                    lookahead=2, sp=3, max_new_tokens=MAX_NEW, dtype="float32",
                    timeout_s=TIMEOUT_S)
    records, error, pending = run_on(5, [dsi, replace(dsi, mode="si", sp=None)], prompts,
                                     tokenizer)
    ok, message = error is None and pending == 0, error or f"{pending} requests left open"
    if ok and RANK == 0:
        for r in records:
            expected = _generate(mpi_gemma3["folder"], prompts[r["prompt_index"]].ids, MAX_NEW)
            if r["tokens"] != expected or r["translation"] != "slem":
                ok, message = False, (f"{r['mode']} prompt {r['prompt_index']}: {r['tokens']} != "
                                      f"{expected}")
                break
        for mode in ("dsi", "si"):
            mine = [r for r in records if r["mode"] == mode]
            accepted = sum(r["accepted"] for r in mine)
            verified = accepted + sum(r["rejected"] for r in mine)
            print(f"\nGemma 3 270M + SmolLM2-135M, {mode} k=2: {accepted} of {verified} drafts "
                  f"accepted over {sum(r['num_new_tokens'] for r in mine)} target tokens "
                  f"({sum(r['drafts_received'] for r in mine)} drafts received)")
        si_accepted = sum(r["accepted"] for r in records if r["mode"] == "si")
        dsi_drafts = sum(r["drafts_received"] for r in records if r["mode"] == "dsi")
        if ok and (len(records) != 6 or si_accepted == 0 or dsi_drafts == 0):
            ok, message = False, f"SmolLM2's drafts missing or never accepted: {records}"
    agree(ok, message)


@pytest.mark.mpi(min_size=5)
def test_gemma3_rolls_back_past_its_sliding_window(mpi_gemma3: dict[str, str],
                                                   mpi_smollm2: dict[str, str]) -> None:
    """On rank 0, one process: a prompt longer than Gemma's 512-token window, SI with the
    translating SmolLM2 drafter (each rejection crops the target's cache past the window)
    equals ``generate``, which decodes with the sliding-window cache transformers builds."""
    ok, message = True, ""
    if RANK == 0:
        from transformers import AutoTokenizer

        from dsi_mpi.backends import load_backend
        from dsi_mpi.reference import generate_si
        from dsi_mpi.translate import load_drafter
        from dsi_mpi.verify import SamplingParams

        try:
            tokenizer = AutoTokenizer.from_pretrained(mpi_gemma3["folder"])
            texts = read_prompts(None, mpi_smollm2["humaneval"], None, tokenizer, num_prompts=6)
            ids = [t for p in texts for t in p.ids]
            target = load_backend(mpi_gemma3["gguf"], dtype="float32")
            assert len(ids) > target.config.sliding_window == WINDOW, len(ids)
            drafter = load_drafter(mpi_smollm2["gguf"], mpi_gemma3["gguf"], dtype="float32",
                                   target_eos=target.eos_token_ids)
            gen = generate_si(target, drafter, ids, 8, 3, SamplingParams())
            expected = _generate(mpi_gemma3["folder"], ids, 8)
            if gen.tokens != expected or gen.counters.rejected == 0:
                ok, message = False, f"{gen.tokens} != {expected} ({gen.counters})"
        except Exception as exc:  # reported through the verdict
            ok, message = False, f"{type(exc).__name__}: {exc}"
    agree(ok, message)
