"""How long one forward takes on each engine, next to the memory floor and transformers' peer.

For each model shape and engine: the median latency of one forward of m = 1 .. k+1 new tokens
on a cache of C tokens (C = 128 and 2048 by default), the way the ranks call it
(``Engine.logits`` with a CANCEL probe, then the logits read on the host); then the rollback
of those m tokens. Beside it, the memory floor: the bytes such a forward must read (weights
plus the K/V of C cached positions) over the copy bandwidth measured in the same run. And the
peer: transformers' own ``generate`` in tokens/s with its default (dynamic) cache, and with its
static cache and ``torch.compile`` (on CUDA only: its compile is the reduce-overhead,
CUDA-graph one).

Shapes are the real configs of SmolLM2-135M, Qwen2.5-0.5B, Qwen2.5-1.5B and Llama-3.1-8B
(written out below), with random weights made on the device (no weights of that size travel
to a lent GPU); ``--model SPEC`` times a real model instead (a folder or a .gguf file, e.g.
``$(python -m dsi_mpi.pretrained smollm2)``). One JSON line per measurement on stdout (and
``--output``), then a table on stderr.

    python bench/forward.py --shapes smollm2 --engines eager,static --dtype float32
    python bench/forward.py --device cuda --dtype bfloat16            # every shape and engine
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import device_name, git_commit  # noqa: E402

SHAPES = {  # the models' config.json, the fields that set a forward's work
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         vocab_size=151936, max_position_embeddings=32768,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         vocab_size=151936, max_position_embeddings=32768,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}),
}


def build(shape: str | None, model_spec: str | None, dtype: torch.dtype, device: str):
    """A model on ``device``: random weights of a shape, or a real model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_spec:
        from dsi_mpi.backends.hf import pretrained_path

        model = AutoModelForCausalLM.from_pretrained(pretrained_path(model_spec), dtype=dtype)
        return model.to(device).eval()
    fields = dict(SHAPES[shape])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def engine_for(kind: str, model, device: str, capacity: int, max_block: int, segments: int):
    from dsi_mpi.backends import EngineOptions
    from dsi_mpi.backends.gate import LayerGate
    from dsi_mpi.backends.hf import _decoder_layers, make_engine

    gate = LayerGate.for_device(torch.device(device))
    gate.install(_decoder_layers(model))
    options = EngineOptions(kind=kind, capacity=capacity, max_block=max_block, segments=segments)
    return make_engine(kind, model, torch.device(device), gate, options), gate


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def copy_bandwidth(device: str, mib: int) -> float:
    """Bytes per second a device-to-device copy reads (the floor's denominator)."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(7):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return src.numel() / statistics.median(times)


def model_bytes(model, cached: int) -> tuple[int, int]:
    """Weight bytes (tied weights once) and the K/V bytes of ``cached`` positions."""
    seen, weights = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            weights += p.numel() * p.element_size()
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * cached
    return weights, kv * next(model.parameters()).element_size()


def prefill(engine, cached: int, vocab: int) -> None:
    """``cached`` random positions in the engine's cache (eager chunks on every engine)."""
    gen = torch.Generator().manual_seed(cached)
    engine.crop(0)
    prefix = torch.randint(vocab, (cached,), generator=gen).tolist()
    for start in range(0, cached, 512):
        engine.logits(prefix[start:start + 512], 1, None)


def time_forwards(engine, device: str, cached: int, block: int, trials: int,
                  vocab: int) -> list[float]:
    """Seconds per forward of ``block`` tokens on ``cached`` positions (each rolled back)."""
    tokens = torch.randint(vocab, (block,), generator=torch.Generator().manual_seed(block))
    times = []
    for _ in range(trials + 2):  # two warm-ups
        sync(device)
        t0 = time.perf_counter()
        logits = engine.logits(tokens.tolist(), block, lambda: False)
        logits[-1, :8].cpu()  # the host reads the result, as a rank does
        times.append(time.perf_counter() - t0)
        engine.crop(cached)
    return times[2:]


