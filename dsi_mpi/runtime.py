"""One run over MPI: every rank calls :func:`run` with the same configs; rank 0 gets records.

Rank 0 coordinates, drafter and target ranks load their model once and serve every mode
and prompt in turn, so DSI, SI and non-SI are measured on the same ranks and the same
caches. All ranks synchronise (with a deadline) after loading, so no prompt's time includes
another rank's model load.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field

from mpi4py import MPI

from dsi_mpi.backends import Backend, load_backend
from dsi_mpi.config import ConfigError, RunConfig
from dsi_mpi.coordinator import Coordinator, PromptResult
from dsi_mpi.devices import model_device
from dsi_mpi.drafter import serve_drafter
from dsi_mpi.preflight import Prompt
from dsi_mpi.protocol import Bye, Tag
from dsi_mpi.roles import Layout, make_layout
from dsi_mpi.target import serve_target
from dsi_mpi.translate import load_drafter, method_for, vocabularies_differ
from dsi_mpi.transport import IDLE, Transport


@dataclass
class RunOutcome:
    records: list[dict] = field(default_factory=list)  # rank 0 only
    pending_requests: int = 0  # MPI requests left open at shutdown on this rank
    role: str = ""


def record(result: PromptResult, config: RunConfig, sp: int, prompt_index: int, prompt_len: int,
           tokenizer: object | None, repeat: int = 0, seed: int | None = None,
           translation: str | None = None) -> dict:
    counters = result.policy.counters
    n = len(result.tokens)
    out = {
        "mode": config.mode,
        "prompt_index": prompt_index,
        "repeat": repeat,
        "prompt_tokens": prompt_len,
        "tokens": result.tokens,
        "num_new_tokens": n,
        "wall_time_s": result.wall_time_s,
        "ttft_s": result.ttft_s,
        "tpot_s": (result.wall_time_s - result.ttft_s) / (n - 1) if n > 1 else 0.0,
        "acceptance_rate": counters.acceptance_rate,
        "mean_accepted_length": counters.mean_accepted_length,
        "verifications_sent": counters.verifications_sent,
        "verifications_cancelled": counters.verifications_cancelled,
        "verifications_aborted": counters.verifications_aborted,
        "accepted": counters.accepted,
        "rejected": counters.rejected,
        "forced": counters.forced,
        "target_forwards": counters.target_forwards,
        "drafts_received": counters.drafter_forwards,
        "drafts_late": counters.drafts_late,
        "lookahead": config.lookahead if config.mode != "nonsi" else 0,
        "sp": sp,
        "verify": config.verify,
        "temperature": config.sampling.temperature,
        "seed": config.sampling.seed if seed is None else seed,
        "target": config.target,
        "drafter": config.drafter if config.mode != "nonsi" else None,
        # How drafts reach the target's vocabulary: None (the drafter's is the target's), slem or
        # tli (dsi_mpi/translate.py); drafts, acceptance and counters are in target tokens.
        "translation": translation if config.mode != "nonsi" else None,
    }
    if tokenizer is not None:
        out["text"] = tokenizer.decode(result.tokens)
    return out


def run(comm: MPI.Comm, configs: Sequence[RunConfig], prompts: Sequence[Prompt | Sequence[int]] = (),
        tokenizer: object | None = None, repeats: int = 1, warmup: int = 0) -> RunOutcome:
    """Run every config (one per mode) over every prompt; collective over ``comm``.

    The configs may differ in mode, lookahead and SP only: models and sampling are loaded once.
    ``prompts`` (rank 0 only) are token lists or :class:`Prompt` with their own seeds.
    """
    base = configs[0]
    for c in configs:
        if (c.target, c.drafter, c.dtype, c.device, c.reuse_cache, c.sampling.temperature, c.sampling.top_k, c.sampling.top_p) != (
                base.target, base.drafter, base.dtype, base.device, base.reuse_cache, base.sampling.temperature,
                base.sampling.top_k, base.sampling.top_p):
            raise ValueError("configs of one run may differ in mode, lookahead, sp and seed only")
    prompts = [p if isinstance(p, Prompt) else Prompt(list(p)) for p in prompts]
    layout = make_layout(comm.Get_size(), [c.mode for c in configs], max((c.sp or 0) for c in configs) or None)
    rank = comm.Get_rank()
    eos = _share_eos_ids(comm, base)
    role = layout.role(rank)
    transport = Transport(comm, timeout_s=base.timeout_s, poll=base.poll, poll_max_s=base.poll_max_s)
    outcome = RunOutcome(role=role)
    try:
        backend: Backend | None = None
        translated = False
        if role == "target":
            backend = load_backend(base.target, base.dtype, model_device(comm, layout, base.device))
        elif role == "drafter" and any(c.uses_drafter for c in configs):
            # A self:layers=N drafter is built from the target; one with another vocabulary is
            # wrapped in a translating drafter (dsi_mpi/translate.py).
            backend = load_drafter(base.drafter or "", base.target, base.dtype,
                                   model_device(comm, layout, base.device), target_eos=eos)
        elif base.device == "cuda":
            model_device(comm, layout, base.device)  # the split is collective over the node
        if role == "coordinator" and any(c.uses_drafter for c in configs):
            # Read the tokenizers while the other ranks load their models.
            translated = vocabularies_differ(base.target, base.drafter or "")
        transport.barrier("every rank to load its model")
        if role == "coordinator":
            outcome.records = _coordinate(transport, layout, configs, prompts, tokenizer, repeats,
                                          warmup, eos, translated)
        else:
            if role == "target":
                serve_target(transport, backend, base.sampling)
            elif backend is not None:
                serve_drafter(transport, backend, base.sampling, eos)
            else:  # a drafter rank in a nonsi-only run: nothing to do but wait for shutdown
                transport.wait(source=0, tag=Tag.SHUTDOWN, what="shutdown", timeout_s=IDLE)
            transport.flush()
            transport.send(0, Bye())
    except ConfigError:
        raise  # bad input (e.g. too few GPUs) is found alike on every rank: rank 0 reports it
    except BaseException as exc:
        _report_failure(transport, rank, role, exc)
        raise
    finally:
        outcome.pending_requests = transport.close()
    return outcome


def _coordinate(transport: Transport, layout: Layout, configs: Sequence[RunConfig], prompts: Sequence[Prompt],
                tokenizer: object | None, repeats: int, warmup: int, eos: frozenset[int],
                translated: bool = False) -> list[dict]:
    coordinator = Coordinator(transport, layout, eos)
    records = []
    try:
        for config in configs:
            policy = coordinator.make_policy(config)
            sp = len(layout.active_targets(config.mode, config.sp))
            for _ in range(warmup):
                coordinator.generate(policy, prompts[0].ids, prompts[0].seed)
            for repeat in range(repeats):
                for index, prompt in enumerate(prompts):
                    result = coordinator.generate(policy, prompt.ids, prompt.seed)
                    method = method_for(config.verify) if translated else None
                    records.append(record(result, config, sp, index, len(prompt.ids), tokenizer,
                                          repeat, prompt.seed, method))
    except BaseException:
        try:  # release the workers quickly; a failed one never says BYE
            coordinator.shutdown(timeout_s=5.0)
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass
        raise
    coordinator.shutdown()
    return records


def _share_eos_ids(comm: MPI.Comm, config: RunConfig) -> frozenset[int]:
    """The target's EOS ids (generation config first, as ``generate``), read on rank 0 and given
    to every rank: generation stops on the target's EOS, and so must the drafter, whose own
    EOS ids may differ (a base target with an instruct drafter). Before any transport exists,
    so a failure here is raised on every rank alike."""
    verdict: tuple[bool, object] | None = None
    if comm.Get_rank() == 0:
        try:
            if config.emulated:
                ids: frozenset[int] = frozenset()
            else:
                from dsi_mpi.backends.hf import eos_ids, load_config

                ids = eos_ids(load_config(config.target))
            verdict = (True, sorted(ids))
        except Exception as exc:  # noqa: BLE001 - every rank must learn it
            verdict = (False, f"{type(exc).__name__}: {exc}")
    ok, value = comm.bcast(verdict, root=0)
    if not ok:
        raise RuntimeError(f"rank 0 could not read the target's end-of-sequence ids: {value}")
    return frozenset(value)


def _report_failure(transport: Transport, rank: int, role: str, exc: BaseException) -> None:
    """Tell rank 0 (best effort) and print a clear message on this rank's stderr."""
    text = f"rank {rank} ({role}) failed: {type(exc).__name__}: {exc}"
    if os.environ.get("DSI_MPI_QUIET_ERRORS") != "1":
        print(f"dsi-mpi: {text}", file=sys.stderr, flush=True)
        traceback.print_exc(file=sys.stderr)
    if rank != 0 and not transport.closed:
        try:
            transport.send_error(0, text)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
