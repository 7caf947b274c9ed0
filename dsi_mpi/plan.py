"""The planner: lookahead and SP degree for a target/drafter pair before cluster hours are spent.

Eq. 1 of the paper gives the smallest lookahead for which no verification task waits for a
server; the simulator then checks a sweep of lookaheads around it (the policy it simulates is
the runtime's own) and reports the expected latency of DSI, SI and non-SI.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass

from dsi_mpi.simulate import (
    IDEAL,
    Latencies,
    MessageModel,
    SimSummary,
    dsi_lookaheads,
    min_lookahead,
    servers_needed,
    simulate,
)

DEFAULT_LOOKAHEADS = (1, 2, 3, 4, 5, 6, 7, 8, 10)


@dataclass
class Plan:
    lookahead: int  # recommended for DSI
    sp: int  # recommended target servers
    min_drafts: int  # recommended for DSI: a task carries no drafts or at least this many
    eq1_lookahead: int  # the paper's Eq. 1 at the available SP
    si_lookahead: int  # SI's best lookahead
    dsi: SimSummary
    si: SimSummary
    nonsi: SimSummary

    def as_dict(self) -> dict:
        return {
            "lookahead": self.lookahead,
            "min_drafts": self.min_drafts,
            "sp": self.sp,
            "eq1_lookahead": self.eq1_lookahead,
            "si_lookahead": self.si_lookahead,
            "dsi_ms": self.dsi.mean_ms,
            "si_ms": self.si.mean_ms,
            "nonsi_ms": self.nonsi.mean_ms,
            "speedup_over_si": self.si.mean_ms / self.dsi.mean_ms,
            "speedup_over_nonsi": self.nonsi.mean_ms / self.dsi.mean_ms,
            "ranks": self.sp + 2,
        }


def from_profile(path: str) -> tuple[Latencies, float]:
    """Latencies and acceptance from a JSON file written by ``dsi-mpi profile``.

    Raises OSError when the file cannot be read and ValueError when it is not a profile."""
    with open(path, encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg})") from None
    try:
        values = [float(data[model][key])
                  for model in ("target", "drafter") for key in ("tpot_ms", "ttft_ms")]
        acceptance = float(data["acceptance"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("not a profile: it needs target and drafter tpot_ms and ttft_ms, "
                         "and acceptance (write one with dsi-mpi profile)") from None
    target_tpot, target_ttft, drafter_tpot, drafter_ttft = values
    finite = all(math.isfinite(v) and v >= 0 for v in values)
    if not finite or target_tpot <= 0 or not 0 <= acceptance <= 1:
        raise ValueError("latencies must be >= 0 ms with the target's TPOT > 0, "
                         "and acceptance in [0, 1]")
    block = _block_ms(data["target"].get("block_ms"))
    drafter_block = _block_ms(data["drafter"].get("block_ms"))
    shared = None
    if data.get("shared"):
        try:
            t, d = data["shared"]["target"], data["shared"]["drafter"]
            shared = Latencies(float(t["tpot_ms"]), float(d["tpot_ms"]), float(t["ttft_ms"]),
                               float(d["ttft_ms"]), _block_ms(t.get("block_ms")),
                               drafter_block_ms=_block_ms(d.get("block_ms")))
        except (KeyError, TypeError, ValueError):
            raise ValueError("its shared latencies need target and drafter tpot_ms and "
                             "ttft_ms") from None
    return Latencies(target_tpot, drafter_tpot, target_ttft, drafter_ttft, block,
                     shared, drafter_block), acceptance


def _block_ms(pairs: object) -> tuple[tuple[int, float], ...]:
    """A profile's ``block_ms`` ([[new tokens, ms], ...], lengths >= 2 ascending)."""
    if not pairs:
        return ()
    try:
        block = tuple((int(n), float(ms)) for n, ms in pairs)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise ValueError("block_ms must be [[new tokens, ms], ...]") from None
    lengths = [n for n, _ in block]
    if lengths[0] < 2 or lengths != sorted(set(lengths)) or \
            not all(math.isfinite(ms) and ms >= 0 for _, ms in block):
        raise ValueError("block_ms needs lengths >= 2, ascending, and costs >= 0 ms")
    return block


def tp_degree(path: str) -> int:
    """The ranks per target server a profile was measured with (``profile --target-ranks``)."""
    with open(path, encoding="utf-8") as fh:
        value = json.load(fh).get("target_ranks", 1)
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"target_ranks must be an integer >= 1, got {value!r}")
    return value


