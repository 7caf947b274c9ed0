"""GGUF files as model specs: converted once to a cached safetensors folder, then loaded as one.

transformers reads a ``.gguf`` file with ``from_pretrained(folder, gguf_file=name)``, but it
dequantizes every tensor on every load (about 10 s for SmolLM2-135M, minutes for larger
models), and every MPI rank would pay it. So a GGUF spec is converted once: transformers
loads it in float32 (every GGUF tensor type dequantizes exactly into float32), and the
weights, config, generation config and tokenizer are saved to

    $DSI_MPI_CACHE/gguf/<file stem>-<key>       (default: $XDG_CACHE_HOME/dsi_mpi, ~/.cache/dsi_mpi)

where ``key`` hashes the file's real path, size and modification time and the transformers
version. The folder is written to a temporary directory and renamed into place, so ranks or
processes that race each other never see half a folder: the loser of the race discards its
copy. Rank 0 converts in preflight, before the other ranks load; a rank that cannot see the
cache (another node, no shared home) converts its own copy.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

SUFFIX = ".gguf"
FORMAT_VERSION = 1  # bump when the conversion changes, so old folders are not reused


def is_gguf(spec: str) -> bool:
    return spec.lower().endswith(SUFFIX)


def cache_root() -> str:
    """Where converted models live: ``$DSI_MPI_CACHE``, else the user's cache directory."""
    root = os.environ.get("DSI_MPI_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "dsi_mpi")
    return os.path.abspath(root)


def read_config(path: str):  # returns a transformers PretrainedConfig
    """The model config in a GGUF file's header: proof that the file exists and holds an
    architecture transformers can read from GGUF, in a few seconds, before any conversion.

    Raises FileNotFoundError or ValueError with a message that names the file and the fix.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    from transformers import AutoConfig

    folder, name = os.path.split(os.path.abspath(path))
    try:
        return AutoConfig.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError) as exc:
        raise ValueError(
            f"transformers cannot read {path!r} ({str(exc).splitlines()[0]}); convert it to a "
            "Hugging Face folder with save_pretrained, or use a GGUF of a supported architecture"
        ) from None
    except (OSError, ImportError) as exc:
        raise ValueError(f"cannot read GGUF file {path!r}: {str(exc).splitlines()[0]}") from None


def converted_folder(path: str) -> str:
    """The cache folder a GGUF file converts to (whether or not it exists yet)."""
    import transformers

    real = os.path.realpath(path)
    stat = os.stat(real)
    identity = (f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}"
                f"\0{transformers.__version__}\0{FORMAT_VERSION}")
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    stem = os.path.basename(real)[: -len(SUFFIX)]
    return os.path.join(cache_root(), "gguf", f"{stem}-{key}")


def is_converted(path: str) -> bool:
    return os.path.isfile(path) and os.path.isdir(converted_folder(path))


def convert(path: str) -> str:
    """The converted folder of a GGUF file, converting it first if the cache lacks it."""
    final = converted_folder(path)
    if os.path.isdir(final):
        return final
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.realpath(path))
    os.makedirs(os.path.dirname(final), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.", dir=os.path.dirname(final))
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # The weights are plain dequantized tensors now; transformers still marks the model as
        # GGUF-quantized and refuses to save it unless told otherwise.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(staging)
        del model
        try:
            os.rename(staging, final)
        except OSError:
            if not os.path.isdir(final):
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another process won the race
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final
