"""Checks on rank 0 before any compute: model paths, vocabularies, prompts, context length.

Only configs and tokenizers are read here, never weights, so bad input is reported in a
second or two even for a 70B-parameter target. Once every check has passed, GGUF specs are
converted to their cached folders (``backends/gguf.py``), so the other ranks, which load
after rank 0's verdict, all find the converted folder.

Model specs are looked at before transformers is imported (:func:`check_model_source`): a
local folder must hold a config and weights; a name like ``org/name`` that is no local path
is a hub id, which must be in the Hugging Face cache or reachable (offline, the message says
how ``HF_HUB_OFFLINE`` and the cache work).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from dsi_mpi.backends import (
    EmulatedSpec,
    is_emulated,
    is_gguf,
    is_self_drafter,
    self_drafter_layers,
)
from dsi_mpi.config import ConfigError, RunConfig

TRANSLATIONS = {  # how preflight names the methods of dsi_mpi/translate.py
    "slem": "string-level exact matching, SLEM: greedy and shared-noise sampling stay exact",
    "tli": "token-level intersection, TLI: rejection sampling over the tokens both share",
}


@dataclass(frozen=True)
class ModelInfo:
    vocab_size: int
    max_positions: int | None
    tokenizer: Any  # a transformers tokenizer, or None (token ids only)
    num_layers: int | None = None  # decoder layers, for self:layers=N drafters
    model_type: str | None = None  # the config's model_type (which engines can run it)


# What from_pretrained loads weights from (transformers' SAFE_WEIGHTS_NAME, WEIGHTS_NAME and
# their shards and indexes).
WEIGHT_FILE = re.compile(r"^(model.*\.safetensors|pytorch_model.*\.bin|.*\.safetensors\.index\.json"
                         r"|pytorch_model\.bin\.index\.json)$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # name or org/name
HUB_TIMEOUT_S = 3.0  # how long to try to reach the hub before calling it offline


def is_hub_id(spec: str) -> bool:
    """``org/name`` (or ``name``) with no local file or folder of that name: a hub id."""
    return bool(HUB_ID.match(spec)) and ".." not in spec and not os.path.exists(spec)


def check_model_source(spec: str, flag: str) -> None:
    """Before transformers loads anything: a local folder holds a config and weights; a hub id
    is in the local cache or the hub can be reached."""
    if is_gguf(spec):
        return  # checked when its header is read
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        names = os.listdir(path)
        if not names:
            raise ConfigError(f"{flag} {spec!r} is an empty folder: give a folder made by "
                              "save_pretrained (config.json and the weights), a hub id or an "
                              "emulated: spec")
        if "config.json" not in names:
            raise ConfigError(f"{flag} {spec!r} has no config.json: not a model folder "
                              "(save_pretrained writes config.json and the weights)")
        if not any(WEIGHT_FILE.match(name) for name in names):
            raise ConfigError(f"{flag} {spec!r} has a config.json but no weights "
                              "(model*.safetensors or pytorch_model*.bin): copy them in, or save "
                              "the model again with save_pretrained")
        return
    if os.path.exists(path):
        raise ConfigError(f"{flag} {spec!r} is a file: give a model folder, a .gguf file, a hub "
                          "id or an emulated: spec")
    if not is_hub_id(spec):
        raise ConfigError(f"{flag}: model path {spec!r} does not exist; pass a directory made by "
                          "save_pretrained, a .gguf file, a hub id (org/name) or an emulated: spec")
    _check_hub_id(spec, flag)


def _check_hub_id(repo: str, flag: str) -> None:
    """A hub id must be in the cache, or the hub reachable now (compute nodes often have no
    network: then say how to use the cache)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return
    cache = constants.HF_HUB_CACHE
    where = (f"{flag} {repo!r} is no local path, so it is a hub id, and it is not in the "
             f"Hugging Face cache ({cache}, set by HF_HUB_CACHE or HF_HOME)")
    fetch = (f"download it once on a machine with network (hf download {repo}, with the same "
             "HF_HOME), or pass a local folder")
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{where}; HF_HUB_OFFLINE=1 forbids downloading: {fetch}")
    unreachable = _hub_unreachable(constants.ENDPOINT)
    if unreachable:
        raise ConfigError(f"{where}, and the hub ({constants.ENDPOINT}) cannot be reached "
                          f"({unreachable}): {fetch}; on nodes without network set "
                          "HF_HUB_OFFLINE=1 so the cache alone is used")


