"""Tiny random models for tests and benchmarks, built locally with no download.

A byte-level BPE tokenizer is trained on ``data/corpus.txt``; float64 Llama-style and GPT-2
models are built from a config, saved with ``save_pretrained`` and later loaded through the
real loading path (``AutoModelForCausalLM.from_pretrained``), exactly as a user's checkpoint.
Drafters are derived from a target: identical (every draft accepted), perturbed (acceptance
controlled by the noise scale) or unrelated (almost nothing accepted).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch

ARCHS = ("llama", "gpt2")
DRAFTER_KINDS = ("identical", "perturbed", "unrelated")
EOS_PROBE_PROMPT = "The coordinator owns the committed sequence"


def corpus_lines() -> list[str]:
    text = resources.files("dsi_mpi").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def build_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 384):  # noqa: ANN201
    """Train a byte-level BPE tokenizer on the bundled corpus and save it to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(out_dir))
    return fast


def _config(arch: str, vocab_size: int, layers: int, hidden: int, max_positions: int):  # noqa: ANN202
    from transformers import GPT2Config, LlamaConfig

    # A large init range makes random models confident and varied, so greedy outputs do not
    # collapse into one repeated token and drafts get rejected at realistic rates.
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=max_positions, initializer_range=0.3,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4,
            n_positions=max_positions, initializer_range=0.3,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHS}")


def _save(model, tokenizer, out_dir: str | os.PathLike) -> str:  # noqa: ANN001
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return str(out)


def _greedy(model, ids: list[int], steps: int) -> list[int]:  # noqa: ANN001
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def build_tiny_model(
    out_dir: str | os.PathLike, arch: str = "llama", seed: int = 0, layers: int = 2,
    hidden: int = 64, max_positions: int = 256, tokenizer=None, eos_after: int = 5,  # noqa: ANN001
) -> str:
    """Build, save and return the directory of a tiny float64 target model.

    Its EOS id is chosen as the token it generates greedily ``eos_after`` steps into
    :data:`EOS_PROBE_PROMPT`, so that prompt ends at EOS (tests need one that does).
    """
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(Path(out_dir) / "_tok")
    torch.manual_seed(seed)
    config = _config(arch, len(tokenizer), layers, hidden, max_positions)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()
    probe = tokenizer(EOS_PROBE_PROMPT)["input_ids"]
    continuation = _greedy(model, probe, eos_after + 1)
    eos = next((t for i, t in enumerate(continuation) if i >= eos_after - 1 and t not in continuation[:i]), continuation[-1])
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    return _save(model, tokenizer, out_dir)


def derive_drafter(
    target_dir: str | os.PathLike, out_dir: str | os.PathLike, kind: str = "perturbed",
    noise: float = 0.03, seed: int = 1,
) -> str:
    """A drafter for the target in ``target_dir``: identical, perturbed or unrelated weights.

    ``perturbed`` adds Gaussian noise of ``noise`` times each tensor's standard deviation;
    larger noise means lower acceptance. ``unrelated`` is a fresh model of one layer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind not in DRAFTER_KINDS:
        raise ValueError(f"unknown drafter kind {kind!r}; choose one of {DRAFTER_KINDS}")
    tokenizer = AutoTokenizer.from_pretrained(str(target_dir))
    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float64).eval()
    if kind == "unrelated":
        torch.manual_seed(seed + 1000)
        config = target.config.__class__.from_dict(target.config.to_dict())
        for name in ("num_hidden_layers", "n_layer"):
            if hasattr(config, name):
                setattr(config, name, 1)
        drafter = AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()
    else:
        drafter = target
        if kind == "perturbed":
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for param in drafter.parameters():
                    scale = noise * float(param.std()) if param.numel() > 1 else 0.0
                    param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * scale)
    drafter.generation_config.eos_token_id = target.generation_config.eos_token_id
    drafter.config.eos_token_id = target.config.eos_token_id
    return _save(drafter, tokenizer, out_dir)


def build_suite(root: str | os.PathLike, archs: tuple[str, ...] = ARCHS) -> dict[str, str]:
    """Targets of each architecture with their three drafters, built once under ``root``.

    Returns ``{"llama": dir, "llama/identical": dir, ...}``; a ``suite.json`` marks completion
    so that a second call (another test session, another rank) reuses the directories.
    """
    root = Path(root)
    index = root / "suite.json"
    if index.exists():
        return json.loads(index.read_text())
    tokenizer = build_tokenizer(root / "tokenizer")
    paths: dict[str, str] = {}
    for i, arch in enumerate(archs):
        target = build_tiny_model(root / arch, arch=arch, seed=10 + i, tokenizer=tokenizer)
        paths[arch] = target
        for kind in DRAFTER_KINDS:
            paths[f"{arch}/{kind}"] = derive_drafter(target, root / f"{arch}-{kind}", kind=kind, seed=20 + i)
    index.write_text(json.dumps(paths, indent=1))
    return paths
