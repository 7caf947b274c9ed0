"""Single-process non-SI and SI against the target's own ``generate`` (tiny float64 models, on
``--device``)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsi_mpi.backends import load_backend
from dsi_mpi.reference import generate_nonsi, generate_si
from dsi_mpi.tiny import EOS_PROBE_PROMPT, corpus_lines
from dsi_mpi.verify import SamplingParams
from tests.engines import ENGINES, load_engine

GREEDY = SamplingParams()
MAX_NEW = 24


def _prompts(tokenizer) -> list[list[int]]:
    texts = [EOS_PROBE_PROMPT, corpus_lines()[1][:40], corpus_lines()[20], "x"]
    return [tokenizer(t)["input_ids"] for t in texts]


def _hf_generate(path: str, ids: list[int], max_new: int, device: str = "cpu",
                 dtype: torch.dtype = torch.float64) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens=max_new,
                             do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize(("engine", "dtype"), [("eager", "float64"), ("static", "float64"),
                                               ("static", "float32"), ("cudagraph", "float32")])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_nonsi_and_si_equal_generate(tiny_suite: dict[str, str], arch: str, engine: str,
                                            dtype: str, device: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_suite[arch])
    target = load_engine(tiny_suite[arch], engine, device, dtype)
    drafters = {kind: load_engine(tiny_suite[f"{arch}/{kind}"], engine, device, dtype)
                for kind in ("identical", "perturbed", "unrelated")}
    ended_at_eos = False
    for ids in _prompts(tokenizer):
        expected = _hf_generate(tiny_suite[arch], ids, MAX_NEW, device, getattr(torch, dtype))
        ended_at_eos |= len(expected) < MAX_NEW and expected[-1] in target.eos_token_ids
        nonsi = generate_nonsi(target, ids, MAX_NEW, GREEDY)
        assert nonsi.tokens == expected
        assert nonsi.counters.forced == len(expected)
        for kind, drafter in drafters.items():
            # Every lookahead on the eager engine; blocks around the graphed lengths (1 .. 6)
            # and past them on the others.
            for lookahead in range(1, 9) if engine == "eager" else (1, 5, 8):
                si = generate_si(target, drafter, ids, MAX_NEW, lookahead, GREEDY)
                assert si.tokens == expected, (kind, lookahead)
                c = si.counters
                assert c.accepted + c.rejected + c.forced == len(expected)
                if kind == "identical":
                    assert c.rejected == 0
    assert ended_at_eos, "one prompt must end at EOS to exercise the stop rule"


def test_drafter_kinds_order_acceptance(tiny_suite: dict[str, str], device: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_suite["llama"])
    target = load_backend(tiny_suite["llama"], dtype="float64", device=device)
    rates = {}
    for kind in ("identical", "perturbed", "unrelated"):
        drafter = load_backend(tiny_suite[f"llama/{kind}"], dtype="float64", device=device)
        accepted = verified = 0
        for ids in _prompts(tokenizer)[1:3]:
            c = generate_si(target, drafter, ids, 40, 4, GREEDY).counters
            accepted, verified = accepted + c.accepted, verified + c.verified
        rates[kind] = accepted / verified
    assert rates["identical"] == 1.0
    assert 0.2 < rates["perturbed"] < 1.0
    assert rates["unrelated"] < 0.2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sampling_with_shared_noise_is_reproducible_across_modes(tiny_suite: dict[str, str],
                                                                  arch: str, device: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_suite[arch])
    target = load_backend(tiny_suite[arch], dtype="float64", device=device)
    drafter = load_backend(tiny_suite[f"{arch}/perturbed"], dtype="float64", device=device)
    ids = _prompts(tokenizer)[1]
    outputs = []
    for seed in (0, 1, 2):
        params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=seed)
        nonsi = generate_nonsi(target, ids, MAX_NEW, params).tokens
        for lookahead in (1, 3, 6):
            assert generate_si(target, drafter, ids, MAX_NEW, lookahead, params).tokens == nonsi
        outputs.append(nonsi)
    assert len({tuple(o) for o in outputs}) == 3, "different seeds must give different samples"


@pytest.mark.parametrize("engine", ENGINES)
def test_rejection_mode_runs_and_is_exact_when_greedy(tiny_suite: dict[str, str], engine: str,
                                                      device: str) -> None:
    target = load_engine(tiny_suite["llama"], engine, device)
    drafter = load_engine(tiny_suite["llama/perturbed"], engine, device)
    ids = [5, 17, 42, 8]
    expected = generate_nonsi(target, ids, MAX_NEW, GREEDY).tokens
    # At temperature 0 p and q are one-hot and rejection sampling reduces to exact matching.
    out = generate_si(target, drafter, ids, MAX_NEW, 4, GREEDY, verify="rejection")
    assert out.tokens == expected
    params = SamplingParams(temperature=1.0, seed=3)
    out = generate_si(target, drafter, ids, MAX_NEW, 4, params, verify="rejection")
    assert len(out.tokens) == MAX_NEW or out.tokens[-1] in target.eos_token_ids