def _hub_unreachable(endpoint: str) -> str | None:
    """Why the hub cannot be reached within HUB_TIMEOUT_S, or None (a TCP connection is made:
    huggingface_hub itself would retry for about 20 s before giving up)."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=HUB_TIMEOUT_S):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def inspect_model(spec: str, flag: str, target: ModelInfo | None = None) -> ModelInfo:
    """Vocabulary, context length and tokenizer of a spec, without loading weights.

    A ``self:layers=N`` drafter is checked against ``target`` (the target's info): N must be
    one of its layers."""
    if is_emulated(spec):
        return ModelInfo(EmulatedSpec.parse(spec).vocab, None, None)
    if is_self_drafter(spec):
        try:
            n = self_drafter_layers(spec)
        except ValueError as exc:
            raise ConfigError(f"{flag}: {exc}") from None
        if target is None or target.num_layers is None:
            raise ConfigError(f"{flag} {spec}: a self-drafter needs a --target model with "
                              "decoder layers")
        if not 1 <= n <= target.num_layers:
            raise ConfigError(f"{flag} {spec}: N must be between 1 and the target's "
                              f"{target.num_layers} decoder layers")
        return target
    check_model_source(spec, flag)
    from dsi_mpi.backends.hf import context_length, load_config, load_tokenizer

    try:
        config = load_config(spec)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"{flag}: {exc}") from None
    layers = getattr(config, "num_hidden_layers", None)
    return ModelInfo(int(config.vocab_size), context_length(config), load_tokenizer(spec),
                     int(layers) if isinstance(layers, int) else None,
                     getattr(config, "model_type", None))


def check_tensor_parallel(spec: str, n: int) -> None:
    """``--target-ranks n``: ``n`` must divide the target's attention and key/value heads (each
    rank keeps whole heads; transformers would otherwise cut one), and transformers must know
    how to shard the model (a tensor-parallel plan). A local folder's ``config.json`` is read
    as it is, so that these checks come before transformers is imported."""
    fields = _config_fields(spec)
    heads = fields.get("num_attention_heads")
    kv_heads = fields.get("num_key_value_heads") or heads
    for name, count in (("key/value", kv_heads), ("attention", heads)):
        if isinstance(count, int) and count % n:
            divisors = [d for d in range(1, count + 1) if count % d == 0]
            raise ConfigError(f"--target-ranks {n} must divide the target's {count} {name} "
                              f"heads: use one of {', '.join(map(str, divisors))}")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    kind = fields.get("model_type")
    config_class = CONFIG_MAPPING[kind] if kind in CONFIG_MAPPING else None
    if config_class is None or not getattr(config_class, "base_model_tp_plan", None):
        raise ConfigError(f"--target-ranks {n}: transformers has no tensor-parallel plan for "
                          f"{kind} models (--target {spec}); use --target-ranks 1")


def _config_fields(spec: str) -> dict:
    """The text model's config as a dict: a local ``config.json``, else transformers'."""
    path = os.path.join(os.path.expanduser(spec), "config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            fields = json.load(fh)
    else:
        from dsi_mpi.backends.hf import load_config

        fields = load_config(spec).to_dict()
    text = fields.get("text_config")
    return text if isinstance(text, dict) and "num_attention_heads" in text else fields


def check_vocabularies(target: ModelInfo, drafter: ModelInfo, config: RunConfig) -> str | None:
    """How the drafter's tokens reach the target's: None when it speaks the target's vocabulary
    (the same tokens under the same ids), else by translation (``dsi_mpi/translate.py``):
    ``slem`` for ``--verify exact``, ``tli`` for ``--verify rejection``, which needs enough
    tokens in common. Without tokenizers to translate through, the vocabularies must agree."""
    if target.tokenizer is None or drafter.tokenizer is None:
        if target.vocab_size != drafter.vocab_size:
            raise ConfigError(
                f"drafter and target vocabularies differ (target {target.vocab_size} tokens, "
                f"drafter {drafter.vocab_size}) and a model without a tokenizer cannot be "
                "translated: choose a drafter with the target's vocabulary, or models that ship "
                "tokenizers"
            )
        return None
    from dsi_mpi import translate

    if translate.same_vocabulary(target.tokenizer, drafter.tokenizer):
        if config.verify == "rejection" and target.vocab_size != drafter.vocab_size:
            raise ConfigError(
                f"--verify rejection compares the two models' distributions token by token, but "
                f"their vocabulary sizes differ (target {target.vocab_size}, drafter "
                f"{drafter.vocab_size}): use --verify exact"
            )
        return None
    try:
        source = translate.Vocabulary.of(drafter.tokenizer, drafter.vocab_size)
        vocabulary = translate.Vocabulary.of(target.tokenizer, target.vocab_size)
        if config.verify == "rejection":
            translate.check_intersection(source, vocabulary)
    except ValueError as exc:
        raise ConfigError(f"--drafter {config.drafter}: {exc}") from None
    return translate.method_for(config.verify)


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    seed: int | None = None  # a JSONL line's own sampling seed; None: --seed


def read_prompts(prompt: str | None, prompt_file: str | None, prompt_ids: str | None,
                 tokenizer: Any, chat: bool = False,
                 num_prompts: int | None = None) -> list[Prompt]:
    """Every prompt, from exactly one of the three sources; the first ``num_prompts`` of them;
    with ``chat``, each text wrapped in the tokenizer's chat template as a user message."""
    given = [x is not None for x in (prompt, prompt_file, prompt_ids)]
    if sum(given) != 1:
        raise ConfigError("give exactly one of --prompt TEXT, --prompt-file FILE, "
                          "--prompt-ids 1,2,3")
    if num_prompts is not None and num_prompts < 1:
        raise ConfigError(f"--num-prompts must be >= 1, got {num_prompts}")
    if chat and prompt_ids is not None:
        raise ConfigError("--chat applies a chat template to text prompts; "
                          "--prompt-ids are already tokens")
    if chat and getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("--chat: the target's tokenizer has no chat template; drop --chat")
    if prompt_ids is not None:
        return _first([Prompt(_parse_ids(prompt_ids, "--prompt-ids"))], num_prompts, "--prompt-ids")
    texts: list[tuple[str | list[int], int | None]]
    if prompt is not None:
        texts = [(prompt, None)]
    else:
        assert prompt_file is not None
        if not os.path.isfile(prompt_file):
            raise ConfigError(f"--prompt-file {prompt_file!r} does not exist")
        texts = []
        with _open_text(prompt_file) as fh:
            for number, line in enumerate(_lines(fh, prompt_file), 1):
                if not line.strip():
                    continue
                if line.lstrip().startswith("{"):
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ConfigError(
                            f"{prompt_file}:{number}: not valid JSON ({exc.msg})") from None
                    seed = record.get("seed")
                    if seed is not None and (not isinstance(seed, int) or seed < 0):
                        raise ConfigError(f"{prompt_file}:{number}: seed must be an integer >= 0")
                    if not isinstance(record, dict):
                        raise ConfigError(f"{prompt_file}:{number}: a JSON line must be an "
                                          "object with 'prompt' or 'prompt_ids'")
                    if "prompt_ids" in record:
                        ids = _ids_of(record["prompt_ids"], f"{prompt_file}:{number}")
                        texts.append((ids, seed))
                    elif "prompt" in record:
                        if not isinstance(record["prompt"], str):
                            raise ConfigError(f"{prompt_file}:{number}: 'prompt' must be a "
                                              f"string, got {record['prompt']!r}")
                        texts.append((record["prompt"], seed))
                    else:
                        raise ConfigError(f"{prompt_file}:{number}: a JSON line needs "
                                          "'prompt' or 'prompt_ids'")
                else:
                    texts.append((line.rstrip("\n"), None))
        if not texts:
            raise ConfigError(f"--prompt-file {prompt_file!r} holds no prompt")
    source = f"--prompt-file {prompt_file!r}" if prompt_file else "--prompt"
    texts = _first(texts, num_prompts, source)
    out = []
    for text, seed in texts:
        if isinstance(text, list):
            if chat:
                raise ConfigError("--chat applies a chat template to text prompts; "
                                  "this file has prompt_ids")
            out.append(Prompt(text, seed))
        elif tokenizer is None:
            raise ConfigError("text prompts need a tokenizer; this target has none: "
                              "use --prompt-ids or prompt_ids")
        elif chat:
            # Render the template as text, then tokenize it as it stands: the template already
            # holds the special tokens the model was trained with.
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                     tokenize=False, add_generation_prompt=True)
            ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
            out.append(Prompt(list(ids), seed))
        else:
            out.append(Prompt(list(tokenizer(text)["input_ids"]), seed))
    return out


