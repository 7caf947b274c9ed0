"""Models for the benchmarks that need real numerics: a folder, a GGUF file, or random weights.

A model spec is one of:

- a folder made by ``save_pretrained`` (used as it is);
- a ``.gguf`` file (converted once, in float32, to a folder beside the other models: through
  ``dsi_mpi.backends.gguf`` where the package has it, else with transformers directly);
- ``random:SHAPE``: random weights of a named shape, built from a config and saved once.
  ``smollm2`` is SmolLM2-135M's architecture (30 layers, hidden 576, vocabulary 49152): its
  numerics are real, its acceptance rates are not; ``cpu`` is a Llama of 16 layers of hidden
  512, whose forward takes some milliseconds on one CPU core.

``python bench/models.py SPEC FOLDER`` prints the folder a spec resolves to (building it).
"""

from __future__ import annotations

import os
import sys

SHAPES: dict[str, dict] = {
    # SmolLM2-135M-Instruct's config.json (read from its GGUF header).
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                    tie_word_embeddings=True, hidden_act="silu",
                    bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "cpu": dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=16,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0),
}
RANDOM = "random:"


def random_model(shape: str, folder: str, seed: int = 0) -> str:
    """Random float32 weights of a named shape, saved to ``folder`` (reused when it exists)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]), dtype=torch.float32)
    model.generation_config.pad_token_id = SHAPES[shape]["pad_token_id"]
    model.save_pretrained(folder)
    return folder


def convert_gguf(path: str, folder: str) -> str:
    """A GGUF file as a float32 ``save_pretrained`` folder (its tokenizer included)."""
    try:
        from dsi_mpi.backends import gguf  # the GGUF converter, with its cache
    except ImportError:
        gguf = None
    if gguf is not None:
        return gguf.convert(path)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = os.path.split(os.path.abspath(path))
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None  # dequantized already; transformers refuses to save it otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(where, gguf_file=name).save_pretrained(folder)
    return folder


def resolve(spec: str, workdir: str) -> str:
    """The folder a model spec stands for, building or converting it under ``workdir``."""
    if spec.startswith(RANDOM):
        shape = spec[len(RANDOM):]
        return random_model(shape, os.path.join(workdir, f"random-{shape}"))
    if spec.lower().endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"GGUF file {spec!r} does not exist")
        stem = os.path.basename(spec)[: -len(".gguf")]
        return convert_gguf(spec, os.path.join(workdir, stem))
    if not os.path.isfile(os.path.join(spec, "config.json")):
        raise FileNotFoundError(f"{spec!r} is not a model folder (no config.json), "
                                "a .gguf file or random:SHAPE")
    return spec


def describe(spec: str) -> str:
    """What a spec is, for the JSON lines: the shape's name or the path."""
    return spec if spec.startswith(RANDOM) else os.path.abspath(spec)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python bench/models.py SPEC WORKDIR", file=sys.stderr)
        sys.exit(2)
    print(resolve(sys.argv[1], sys.argv[2]))
