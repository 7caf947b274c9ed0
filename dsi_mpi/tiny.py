"""Tiny random models for tests and benchmarks, built locally with no download.

A byte-level BPE tokenizer is trained on ``data/corpus.txt``; float64 Llama-style, GPT-2 and
Gemma 3 models (the last with sliding-window attention on most layers, a window shorter than
the tests' sequences) are built from a config, saved with ``save_pretrained`` and later loaded
through the real loading path (``AutoModelForCausalLM.from_pretrained``), exactly as a user's
checkpoint. Drafters are derived from a target: identical (every draft accepted), perturbed
(acceptance controlled by the noise scale) or unrelated (almost nothing accepted).

:func:`build_mixed_pair` makes a target and a drafter with different tokenizers (a
sentencepiece-style one with byte fallback and a BOS, like Gemma's, and the byte-level one,
like SmolLM2's), both trained for a few seconds to recite the corpus, so that the drafter's
text often is the target's and its drafts are both accepted and rejected.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch

ARCHS = ("llama", "gpt2", "gemma3")
SLIDING_WINDOW = 8  # gemma3: shorter than the tests' sequences, so rollbacks cross it
DRAFTER_KINDS = ("identical", "perturbed", "unrelated")
EOS_PROBE_PROMPT = "The coordinator owns the committed sequence"


def corpus_lines() -> list[str]:
    text = resources.files("dsi_mpi").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def build_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 384,
                    lines: list[str] | None = None):
    """Train a byte-level BPE tokenizer on the bundled corpus (or on ``lines``) and save it to
    ``out_dir``."""
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
    tok.train_from_iterator(corpus_lines() if lines is None else lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(str(out_dir))
    return fast


def _config(arch: str, vocab_size: int, layers: int, hidden: int, max_positions: int):
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
    if arch == "gemma3":
        from transformers import Gemma3TextConfig

        # Sliding-window attention on every layer but the last, as Gemma 3 has on 5 of 6.
        return Gemma3TextConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            head_dim=hidden // 4, max_position_embeddings=max_positions, initializer_range=0.3,
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        )
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHS}")


def _save(model, tokenizer, out_dir: str | os.PathLike) -> str:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return str(out)


def _greedy(model, ids: list[int], steps: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def build_tiny_model(
    out_dir: str | os.PathLike, arch: str = "llama", seed: int = 0, layers: int = 2,
    hidden: int = 64, max_positions: int = 256, tokenizer=None, eos_after: int = 5,
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
    eos = next((t for i, t in enumerate(continuation)
                if i >= eos_after - 1 and t not in continuation[:i]), continuation[-1])
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
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:1]
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
            paths[f"{arch}/{kind}"] = derive_drafter(target, root / f"{arch}-{kind}", kind=kind,
                                                     seed=20 + i)
    index.write_text(json.dumps(paths, indent=1))
    return paths


# ----------------------------------------------------------------- two vocabularies


def build_sentencepiece_tokenizer(out_dir: str | os.PathLike,
                                  vocab_size: int = 320):
    """A sentencepiece-style BPE tokenizer, as Gemma's and Llama 2's: spaces spelled ``▁``,
    the 256 byte tokens ``<0x00>``..``<0xFF>`` for characters outside its alphabet (byte
    fallback), and a BOS before every text. Trained on the corpus, so its merges differ from
    :func:`build_tokenizer`'s; ``vocab_size`` counts the trained tokens, not the byte tokens."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    trainer_tok.train_from_iterator(corpus_lines(), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {token: i for i, token in enumerate(specials)}
    for byte in range(256):  # regular tokens of the model, as in a sentencepiece vocabulary
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token in trained["vocab"]:
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(str(out_dir))
    return fast


def unrelated_lines(count: int = 150, seed: int = 0) -> list[str]:
    """Text unlike the corpus (random words of rare letters and digits): a tokenizer trained on
    it shares little more than single bytes with one trained on the corpus."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = list("qxzjkvw0123456789")
    words = ["".join(rng.choice(letters, size=rng.integers(3, 9))) for _ in range(20 * count)]
    return [" ".join(words[i: i + 20]) for i in range(0, len(words), 20)]


def _recite(model, tokenizer, steps: int, seed: int) -> None:
    """Train ``model`` to recite the corpus, each line ending with EOS (float32, full batch)."""
    torch.manual_seed(seed)
    rows = [tokenizer(line)["input_ids"] + [tokenizer.eos_token_id] for line in corpus_lines()]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    labels = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
    model.float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.double().eval()


def build_mixed_pair(root: str | os.PathLike, steps: int = 120) -> dict[str, str]:
    """A target and a drafter whose tokenizers differ in kind, size and merges, each trained to
    recite the corpus: the target with :func:`build_sentencepiece_tokenizer`'s (byte fallback,
    a BOS; Gemma's kind), the drafter with :func:`build_tokenizer`'s (byte-level; SmolLM2's
    kind) and a smaller model. Both stop with their own EOS at a line's end. Built once under
    ``root`` (``pair.json`` marks completion); returns ``{"target": dir, "drafter": dir}``."""
    from transformers import AutoModelForCausalLM

    root = Path(root)
    index = root / "pair.json"
    if index.exists():
        return json.loads(index.read_text())
    paths = {}
    for name, tokenizer, layers, hidden, seed in (
            ("target", build_sentencepiece_tokenizer(root / "target-tokenizer"), 2, 64, 30),
            ("drafter", build_tokenizer(root / "drafter-tokenizer"), 1, 48, 31)):
        torch.manual_seed(seed)
        config = _config("llama", len(tokenizer), layers, hidden, 256)
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        config.initializer_range = 0.02
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _recite(model, tokenizer, steps, seed)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        paths[name] = _save(model, tokenizer, root / name)
    index.write_text(json.dumps(paths, indent=1))
    return paths