def _first(items: list, num_prompts: int | None, source: str) -> list:
    if num_prompts is None:
        return items
    if num_prompts > len(items):
        raise ConfigError(
            f"--num-prompts {num_prompts}: {source} holds only {len(items)} prompt(s)")
    return items[:num_prompts]


def _open_text(path: str):  # a text file object
    """A prompt file, gzip-compressed when its name ends in .gz (HumanEval.jsonl.gz as shipped)."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _lines(fh, path: str):  # lines of a text file
    try:
        yield from fh
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--prompt-file {path!r} cannot be read as text: {exc}") from None


def _ids_of(value: object, where: str) -> list[int]:
    """A JSON line's prompt_ids: a non-empty list of integers."""
    if not isinstance(value, list) or not value or not all(type(x) is int for x in value):
        raise ConfigError(f"{where}: 'prompt_ids' must be a non-empty list of integers, got "
                          f"{json.dumps(value)[:80]}")
    return value


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
            raise ConfigError(f"prompt {index} has token ids outside the vocabulary "
                              f"[0, {vocab}): {bad[:5]}")
        if limits:
            # Drafts can run ahead of the committed text, so leave room for them too.
            run_ahead = config.lookahead if config.uses_drafter else 0
            need = len(ids) + config.max_new_tokens + run_ahead
            if need > min(limits):
                raise ConfigError(
                    f"prompt {index} has {len(ids)} tokens; "
                    f"with --max-new-tokens {config.max_new_tokens} "
                    f"it needs {need} positions but the model's context is {min(limits)}: "
                    "shorten the prompt or lower --max-new-tokens"
                )


