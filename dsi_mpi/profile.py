"""``dsi-mpi profile``: the planner's inputs, measured on real models the way the paper did.

The paper's appendix F: each model's TTFT (the forward over the prompt) and TPOT (the mean of
the later one-token forwards), measured per prompt after a warm-up; and the pair's acceptance
rate under greedy decoding: the target generates, and the drafter predicts every next token
from the target's own prefix; acceptance is the fraction it gets right.

One pass per model and prompt does both. The target decodes greedily with its KV cache
(non-SI), timing each forward. The drafter then reads the prompt and the target's tokens one
forward at a time, as it would in a run, and its greedy pick after each prefix is compared
with the target's next token. Because a block of drafts is all correct up to draft ``i`` exactly
when the drafter's context still equals the target's prefix, the per-position acceptance in
blocks of ``lookahead`` drafts follows from the same comparisons, with no extra forwards:
position ``i`` of a block is accepted with probability
``#(blocks whose first i drafts match) / #(blocks whose first i - 1 match)``, which an i.i.d.
acceptance rate ``a`` (the simulator's model) predicts to be ``a`` at every position.

A drafter with another vocabulary drafts through a translating drafter (``translate.py``), as
on a drafter rank: its times and matches are per target token, and the result adds the
``translation`` and, per target token, the drafter model's forwards, the time in them and the
rest (translation: detokenizing, re-tokenizing, syncing).

One process, no MPI; any backend spec (emulated ones sleep their latencies, which makes the
measurement itself testable).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from dsi_mpi import costcurve
from dsi_mpi.backends import Backend, load_backend
from dsi_mpi.config import RunConfig
from dsi_mpi.servergroup import ServerGroup
from dsi_mpi.translate import TranslatingDrafter, load_drafter, method_for
from dsi_mpi.verify import SamplingParams

GREEDY = SamplingParams()


@dataclass
class Timing:
    """One model's forwards over one prompt: the prompt's, then one per later token."""

    ttft_ms: float
    decode_ms: list[float] = field(default_factory=list)

    @property
    def tpot_ms(self) -> float | None:
        return statistics.fmean(self.decode_ms) if self.decode_ms else None


def _sync(backend: Backend) -> None:
    device = getattr(backend, "device", None)
    if device is not None and getattr(device, "type", "") == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _timed_forward(backend: Backend, tokens: Sequence[int],
                   num_outputs: int = 1) -> tuple[int, float]:
    """The model's greedy token after ``tokens`` (appended to its cache) and the forward's ms,
    with the logits of the last ``num_outputs`` positions computed (a verification's: one per
    position it covers)."""
    _sync(backend)
    start = time.perf_counter()
    out = backend.forward(tokens, GREEDY, num_outputs=num_outputs)
    _sync(backend)
    return int(out.tokens[-1]), (time.perf_counter() - start) * 1e3


def generate(target: Backend, prompt: Sequence[int],
             max_new_tokens: int) -> tuple[list[int], Timing]:
    """Greedy non-SI decoding, timed: stops at ``max_new_tokens`` or an EOS (kept)."""
    target.reset()
    token, ms = _timed_forward(target, prompt)
    timing, tokens = Timing(ms), [token]
    while len(tokens) < max_new_tokens and token not in target.eos_token_ids:
        token, ms = _timed_forward(target, [token])
        timing.decode_ms.append(ms)
        tokens.append(token)
    return tokens, timing


def follow(drafter: Backend, prompt: Sequence[int],
           tokens: Sequence[int]) -> tuple[list[int], Timing]:
    """The drafter's greedy prediction for each position of ``tokens`` given the prefix before it
    (the prompt and the target's earlier tokens), timed like :func:`generate`."""
    drafter.reset()
    prediction, ms = _timed_forward(drafter, prompt)
    timing, predictions = Timing(ms), [prediction]
    for token in tokens[:-1]:
        prediction, ms = _timed_forward(drafter, [token])
        timing.decode_ms.append(ms)
        predictions.append(prediction)
    return predictions, timing


def block_acceptance(matches: Sequence[Sequence[bool]],
                     lookahead: int) -> tuple[list[float | None], float | None]:
    """Per-position acceptance in blocks of ``lookahead`` drafts, and the mean accepted length.

    A block starts at every position with ``lookahead`` positions after it; draft ``i`` of a
    block is accepted when drafts ``1..i`` all match. Entry ``i - 1`` of the list is
    P(draft i accepted | drafts 1..i-1 accepted), None where no block got that far.
    """
    reached = [0] * (lookahead + 1)  # reached[i]: blocks whose first i drafts were accepted
    for row in matches:
        for start in range(len(row) - lookahead + 1):
            accepted = 0
            while accepted < lookahead and row[start + accepted]:
                accepted += 1
            for i in range(accepted + 1):
                reached[i] += 1
    rates = [reached[i] / reached[i - 1] if reached[i - 1] else None
             for i in range(1, lookahead + 1)]
    mean_length = sum(reached[1:]) / reached[0] if reached[0] else None
    return rates, mean_length


def _summary(spec: str, timings: Sequence[Timing]) -> dict:
    ttfts = [t.ttft_ms for t in timings]
    decode = [ms for t in timings for ms in t.decode_ms]
    tpots = [t.tpot_ms for t in timings if t.tpot_ms is not None]
    return {
        "spec": spec,
        "ttft_ms": statistics.fmean(ttfts),  # mean over prompts
        "tpot_ms": statistics.fmean(decode) if decode else 0.0,  # mean over every later token
        "ttft_ms_median": statistics.median(ttfts),
        "tpot_ms_median": statistics.median(tpots) if tpots else 0.0,  # median of per-prompt means
        "ttft_over_tpot": statistics.fmean(ttfts) / statistics.fmean(decode) if decode else None,
        "forwards": len(ttfts) + len(decode),
    }


def measure(target: Backend, drafter: Backend, prompts: Sequence[Sequence[int]],
            max_new_tokens: int = 20, lookahead: int = 5, warmup: int = 1,
            shared: bool = False, beside: Any = None) -> dict:
    """Profile a loaded pair on ``prompts`` (token ids); the dict ``dsi-mpi profile`` writes,
    without the specs. Then the target's cost curve of 1 .. ``lookahead + 1`` new tokens and
    TTFT against prompt length, and with ``shared`` every latency again with the other model
    running beside it (``costcurve.py``; ``beside``: how, see ``costcurve.measure``)."""
    if not prompts:
        raise ValueError("profile needs at least one prompt")
    for _ in range(warmup):
        tokens, _ = generate(target, prompts[0], max_new_tokens)
        follow(drafter, prompts[0], tokens)
    if isinstance(drafter, TranslatingDrafter):  # its model's forwards and time: measured ones only
        drafter.drafter_forwards, drafter.model_seconds, drafter.timed = 0, 0.0, True
    per_prompt, matches, target_timings, drafter_timings = [], [], [], []
    for index, prompt in enumerate(prompts):
        tokens, t_timing = generate(target, prompt, max_new_tokens)
        predictions, d_timing = follow(drafter, prompt, tokens)
        row = [p == t for p, t in zip(predictions, tokens, strict=True)]
        matches.append(row)
        target_timings.append(t_timing)
        drafter_timings.append(d_timing)
        per_prompt.append({
            "prompt_index": index,
            "prompt_tokens": len(prompt),
            "new_tokens": len(tokens),
            "target_ttft_ms": t_timing.ttft_ms,
            "target_tpot_ms": t_timing.tpot_ms,
            "drafter_ttft_ms": d_timing.ttft_ms,
            "drafter_tpot_ms": d_timing.tpot_ms,
            "acceptance": sum(row) / len(row),
            "matches": "".join("1" if m else "0" for m in row),  # position by position
            "tokens": tokens,
        })
    total = sum(len(row) for row in matches)
    per_position, mean_length = block_acceptance(matches, lookahead)
    # A translating drafter's counts are the pass above's: the cost-curve pass leaves them.
    translating = drafter if isinstance(drafter, TranslatingDrafter) else None
    counted = (translating.drafter_forwards, translating.model_seconds) if translating else None
    costs = costcurve.measure(target, drafter, prompts, per_prompt, lookahead, shared, beside)
    if translating is not None and counted is not None:
        translating.drafter_forwards, translating.model_seconds = counted
    result = {
        "target": _summary("", target_timings) | {"block_ms": costs["block_ms"]},
        "drafter": _summary("", drafter_timings) | {"block_ms": costs["drafter_block_ms"]},
        "acceptance": sum(map(sum, matches)) / total,
        "acceptance_per_position": per_position,
        "mean_accepted_length": mean_length,
        "lookahead": lookahead,
        "prompts": len(prompts),
        "tokens": total,
        "max_new_tokens": max_new_tokens,
        "warmup": warmup,
        "ttft_vs_prompt": costs["ttft_vs_prompt"],
        "shared": costs.get("shared"),  # None: measured alone
        "per_prompt": per_prompt,
    }
    return result


def profile(config: RunConfig, prompts: Sequence[Sequence[int]], warmup: int = 1,
            group: ServerGroup | None = None, threads: int | None = None,
            shared: bool = True) -> dict:
    """Load ``config``'s target and drafter in this process and :func:`measure` them, on
    ``threads`` torch threads (default: torch's), with the other model running beside each
    (``shared``) as in a run on one machine.

    ``group`` (``--target-ranks N`` under ``mpiexec -n N``): the target is one server of N
    ranks; every rank runs this same greedy, deterministic measurement, so the target's
    forwards run in lockstep on every shard, and the times are the leader's."""
    import torch
    import transformers

    if threads is not None:
        torch.set_num_threads(threads)
    longest = max((len(p) for p in prompts), default=0)
    engine = config.engine_options(longest, config.lookahead)
    if group is not None:
        group.start_torch(config.device)
    target = load_backend(config.target, config.dtype, config.device, engine=engine,
                          tp_size=config.target_ranks)
    if group is not None:
        group.loaded(target)
    # A drafter with another vocabulary drafts through a translating drafter (translate.py): its
    # forwards, timings and matches are per target token, as the planner needs them.
    drafter = load_drafter(config.drafter or "", config.target, config.dtype, config.device,
                           target_eos=target.eos_token_ids, engine=engine)
    beside = None
    if shared and group is None:
        # Each model beside the other in a process of its own, as the ranks of a run are (a
        # server of several ranks, under mpiexec, keeps threads: its ranks are in lockstep).
        loaders = (partial(load_drafter, config.drafter or "", config.target, config.dtype,
                           config.device, target_eos=target.eos_token_ids, engine=engine),
                   partial(load_backend, config.target, config.dtype, config.device,
                           engine=engine))
        beside = (partial(costcurve.InProcess, loaders[0], threads),
                  partial(costcurve.InProcess, loaders[1], threads))
    result = measure(target, drafter, prompts, config.max_new_tokens, config.lookahead, warmup,
                     shared, beside)
    result["translation"] = None
    if isinstance(drafter, TranslatingDrafter):
        result["translation"] = method_for(config.verify)
        # Drafter model forwards per target token drafted (SLEM runs the drafter's model as
        # often as its text needs, and holds back the last, unstable target token).
        result["drafter"]["model_forwards"] = drafter.drafter_forwards
        # The rest of its time is translation: detokenizing, re-tokenizing, syncing.
        total_ms = sum(p["drafter_ttft_ms"] + (p["drafter_tpot_ms"] or 0.0) * (p["new_tokens"] - 1)
                       for p in result["per_prompt"])
        model_ms = drafter.model_seconds * 1e3
        result["drafter"]["model_ms_per_token"] = model_ms / result["tokens"]
        result["drafter"]["translation_ms_per_token"] = (total_ms - model_ms) / result["tokens"]
    result["target"]["spec"], result["drafter"]["spec"] = config.target, config.drafter
    for name, backend in (("target", target), ("drafter", drafter)):
        config_ = getattr(backend, "config", None)
        result[name]["num_layers"] = getattr(config_, "num_hidden_layers", None)
    result |= {
        "target_ranks": config.target_ranks,  # a server of this many ranks (TP): plan --gpus
        "dtype": config.dtype,
        "engine": config.engine_name,
        "device": config.device,
        "host": platform.node(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return result


def table(result: dict) -> str:
    """The profile as the table ``dsi-mpi profile`` prints."""
    lines = [f"{'':<8} {'mean':>19} {'median':>19}",
             f"{'model':<8} {'TTFT ms':>9} {'TPOT ms':>9} {'TTFT ms':>9} {'TPOT ms':>9} "
             f"{'TTFT/TPOT':>9}  spec"]
    for name in ("target", "drafter"):
        m = result[name]
        ratio = f"{m['ttft_over_tpot']:.2f}" if m["ttft_over_tpot"] is not None else "-"
        lines.append(f"{name:<8} {m['ttft_ms']:>9.2f} {m['tpot_ms']:>9.2f} "
                     f"{m['ttft_ms_median']:>9.2f} {m['tpot_ms_median']:>9.2f} {ratio:>9}  "
                     f"{m['spec']}")
    per_position = " ".join("-" if a is None else f"{a:.2f}"
                            for a in result["acceptance_per_position"])
    lines.append(f"acceptance {result['acceptance']:.3f} over {result['tokens']} target tokens of "
                 f"{result['prompts']} prompts; "
                 f"per draft position in blocks of {result['lookahead']}: "
                 f"{per_position or '- (too few tokens per prompt)'}")
    curve = " ".join(f"{n}:{ms:.0f}" for n, ms in result["target"].get("block_ms", []))
    if curve:
        lines.append(f"target forward of n new tokens (ms, median): "
                     f"1:{result['target']['tpot_ms']:.0f} {curve}")
    curve = " ".join(f"{n}:{ms:.0f}" for n, ms in result["drafter"].get("block_ms", []))
    if curve:
        lines.append(f"drafter forward of n new tokens (ms, median): "
                     f"1:{result['drafter']['tpot_ms']:.0f} {curve}")
    shared = result.get("shared")
    if shared:
        curve = " ".join(f"{n}:{ms:.0f}" for n, ms in shared["target"]["block_ms"])
        lines.append(f"with the other model running beside it: target TTFT "
                     f"{shared['target']['ttft_ms']:.1f} ms, forwards 1:"
                     f"{shared['target']['tpot_ms']:.0f} {curve}; drafter TTFT "
                     f"{shared['drafter']['ttft_ms']:.1f} ms, TPOT "
                     f"{shared['drafter']['tpot_ms']:.1f} ms"
                     + "".join(f" {n}:{ms:.0f}" for n, ms in shared["drafter"].get("block_ms", [])))
    if result.get("translation"):
        drafter = result["drafter"]
        per_token = drafter["model_forwards"] / drafter["forwards"]
        lines.append(f"the drafter's vocabulary differs: drafts translated "
                     f"({result['translation']}); per target token {per_token:.2f} drafter "
                     f"forwards, {drafter['model_ms_per_token']:.2f} ms in them, "
                     f"{drafter['translation_ms_per_token']:.2f} ms translating")
    return "\n".join(lines)