def weigh_tp(options: Iterable[tuple[int, Latencies, float]], gpus: int, tokens: int = 50,
             repeats: int = 20, seed: int = 0) -> dict[int, Plan | None]:
    """For ``gpus`` GPUs (one drafter, the rest in target servers of N GPUs each), the plan of
    each TP degree N with the latencies profiled for it: SP is ``(gpus - 1) // N``, so a higher
    degree buys a faster server with fewer servers. None: not one server fits."""
    out: dict[int, Plan | None] = {}
    for n, lat, acceptance in options:
        servers = (gpus - 1) // n
        out[n] = (make_plan(lat, acceptance, 1 + servers, tokens, repeats, seed)
                  if servers >= 1 else None)
    return out


def min_drafts_sweep(lat: Latencies, lookahead: int) -> range:
    """The ``min_drafts`` worth simulating for DSI at ``lookahead``: on a flat cost curve a
    draft never makes a forward dearer, so 1; on a curve (a CPU's step) 1 .. lookahead."""
    shared = lat.shared.target_block_ms if lat.shared is not None else ()
    return range(1, lookahead + 1) if lat.target_block_ms or shared else range(1, 2)


def best(mode: str, lat: Latencies, acceptance: float, lookaheads: Iterable[int], sp: int,
         tokens: int, repeats: int, seed: int, messages: MessageModel = IDEAL) -> SimSummary:
    """The lookahead (and for DSI the ``min_drafts``) with the lowest mean latency (the
    smallest on ties)."""
    runs = [simulate(mode, lat, acceptance, k, sp, tokens, repeats, seed, messages=messages,
                     min_drafts=m)
            for k in sorted(set(lookaheads))
            for m in (min_drafts_sweep(lat, k) if mode == "dsi" else (1,))]
    return min(runs, key=lambda s: (round(s.mean_ms, 9), s.lookahead, s.min_drafts))


def within_curve(lat: Latencies, lookaheads: Iterable[int], mode: str) -> list[int]:
    """The lookaheads whose tasks the cost curve prices by measurement, not by extending its
    last point: SI's tasks are k + 1 tokens long, DSI's at SP 1 up to 2k + 1 (every draft of its
    run-ahead). Every lookahead without a curve; at least 1."""
    wanted = sorted(set(lookaheads))
    if not lat.target_block_ms:
        return wanted
    longest = lat.target_block_ms[-1][0]
    fits = [k for k in wanted if (k + 1 if mode == "si" else 2 * k + 1) <= longest]
    return fits or [1]


def make_plan(lat: Latencies, acceptance: float, gpus: int, tokens: int = 50, repeats: int = 20,
              seed: int = 0, lookaheads: Iterable[int] = DEFAULT_LOOKAHEADS) -> Plan:
    """One GPU for the drafter, the rest for target servers (the coordinator needs none).
    With a cost curve, only lookaheads it covers are weighed (:func:`within_curve`)."""
    if gpus < 2:
        raise ValueError(f"DSI needs at least 2 GPUs (one drafter, one target), got {gpus}")
    available = gpus - 1
    eq1 = min_lookahead(lat, available)
    lookaheads = list(lookaheads)
    dsi = best("dsi", lat, acceptance,
               within_curve(lat, dsi_lookaheads(lat, available, lookaheads), "dsi"), available,
               tokens, repeats, seed)
    # The fewest servers that keep the chosen lookahead within 1% of every server's latency
    # (the paper's "more than ceil(t_target / t_drafter) servers cannot help" holds in steady
    # state; prefill and restarts make the simulator the judge). Spare GPUs can serve others.
    sp = available
    for candidate in range(min(servers_needed(lat, dsi.lookahead), available), available):
        smaller = simulate("dsi", lat, acceptance, dsi.lookahead, candidate, tokens, repeats, seed,
                           min_drafts=dsi.min_drafts)
        if smaller.mean_ms <= dsi.mean_ms * 1.01:
            dsi, sp = smaller, candidate
            break
    si = best("si", lat, acceptance, within_curve(lat, lookaheads, "si"), 1, tokens, repeats, seed)
    nonsi = simulate("nonsi", lat, acceptance, 1, 1, tokens, repeats, seed)
    return Plan(dsi.lookahead, sp, dsi.min_drafts, eq1, si.lookahead, dsi, si, nonsi)
