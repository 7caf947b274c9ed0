"""Checks on rank 0 before any compute: model paths, vocabularies, prompts, context length.

Only configs and tokenizers are read here, never weights, so bad input is reported in a
second or two even for a 70B-parameter target.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from dsi_mpi.backends import EmulatedSpec
from dsi_mpi.config import ConfigError, RunConfig


@dataclass(frozen=True)
class ModelInfo:
    vocab_size: int
    max_positions: int | None
    tokenizer: object | None  # a transformers tokenizer, or None (token ids only)


def inspect_model(spec: str, flag: str) -> ModelInfo:
    """Vocabulary, context length and tokenizer of a spec, without loading weights."""
    if spec.startswith("emulated:"):
        return ModelInfo(EmulatedSpec.parse(spec).vocab, None, None)
    from dsi_mpi.backends.hf import context_length, load_config, load_tokenizer

    try:
        config = load_config(spec)
    except FileNotFoundError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
    return ModelInfo(int(config.vocab_size), context_length(config), load_tokenizer(spec))


def check_vocabularies(target: ModelInfo, drafter: ModelInfo, config: RunConfig) -> None:
    """The drafter must speak the target's vocabulary: the same tokens under the same ids."""
    if target.tokenizer is not None and drafter.tokenizer is not None:
        same = target.tokenizer.get_vocab() == drafter.tokenizer.get_vocab()
    else:
        same = target.vocab_size == drafter.vocab_size
    if not same or (config.verify == "rejection" and target.vocab_size != drafter.vocab_size):
        raise ConfigError(
            f"drafter and target vocabularies differ (target {target.vocab_size} tokens, drafter "
            f"{drafter.vocab_size}): choose a drafter trained with the target's tokenizer"
        )


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    seed: int | None = None  # a JSONL line's own sampling seed; None: --seed


def read_prompts(prompt: str | None, prompt_file: str | None, prompt_ids: str | None, tokenizer: object | None) -> list[Prompt]:
    """Every prompt, from exactly one of the three sources."""
    given = [x is not None for x in (prompt, prompt_file, prompt_ids)]
    if sum(given) != 1:
        raise ConfigError("give exactly one of --prompt TEXT, --prompt-file FILE, --prompt-ids 1,2,3")
    if prompt_ids is not None:
        return [Prompt(_parse_ids(prompt_ids, "--prompt-ids"))]
    texts: list[tuple[str | list[int], int | None]]
    if prompt is not None:
        texts = [(prompt, None)]
    else:
        assert prompt_file is not None
        if not os.path.isfile(prompt_file):
            raise ConfigError(f"--prompt-file {prompt_file!r} does not exist")
        texts = []
        with open(prompt_file, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                if line.lstrip().startswith("{"):
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ConfigError(f"{prompt_file}:{number}: not valid JSON ({exc.msg})") from None
                    seed = record.get("seed")
                    if seed is not None and (not isinstance(seed, int) or seed < 0):
                        raise ConfigError(f"{prompt_file}:{number}: seed must be an integer >= 0")
                    if "prompt_ids" in record:
                        texts.append(([int(x) for x in record["prompt_ids"]], seed))
                    elif "prompt" in record:
                        texts.append((str(record["prompt"]), seed))
                    else:
                        raise ConfigError(f"{prompt_file}:{number}: a JSON line needs 'prompt' or 'prompt_ids'")
                else:
                    texts.append((line.rstrip("\n"), None))
        if not texts:
            raise ConfigError(f"--prompt-file {prompt_file!r} holds no prompt")
    out = []
    for text, seed in texts:
        if isinstance(text, list):
            out.append(Prompt(text, seed))
        elif tokenizer is None:
            raise ConfigError("text prompts need a tokenizer; this target has none: use --prompt-ids or prompt_ids")
        else:
            out.append(Prompt(list(tokenizer(text)["input_ids"]), seed))
    return out


def _parse_ids(text: str, flag: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise ConfigError(f"{flag} is empty")
    return ids


def check_prompts(prompts: Sequence[Prompt], config: RunConfig, infos: Sequence[ModelInfo]) -> None:
    vocab = min(info.vocab_size for info in infos)
    limits = [info.max_positions for info in infos if info.max_positions]
    for index, ids in enumerate(p.ids for p in prompts):
        if not ids:
            raise ConfigError(f"prompt {index} is empty")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ConfigError(f"prompt {index} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        if limits:
            # Drafts can run ahead of the committed text, so leave room for them too.
            need = len(ids) + config.max_new_tokens + (config.lookahead if config.uses_drafter else 0)
            if need > min(limits):
                raise ConfigError(
                    f"prompt {index} has {len(ids)} tokens; with --max-new-tokens {config.max_new_tokens} "
                    f"it needs {need} positions but the model's context is {min(limits)}: shorten the "
                    "prompt or lower --max-new-tokens"
                )


def preflight(config: RunConfig, prompt: str | None = None, prompt_file: str | None = None,
              prompt_ids: str | None = None) -> tuple[list[Prompt], object | None]:
    """Everything rank 0 checks before any rank loads weights; returns prompts and tokenizer."""
    target = inspect_model(config.target, "--target")
    infos = [target]
    if config.uses_drafter:
        assert config.drafter is not None
        drafter = inspect_model(config.drafter, "--drafter")
        check_vocabularies(target, drafter, config)
        infos.append(drafter)
    prompts = read_prompts(prompt, prompt_file, prompt_ids, target.tokenizer)
    check_prompts(prompts, config, infos)
    return prompts, target.tokenizer
