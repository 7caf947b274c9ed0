"""DSI, SI and non-SI over real MPI ranks, checked against the target's own output."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from mpi4py import MPI

from dsi_mpi.backends.logits import distributions
from dsi_mpi.config import RunConfig
from dsi_mpi.preflight import Prompt
from dsi_mpi.tiny import EOS_PROBE_PROMPT, corpus_lines
from dsi_mpi.verify import SamplingParams
from tests.conftest import device_under_test
from tests.harness import TIMEOUT_S, agree, mismatch, run_on

RANK = MPI.COMM_WORLD.Get_rank()
DEVICE = device_under_test()  # --device / DSI_TEST_DEVICE; on a GPU also set DSI_MPI_SHARE_GPUS=1
MAX_NEW = 24


def _configs(target: str, drafter: str, lookaheads=(1, 3, 5), sps=(1, 2, 3),
             **kw) -> list[RunConfig]:
    base = RunConfig(target=target, drafter=drafter, mode="nonsi", max_new_tokens=MAX_NEW,
                     dtype="float64", device=DEVICE, timeout_s=TIMEOUT_S, **kw)
    out = [base]
    out += [replace(base, mode="si", lookahead=k) for k in lookaheads]
    out += [replace(base, mode="dsi", lookahead=k, sp=sp) for k in lookaheads for sp in sps]
    # tasks of no drafts or at least k (--min-drafts, for a cost curve with a step)
    out += [replace(base, mode="dsi", lookahead=k, sp=1, min_drafts=k) for k in lookaheads
            if k > 1]
    return out


def _generate(path: str, ids: list[int]) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).to(DEVICE).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids], device=DEVICE), max_new_tokens=MAX_NEW,
                             do_sample=False)
    return out[0, len(ids):].tolist()


CASES = [(a, k, "eager") for a in ("llama", "gpt2")
         for k in ("identical", "perturbed", "unrelated")]
CASES.append(("gemma3", "perturbed", "eager"))  # sliding-window layers, rolled back past it
# The static engine (one StaticCache per rank, backends/static.py), fewer lookaheads and SPs.
CASES += [("llama", "perturbed", "static"), ("gemma3", "perturbed", "static")]


@pytest.mark.mpi(min_size=5)
@pytest.mark.parametrize(("arch", "kind", "engine"), CASES)
def test_greedy_modes_equal_generate(mpi_tiny_suite: dict[str, str], arch: str, kind: str,
                                     engine: str) -> None:
    from transformers import AutoTokenizer

    target, drafter = mpi_tiny_suite[arch], mpi_tiny_suite[f"{arch}/{kind}"]
    tokenizer = AutoTokenizer.from_pretrained(target)
    texts = (EOS_PROBE_PROMPT, corpus_lines()[3], corpus_lines()[21][:25])
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    configs = (_configs(target, drafter) if engine == "eager"
               else _configs(target, drafter, (1, 4), (1, 3), engine=engine))
    records, error, pending = run_on(5, configs, prompts, tokenizer)
    ok, message = error is None and pending == 0, error or f"{pending} requests left open"
    if ok and RANK == 0:
        expected = [_generate(target, ids) for ids in prompts]
        assert len(expected[0]) < MAX_NEW, "the EOS probe prompt must end at EOS"
        assert len(records) == len(configs) * len(prompts)
        assert {r["engine"] for r in records} == {engine}
        wrong = mismatch(records, expected)
        if wrong is not None:
            ok, message = False, wrong
        for r in records if ok else ():
            if r["accepted"] + r["rejected"] + r["forced"] != r["num_new_tokens"]:
                ok, message = False, f"counters do not add up: {r}"
                break
            if not r["verifications_cancelled"] <= r["verifications_sent"]:
                ok, message = False, f"more cancelled than sent: {r}"
                break
            if kind == "identical" and r["mode"] != "nonsi" and r["rejected"]:
                ok, message = False, f"an identical drafter was rejected: {r}"
                break
    agree(ok, message)


@pytest.mark.mpi(min_size=5)
def test_sampling_is_identical_across_modes_and_differs_across_seeds(
        mpi_tiny_suite: dict[str, str]) -> None:
    target, drafter = mpi_tiny_suite["llama"], mpi_tiny_suite["llama/perturbed"]
    configs = _configs(target, drafter, lookaheads=(1, 4), sps=(3,),
                       sampling=SamplingParams(temperature=0.9, top_k=40, seed=0))
    prompts = [Prompt([5, 17, 42, 8], seed=s) for s in (0, 1, 2)]
    records, error, pending = run_on(5, configs, prompts)
    ok, message = error is None and pending == 0, error or f"{pending} requests left open"
    if ok and RANK == 0:
        by_seed: dict[int, set] = {}
        for r in records:
            by_seed.setdefault(r["seed"], set()).add(tuple(r["tokens"]))
        if any(len(v) != 1 for v in by_seed.values()):
            ok, message = False, f"modes disagree for a seed: {by_seed}"
        elif len({next(iter(v)) for v in by_seed.values()}) != 3:
            ok, message = False, "different seeds gave the same sample"
    agree(ok, message)


@pytest.mark.mpi(min_size=5)
def test_rejection_sampling_is_lossless_in_distribution(mpi_tiny_suite: dict[str, str]) -> None:
    """Joint law of the first two tokens over many seeds equals the target's, not the drafter's."""
    from dsi_mpi.backends import load_backend

    target, drafter = mpi_tiny_suite["gpt2"], mpi_tiny_suite["gpt2/unrelated"]
    params = SamplingParams(temperature=1.0, top_k=3)
    n = 500
    base = RunConfig(target=target, drafter=drafter, mode="dsi", lookahead=1, sp=3,
                     max_new_tokens=3, dtype="float64", device=DEVICE, verify="rejection",
                     sampling=params, timeout_s=TIMEOUT_S)
    prompt = [5, 17, 42]
    records, error, pending = run_on(5, [base], [Prompt(prompt, seed=s) for s in range(n)])
    ok, message = error is None and pending == 0, error or f"{pending} requests left open"
    if ok and RANK == 0:

        def joint(path: str) -> dict[tuple[int, int], float]:
            model = load_backend(path, dtype="float64", device=DEVICE)
            first = distributions(_logits(model, prompt), params)[0].numpy()
            out = {}
            for a in np.flatnonzero(first):
                second = distributions(_logits(model, prompt + [int(a)]), params)[0].numpy()
                for b in np.flatnonzero(second):
                    out[(int(a), int(b))] = first[a] * second[b]
            return out

        p, q = joint(target), joint(drafter)
        counts: dict[tuple[int, int], int] = {}
        for r in records:
            key = (r["tokens"][0], r["tokens"][1])
            counts[key] = counts.get(key, 0) + 1
        cells = set(p) | set(q) | set(counts)
        tv_p = 0.5 * sum(abs(counts.get(c, 0) / n - p.get(c, 0.0)) for c in cells)
        tv_q = 0.5 * sum(abs(counts.get(c, 0) / n - q.get(c, 0.0)) for c in cells)
        verified = sum(r["accepted"] + r["rejected"] for r in records)
        # 9 cells, 500 samples: the empirical TV from the truth is ~0.05; the drafter's law is
        # far from the target's, so the test has power.
        if not (tv_p < 0.12 and tv_q > 0.3 and verified > n // 2):
            ok, message = False, f"TV to p {tv_p:.3f}, to q {tv_q:.3f}, drafts verified {verified}"
    agree(ok, message)


def _logits(backend, ids: list[int]) -> torch.Tensor:
    backend.reset()
    with torch.inference_mode():
        out = backend.model(input_ids=torch.tensor([ids], device=backend.device))
    return out.logits[0, -1:, :]


@pytest.mark.mpi(min_size=5)
def test_emulated_is_deterministic_and_counters_add_up() -> None:
    target = "emulated:tpot_ms=2,ttft_ms=4,vocab=1000"
    drafter = "emulated:tpot_ms=0.5,ttft_ms=1,acceptance=0.6,vocab=1000"
    configs = _configs(target, drafter, lookaheads=(1, 4), sps=(3,))
    prompts = [[1, 2, 3], [9, 8, 7, 6]]
    first = run_on(5, configs, prompts, repeats=2)
    second = run_on(5, configs, prompts)
    ok = all(e is None and p == 0 for _, e, p in (first, second))
    message = f"{first[1]} {second[1]}"
    if ok and RANK == 0:
        from dsi_mpi.backends import load_backend
        from dsi_mpi.reference import generate_nonsi

        reference = [generate_nonsi(load_backend(target, sleep=False), p, MAX_NEW,
                                    SamplingParams()).tokens for p in prompts]
        for r in first[0] + second[0]:
            c_ok = r["accepted"] + r["rejected"] + r["forced"] == r["num_new_tokens"] == MAX_NEW
            c_ok &= (r["verifications_aborted"] <= r["verifications_cancelled"]
                     <= r["verifications_sent"])
            if r["tokens"] != reference[r["prompt_index"]] or not c_ok:
                ok, message = False, f"wrong output or counters: {r}"
                break
        aborted = sum(r["verifications_aborted"] for r in first[0] if r["mode"] == "dsi")
        if ok and aborted == 0:
            ok, message = False, "frequent rejections abandoned no forward in flight"
    agree(ok, message)


@pytest.mark.mpi(min_size=5)
@pytest.mark.parametrize("engine", ["eager", "static"])
def test_cancellation_keeps_caches_consistent_across_prompts(
        mpi_tiny_suite: dict[str, str], engine: str) -> None:
    """Many rejections and cancels on HF servers, then more prompts on the same caches."""
    target, drafter = mpi_tiny_suite["llama"], mpi_tiny_suite["llama/perturbed"]
    base = RunConfig(target=target, drafter=drafter, mode="dsi", lookahead=1, sp=3,
                     max_new_tokens=MAX_NEW, dtype="float64", device=DEVICE, timeout_s=TIMEOUT_S,
                     reuse_cache=True, engine=engine)
    prompts = [[5, 17, 42, 8], [5, 17, 42, 9, 11], [5, 17, 42, 8]]
    records, error, pending = run_on(5, [base], prompts)
    ok, message = error is None and pending == 0, error or f"{pending} requests left open"
    if ok and RANK == 0:
        for r in records:
            if r["tokens"] != _generate(target, prompts[r["prompt_index"]]):
                ok, message = False, f"prompt {r['prompt_index']} not exact after cancellations"
        if ok and sum(r["verifications_cancelled"] for r in records) == 0:
            ok, message = False, "no verification was cancelled"
    agree(ok, message)


@pytest.mark.mpi(min_size=5)
def test_worker_failure_ends_the_run_with_its_message(tiny_broken_model: str) -> None:
    """Model ranks that cannot load their model: every rank returns (no hang), and rank 0
    reports the failing rank's own message, not a time-out."""
    base = RunConfig(target=tiny_broken_model, drafter=tiny_broken_model, mode="dsi",
                     timeout_s=60.0)
    import os

    os.environ["DSI_MPI_QUIET_ERRORS"] = "1"
    try:
        _, error, _ = run_on(3, [base], [[1, 2, 3]])
    finally:
        del os.environ["DSI_MPI_QUIET_ERRORS"]
    failed = MPI.COMM_WORLD.allgather(error)
    coordinator = failed[0] or ""
    ok = (all(e is not None for e in failed[:3]) and "RemoteError" in coordinator
          and "failed" in coordinator)
    agree(ok, f"errors seen: {failed}")