def check_engine(config: RunConfig, infos: Sequence[ModelInfo]) -> None:
    """The CUDA-graph engine in G > 1 segments runs Llama-layout decoders only."""
    if config.engine_name != "cudagraph":
        return
    from dsi_mpi.backends.choice import graph_refusal

    for info in infos:
        refusal = graph_refusal(info.model_type, config.graph_segments)
        if info.model_type is not None and refusal:
            raise ConfigError(refusal)


def preflight(config: RunConfig, prompt: str | None = None, prompt_file: str | None = None,
              prompt_ids: str | None = None, chat: bool = False,
              num_prompts: int | None = None) -> tuple[list[Prompt], object | None]:
    """Everything rank 0 checks before any rank loads weights, then the GGUF conversions;
    returns prompts and tokenizer."""
    if config.target_ranks > 1:
        check_model_source(config.target, "--target")
        check_tensor_parallel(config.target, config.target_ranks)
    target = inspect_model(config.target, "--target")
    infos = [target]
    if config.uses_drafter:
        assert config.drafter is not None
        drafter = inspect_model(config.drafter, "--drafter", target)
        method = check_vocabularies(target, drafter, config)
        if method is not None:
            print(f"dsi-mpi: the drafter's vocabulary differs from the target's: its drafts are "
                  f"translated ({TRANSLATIONS[method]}); acceptance counts target tokens",
                  flush=True)
            # The prompts are target ids; the drafter's context length still bounds them.
            drafter = ModelInfo(target.vocab_size, drafter.max_positions, None)
        infos.append(drafter)
    check_engine(config, infos)
    prompts = read_prompts(prompt, prompt_file, prompt_ids, target.tokenizer, chat, num_prompts)
    check_prompts(prompts, config, infos)
    prepare_models(config)
    return prompts, target.tokenizer


def prepare_models(config: RunConfig) -> None:
    """Convert GGUF specs to their cached folders (once; later runs find them in the cache)."""
    from dsi_mpi.backends import gguf

    specs = [config.target] + ([config.drafter] if config.uses_drafter and config.drafter else [])
    for spec in specs:
        if is_gguf(spec):
            gguf.convert(spec)