def peer_generate(model, device: str, cached: int, new_tokens: int, compiled: bool) -> dict:
    """transformers' generate: tokens/s of ``new_tokens`` greedy tokens after ``cached``."""
    ids = torch.randint(model.config.vocab_size, (1, cached), device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if compiled:
        kwargs["cache_implementation"] = "static"  # generate compiles its decoding forward
    with torch.inference_mode():
        model.generate(ids, **kwargs)  # warm-up (and compile)
        sync(device)
        t0 = time.perf_counter()
        model.generate(ids, **kwargs)
        sync(device)
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": new_tokens / seconds, "ms_per_token": seconds / new_tokens * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    p.add_argument("--model", help="time this model (folder or .gguf) instead of --shapes")
    p.add_argument("--engines", help="default: eager,static,cudagraph on CUDA, eager,static else")
    p.add_argument("--segments", default="1", help="cudagraph: graph segments to time, e.g. 1,4")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on a CPU")
    p.add_argument("--caches", default="128,2048", help="cached positions before the forward")
    p.add_argument("--lookahead", type=int, default=5, help="k: blocks of 1 .. k+1 tokens")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--peer-tokens", type=int, default=32, help="0: no generate peer")
    p.add_argument("--peer-shapes", help="time generate for these shapes only (default: all)")
    p.add_argument("--bandwidth-mib", type=int, default=None)
    p.add_argument("--output", help="also append the JSON lines here")
    args = p.parse_args(argv)
    from dsi_mpi.backends.hf import resolve_dtype

    cuda = args.device.startswith("cuda")
    dtype = resolve_dtype(args.dtype or ("bfloat16" if cuda else "float32"), args.device)
    engines = (args.engines or ("eager,static,cudagraph" if cuda else "eager,static")).split(",")
    if "cudagraph" in engines and not cuda:
        p.error("--engines cudagraph needs --device cuda")
    caches = [int(c) for c in args.caches.split(",")]
    shapes = [None] if args.model else args.shapes.split(",")
    unknown = [s for s in shapes if s is not None and s not in SHAPES]
    if unknown:
        p.error(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    out = open(args.output, "a", encoding="utf-8") if args.output else None
    bandwidth = copy_bandwidth(args.device, args.bandwidth_mib or (1024 if cuda else 256))
    meta = {"commit": git_commit(), "device": device_name(args.device), "dtype": str(dtype)[6:],
            "torch": torch.__version__, "threads": torch.get_num_threads()}

    def emit(row: dict) -> None:
        line = json.dumps(meta | row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    emit({"kind": "bandwidth", "copy_read_gb_s": bandwidth / 1e9})
    rows = []
    for shape in shapes:
        name = shape or args.model
        model = build(shape, args.model, dtype, args.device)
        vocab = model.config.vocab_size
        for cached in caches:
            # Each engine sized as a run sizes it: the cache holds what the run needs (here
            # the cached positions and one block), not more: static attention reads it all.
            runs = []  # (engine kind, segments, engine, gate, set-up seconds)
            for kind in engines:
                for segments in ([int(s) for s in args.segments.split(",")]
                                 if kind == "cudagraph" else [1]):
                    t0 = time.perf_counter()
                    engine, gate = engine_for(kind, model, args.device,
                                              cached + args.lookahead + 1, args.lookahead + 1,
                                              segments)
                    runs.append((kind, segments, engine, gate, time.perf_counter() - t0))
            weights, kv = model_bytes(model, cached)
            floor_ms = (weights + kv) / bandwidth * 1e3
            for _, _, engine, _, _ in runs:
                prefill(engine, cached, vocab)
            for block in range(1, args.lookahead + 2):
                for kind, segments, engine, _, setup_s in runs:  # interleaved: same conditions
                    times = time_forwards(engine, args.device, cached, block, args.trials, vocab)
                    ms = statistics.median(times) * 1e3
                    row = {"kind": "forward", "shape": name, "engine": kind,
                           "segments": segments, "cached": cached, "block": block,
                           "capacity": getattr(engine, "capacity", None),
                           "median_ms": ms, "min_ms": min(times) * 1e3, "floor_ms": floor_ms,
                           "over_floor": ms / floor_ms, "setup_s": setup_s,
                           "captures": getattr(engine, "captures", 0)}
                    emit(row)
                    rows.append(row)
            for run in runs:
                run[3].uninstall()  # the gate's hooks
            del runs
            if cuda:
                torch.cuda.empty_cache()
        peers = args.peer_tokens and (not args.peer_shapes or name in args.peer_shapes.split(","))
        for compiled in ([False, True] if cuda else [False]) if peers else []:
            try:
                peer = peer_generate(model, args.device, caches[0], args.peer_tokens, compiled)
            except Exception as exc:  # a compile that fails is a result too
                peer = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            emit({"kind": "generate", "shape": name, "cache": "static+compile" if compiled
                  else "dynamic", "cached": caches[0], "new_tokens": args.peer_tokens} | peer)
        del model
        if cuda:
            torch.cuda.empty_cache()
    table(rows)
    return 0


def table(rows: list[dict]) -> None:
    """Median ms per engine, and each engine over eager, on stderr."""
    base = {(r["shape"], r["cached"], r["block"]): r["median_ms"] for r in rows
            if r["engine"] == "eager"}
    print(f"{'shape':>14} {'engine':>12} {'cached':>6} {'block':>5} {'ms':>8} {'floor':>7} "
          f"{'/eager':>7}", file=sys.stderr)
    for r in rows:
        eager = base.get((r["shape"], r["cached"], r["block"]))
        engine = r["engine"] + (f"/G={r['segments']}" if r["engine"] == "cudagraph" else "")
        ratio = f"{r['median_ms'] / eager:7.3f}" if eager else "      -"
        print(f"{r['shape'][-14:]:>14} {engine:>12} {r['cached']:>6} {r['block']:>5} "
              f"{r['median_ms']:8.3f} {r['floor_ms']:7.3f} {ratio}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
