"""GGUF files as model specs: the cached conversion is lossless, atomic and checked up front."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dsi_mpi.backends import gguf, load_backend
from dsi_mpi.config import ConfigError, RunConfig
from dsi_mpi.preflight import preflight


def test_the_converted_folder_is_the_gguf_model(smollm2: dict[str, str]) -> None:
    """Same weights, config and tokenizer as transformers' own GGUF loading, in float32 (every
    GGUF type dequantizes exactly into it) and in bfloat16 (cast from the same float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(smollm2["gguf"])
    load = AutoModelForCausalLM.from_pretrained
    for dtype in (torch.float32, torch.bfloat16):
        direct = load(folder, gguf_file=name, dtype=dtype).state_dict()
        converted = load(smollm2["folder"], dtype=dtype).state_dict()
        assert direct.keys() == converted.keys()
        assert all(torch.equal(direct[k], converted[k]) for k in direct)
    a = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    b = AutoTokenizer.from_pretrained(smollm2["folder"])
    text = "def fib(n):\n    '''The n-th Fibonacci number.'''\n\t return 'é😀' <|im_end|>"
    assert a(text)["input_ids"] == b(text)["input_ids"]
    assert a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template


def test_a_gguf_spec_loads_from_the_cache(smollm2: dict[str, str]) -> None:
    assert gguf.converted_folder(smollm2["gguf"]) == smollm2["folder"]
    assert gguf.converted_folder(smollm2["gguf"]).startswith(os.environ["DSI_MPI_CACHE"])
    before = os.stat(smollm2["folder"]).st_mtime_ns
    backend = load_backend(smollm2["gguf"], dtype="float32")
    assert os.stat(smollm2["folder"]).st_mtime_ns == before  # reused, not converted again
    assert backend.config.num_hidden_layers == 30 and backend.vocab_size == 49152
    assert backend.eos_token_ids == frozenset({2}) and backend.model.dtype == torch.float32


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setenv("DSI_MPI_CACHE", str(tmp_path / "c"))
    assert gguf.cache_root() == str(tmp_path / "c")
    monkeypatch.delenv("DSI_MPI_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf.cache_root() == str(tmp_path / "xdg" / "dsi_mpi")


class _Stub:
    """Stands in for transformers' GGUF loading, so the cache logic is tested in milliseconds."""

    def __init__(self, tiny_suite: dict[str, str], fail: bool = False) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tiny, self.fail, self.loads = tiny_suite["llama"], fail, 0
        self._load_model = AutoModelForCausalLM.from_pretrained
        self._load_tokenizer = AutoTokenizer.from_pretrained

    def model(self, folder: str, gguf_file: str, dtype: torch.dtype):
        self.loads += 1
        if self.fail:
            raise RuntimeError("disk full")
        return self._load_model(self.tiny, dtype=dtype)

    def tokenizer(self, folder: str, gguf_file: str):
        return self._load_tokenizer(self.tiny)


def _stub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stub: _Stub) -> str:
    import transformers

    monkeypatch.setenv("DSI_MPI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", stub.model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", stub.tokenizer)
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    return str(path)


def test_conversion_is_atomic_and_done_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                            tiny_suite: dict[str, str]) -> None:
    stub = _Stub(tiny_suite)
    path = _stub(monkeypatch, tmp_path, stub)
    assert not gguf.is_converted(path)
    folder = gguf.convert(path)
    assert gguf.is_converted(path) and gguf.convert(path) == folder and stub.loads == 1
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}
    assert expected <= set(os.listdir(folder))
    assert os.listdir(os.path.dirname(folder)) == [os.path.basename(folder)]  # no staging left
    # A changed file is another model: a new folder.
    Path(path).write_bytes(b"GGUF v2")
    assert gguf.converted_folder(path) != folder


def test_losing_a_conversion_race_keeps_the_winners_folder(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path,
                                                           tiny_suite: dict[str, str]) -> None:
    path = _stub(monkeypatch, tmp_path, _Stub(tiny_suite))
    final = gguf.converted_folder(path)
    rename = os.rename

    def another_process_wins(src: str, dst: str) -> None:
        os.makedirs(dst)
        Path(dst, "winner").touch()
        rename(src, dst)  # raises: the destination is a non-empty folder

    monkeypatch.setattr(gguf.os, "rename", another_process_wins)
    assert gguf.convert(path) == final
    assert os.listdir(final) == ["winner"]
    assert os.listdir(os.path.dirname(final)) == [os.path.basename(final)]


def test_a_failed_conversion_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                            tiny_suite: dict[str, str]) -> None:
    path = _stub(monkeypatch, tmp_path, _Stub(tiny_suite, fail=True))
    with pytest.raises(RuntimeError, match="disk full"):
        gguf.convert(path)
    assert os.listdir(os.path.dirname(gguf.converted_folder(path))) == []


def _write_gguf(path: Path, architecture: str) -> str:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_bad_gguf_specs_fail_before_any_compute(tmp_path: Path, tiny_suite: dict[str, str]) -> None:
    missing = str(tmp_path / "missing.gguf")
    with pytest.raises(ConfigError, match=r"--target: GGUF file .*missing.gguf' does not exist"):
        preflight(RunConfig(target=missing, drafter="self:layers=1"), prompt="hi")
    with pytest.raises(ConfigError, match=r"--drafter: GGUF file .*missing.gguf' does not exist"):
        preflight(RunConfig(target=tiny_suite["llama"], drafter=missing), prompt="hi")
    unsupported = _write_gguf(tmp_path / "rwkv.gguf", "rwkv7")
    with pytest.raises(ConfigError, match="architecture rwkv7 is not supported"):
        preflight(RunConfig(target=unsupported, drafter="self:layers=1"), prompt="hi")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_text("not a model")
    with pytest.raises(ConfigError, match="transformers cannot read"):
        preflight(RunConfig(target=str(garbage), drafter="self:layers=1"), prompt="hi")
    converted = os.path.join(gguf.cache_root(), "gguf")
    assert not any(name.startswith(("rwkv-", "garbage-")) for name in
                   (os.listdir(converted) if os.path.isdir(converted) else []))
