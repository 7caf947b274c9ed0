"""One run over MPI: every rank calls :func:`run` with the same configs; rank 0 gets records.

Rank 0 coordinates, drafter and target ranks load their model once and serve every mode
and prompt in turn, so DSI, SI and non-SI are measured on the same ranks and the same
caches. Rank 0 starts the first prompt once every worker has said Ready (with a deadline),
so no prompt's time includes another rank's model load; it hands each record to a sink as
its prompt finishes (``results.py`` streams them to the output file).

Every way a run can end early (a signal on any rank, a failure, a worker or the coordinator
hung or gone) goes through :func:`_end_early`: the ranks that can still hear are told, within
``END_GRACE_S``, and the exception carries an ``exits.Ending`` for the command line's one exit
path (``docs/reliability.md``).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from mpi4py import MPI

from dsi_mpi import results
from dsi_mpi import trace as tracing
from dsi_mpi.backends import Backend, EngineOptions, load_backend
from dsi_mpi.config import ConfigError, RunConfig
from dsi_mpi.coordinator import Coordinator, PromptResult, Unresponsive
from dsi_mpi.devices import model_device
from dsi_mpi.drafter import serve_drafter
from dsi_mpi.exits import EXIT_FAILED, Ending, Stopped, attach, interruptible, signal_exit_code
from dsi_mpi.metrics import target_work
from dsi_mpi.preflight import Prompt
from dsi_mpi.progress import Progress
from dsi_mpi.protocol import Bye, Error, Ready, Shutdown, Signalled
from dsi_mpi.results import Key
from dsi_mpi.roles import Layout, make_layout
from dsi_mpi.servergroup import ServerGroup, split
from dsi_mpi.target import serve_target
from dsi_mpi.translate import load_drafter, method_for, vocabularies_differ
from dsi_mpi.transport import IDLE, CoordinatorLost, RemoteError, Transport, WaitTimeout
from dsi_mpi.worker import TargetWorker

HEARTBEAT_S = 1.0  # ranks tell their peers they are alive this often (at most --timeout / 4)
END_GRACE_S = 1.5  # how long the ranks of a run that ends early wait for each other
# A worker gives rank 0 this much longer than --timeout before it declares it lost: when a
# worker hangs, rank 0 names it first (its sends to everyone may stall behind the hung rank's
# full queue, so the others stop hearing it too). Rank 1 notices first, the others a little
# later, so that one rank, not all, says so before the job is aborted.
LOST_AFTER_S = (1.5, 2.0)  # rank 1, other workers


@dataclass
class RunOutcome:
    records: list[dict] = field(default_factory=list)  # rank 0 only
    pending_requests: int = 0  # MPI requests left open at shutdown on this rank
    role: str = ""


def record(result: PromptResult, config: RunConfig, sp: int, prompt_index: int, prompt_len: int,
           tokenizer: Any, repeat: int = 0, seed: int | None = None,
           translation: str | None = None) -> dict:
    counters = result.policy.counters
    n = len(result.tokens)
    out = {
        "mode": config.mode,
        "prompt_index": prompt_index,
        "repeat": repeat,
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
        "drafts_received": counters.drafts_received,
        "drafts_late": counters.drafts_late,
        # which run wrote it: models, engine, lookahead, sp, sampling, prompt length (what
        # --resume matches on)
        **results.identity(config, sp, prompt_len, seed),
        "graph_segments": config.graph_segments if config.engine_name == "cudagraph" else None,
        # acceptance by position in a block (vLLM's definition; docs/records.md)
        "blocks_verified": counters.blocks_verified,
        "blocks_per_position": counters.blocks_per_position,
        "accepted_per_position": _padded(counters.accepted_per_position,
                                         len(counters.blocks_per_position), 0),
        "acceptance_per_position": counters.acceptance_per_position,
        # the target servers' forward time: by outcome, wasted, and each server's busy fraction
        **target_work(result.forwards, result.policy.task_outcomes(), result.policy.servers,
                      result.wall_time_s),
        # How drafts reach the target's vocabulary: None (the drafter's is the target's), slem or
        # tli (dsi_mpi/translate.py); drafts, acceptance and counters are in target tokens.
        "translation": translation if config.mode != "nonsi" else None,
    }
    if tokenizer is not None:
        out["text"] = tokenizer.decode(result.tokens)
    return out


def _padded(values: list, length: int, fill: float) -> list:
    return values + [fill] * (length - len(values))


@dataclass
class Rank0:
    """What only rank 0, the coordinator, needs for a run: the prompts and what becomes of
    each record. The other ranks serve whatever it sends until it says Shutdown."""

    prompts: Sequence[Prompt | Sequence[int]] = ()  # token lists, or Prompt with its own seed
    tokenizer: Any = None  # a transformers tokenizer decodes each record's "text" (None: none)
    repeats: int = 1  # runs of every prompt per mode
    warmup: int = 0  # untimed runs of the first prompt per mode
    sink: Callable[[dict], None] | None = None  # takes each record (None: RunOutcome.records)
    done: Collection[Key] = ()  # (mode, prompt index, repeat) already written (--resume)
    progress: Progress | None = None  # told of every record as it is made

    @property
    def longest_prompt(self) -> int:
        return max((len(p.ids if isinstance(p, Prompt) else p) for p in self.prompts), default=0)


def run(comm: MPI.Comm, configs: Sequence[RunConfig], rank0: Rank0 | None = None,
        trace: str | None = None) -> RunOutcome:
    """Run every config (one per mode) over every prompt; collective over ``comm``.

    The configs may differ in mode, lookahead, SP and seed only (:meth:`RunConfig.loads_as`):
    models and sampling are loaded once. ``rank0``: what rank 0 runs and does with the records
    (ignored on the other ranks). ``trace`` (the same on every rank): write a trace of every
    rank to this file (rank 0).

    A run that ends early re-raises, on every rank, the exception that ended it there, with an
    :class:`~dsi_mpi.exits.Ending` attached (``exits.ending_of``): the other ranks were told
    first (or found hung or gone), so the caller only has to print and exit, or abort.
    """
    base = configs[0]
    if not all(c.loads_as(base) for c in configs):
        raise ValueError("configs of one run may differ in mode, lookahead, sp and seed only")
    max_sp = max((c.sp or 0) for c in configs) or None
    layout = make_layout(comm.Get_size(), [c.mode for c in configs], max_sp,
                         target_ranks=base.target_ranks)
    # Every collective from here runs on the transport's duplicate of ``comm``.
    transport = Transport(comm, timeout_s=base.timeout_s, poll=base.poll,
                          poll_max_s=base.poll_max_s)
    rank = transport.rank
    role = layout.role(rank)
    try:
        eos = _share_eos_ids(transport.comm, base)
        # The engines' static caches are sized for the longest prompt, which rank 0 alone knows.
        longest = transport.comm.bcast((rank0 or Rank0()).longest_prompt if rank == 0 else None,
                                       root=0)
        # collective: the ranks of a server of several ranks get a communicator of their own
        server_comm = split(transport.comm, layout)
    except BaseException:  # raised alike on every rank, before the run: nothing to end
        transport.close()
        raise
    outcome = RunOutcome(role=role)
    coordinator = Coordinator(transport, layout, eos) if role == "coordinator" else None
    try:
        if coordinator is not None:
            if base.device == "cuda":  # the split is collective over the node
                model_device(transport.comm, layout, base.device)
            recorder = _coordinate(coordinator, configs, rank0 or Rank0(), outcome.records.append,
                                   trace)
        else:
            group = (ServerGroup(server_comm, layout, rank, base.timeout_s)
                     if server_comm is not None else None)
            recorder = _serve(transport, layout, configs, eos, trace is not None,
                              _engine_options(configs, layout, longest), group)
        if trace:  # every rank has finished (rank 0 has every Bye): gather the events
            parts = tracing.gather(recorder, transport)
            if parts is not None:
                tracing.write(trace, parts, {"configs": [_describe(c) for c in configs]})
    except ConfigError:
        raise  # bad input (e.g. too few GPUs) is found alike on every rank: rank 0 reports it
    except BaseException as exc:
        raise attach(exc, _end_early(transport, coordinator, rank, layout.describe(rank),
                                     exc)) from None
    finally:
        outcome.pending_requests = transport.close()
    return outcome


def _describe(config: RunConfig) -> dict:
    return {"mode": config.mode, "lookahead": config.lookahead, "sp": config.sp,
            "target": config.target, "drafter": config.drafter,
            "max_new_tokens": config.max_new_tokens}


def _engine_options(configs: Sequence[RunConfig], layout: Layout,
                    longest: int) -> EngineOptions:
    """The engines' sizing for every config of the run: the longest sequence any makes."""
    ahead = max((c.run_ahead(len(layout.active_targets(c.mode, c.sp))) for c in configs
                 if c.uses_drafter), default=0)
    lookahead = max(c.lookahead for c in configs)
    capacity = longest + max(c.max_new_tokens for c in configs) + ahead + lookahead + 1
    return EngineOptions(configs[0].engine, capacity, lookahead + 1, configs[0].graph_segments)


def _serve(transport: Transport, layout: Layout, configs: Sequence[RunConfig],
           eos: frozenset[int], trace: bool = False,
           engine: EngineOptions | str = "auto",
           group: ServerGroup | None = None) -> tracing.Recorder:
    """A worker: load the model (its forwards run as ``engine`` says), say Ready, serve until
    Shutdown, say Bye; returns what it recorded (``trace``: with rank 0's clock aligned once
    every rank is ready). ``group``: the server of several ranks this target rank belongs to
    (its leader or a follower)."""
    base = configs[0]
    comm, role = transport.comm, layout.role(transport.rank)
    backend: Backend | None = None
    with interruptible():  # a signal while loading stops at once: nothing to keep yet
        if role in ("target", "follower"):
            device = model_device(comm, layout, base.device)
            if group is not None:
                group.start_torch(device)
            backend = load_backend(base.target, base.dtype, device, engine=engine,
                                   tp_size=layout.target_ranks)
            if group is not None:
                group.loaded(backend)
        elif any(c.uses_drafter for c in configs):
            # A self:layers=N drafter is built from the target; one with another vocabulary is
            # wrapped in a translating drafter (dsi_mpi/translate.py).
            backend = load_drafter(base.drafter or "", base.target, base.dtype,
                                   model_device(comm, layout, base.device), target_eos=eos,
                                   engine=engine)
        elif base.device == "cuda":
            model_device(comm, layout, base.device)  # the split is collective over the node
    transport.send(0, Ready())
    recorder = tracing.start(transport, transport.rank, role) if trace else tracing.NO_TRACE
    # While the run is active, each side hears from the other at least every heartbeat.
    transport.pulse.start([0], _heartbeat_s(base.timeout_s))
    transport.pulse.watch(0, base.timeout_s + LOST_AFTER_S[transport.rank != 1])
    if role == "target":
        assert backend is not None  # loaded above
        serve_target(transport, backend, base.sampling, recorder, group)
    elif role == "follower":
        assert backend is not None and group is not None
        group.serve(transport, TargetWorker(backend, base.sampling), recorder)
    elif backend is not None:
        serve_drafter(transport, backend, base.sampling, eos, recorder)
    else:  # a drafter rank in a nonsi-only run: nothing to do but wait for shutdown
        while not isinstance(transport.wait(source=0, what="shutdown", timeout_s=IDLE).message,
                             Shutdown):
            pass
    transport.pulse.unwatch()
    transport.pulse.stop()  # nothing may follow the Bye
    transport.flush()
    transport.send(0, Bye())
    if group is not None:
        group.close()
    return recorder


def _heartbeat_s(timeout_s: float) -> float:
    return min(HEARTBEAT_S, timeout_s / 4)


def _coordinate(coordinator: Coordinator, configs: Sequence[RunConfig], work: Rank0,
                records: Callable[[dict], None], trace: str | None = None) -> tracing.Recorder:
    layout, transport = coordinator.layout, coordinator.transport
    prompts = [p if isinstance(p, Prompt) else Prompt(list(p)) for p in work.prompts]
    sink = work.sink or records
    done = frozenset(work.done)
    # Read the tokenizers while the workers load their models.
    base = configs[0]
    translated = (any(c.uses_drafter for c in configs)
                  and vocabularies_differ(base.target, base.drafter or ""))
    transport.pulse.start(coordinator.workers, _heartbeat_s(transport.timeout_s))
    coordinator.wait_ready()
    if trace:  # every worker is ready and aligning its clock with rank 0's
        coordinator.trace = tracing.start(transport, 0, "coordinator")
    for config in configs:
        todo = [(repeat, index, prompt) for repeat in range(work.repeats)
                for index, prompt in enumerate(prompts) if (config.mode, index, repeat) not in done]
        if not todo:
            continue  # a resumed run: this mode is complete, warm-up included
        policy = coordinator.make_policy(config)
        sp = len(layout.active_targets(config.mode, config.sp))
        lookahead = config.lookahead if config.mode != "nonsi" else 0
        labels = {"mode": config.mode, "lookahead": lookahead, "sp": sp}
        for w in range(work.warmup):
            result = coordinator.generate(policy, prompts[0].ids, prompts[0].seed)
            coordinator.trace.generation(result, **labels, prompt=0, repeat=w, warmup=True)
        for repeat, index, prompt in todo:
            result = coordinator.generate(policy, prompt.ids, prompt.seed)
            coordinator.trace.generation(result, **labels, prompt=index, repeat=repeat,
                                         warmup=False)
            method = method_for(config.verify) if translated else None
            out = record(result, config, sp, index, len(prompt.ids), work.tokenizer, repeat,
                         prompt.seed, method)
            sink(out)
            if work.progress is not None:
                work.progress.done(out)
    coordinator.shutdown()
    return coordinator.trace


def _end_early(transport: Transport, coordinator: Coordinator | None, rank: int, role: str,
               exc: BaseException) -> Ending:
    """Tell the other ranks that the run ends (rank 0: Shutdown to every worker; a worker: its
    failure or signal to rank 0, then wait for rank 0's Shutdown), bounded by END_GRACE_S; then
    how it ended. Never raises: this is the way out."""
    if isinstance(exc, KeyboardInterrupt):  # no handler installed (library use): as SIGINT
        exc = Stopped(signal.SIGINT)
    if coordinator is not None:
        code, reason = EXIT_FAILED, f"rank 0 (coordinator) failed: {type(exc).__name__}: {exc}"
        if isinstance(exc, Stopped):
            code, reason = signal_exit_code(exc.signum), str(exc)
        elif isinstance(exc, (RemoteError, Unresponsive, WaitTimeout)):
            reason = str(exc)  # names the rank (a RemoteError is the worker's own message)
        else:
            _print_traceback(exc, rank, role)  # a bug: its traceback helps
        if isinstance(exc, Unresponsive):
            # A rank is hung or gone: only an abort ends it, and rank 0's sends to the others
            # may be stuck behind it, so it does not wait for them (they would soon declare
            # rank 0 lost and blame it).
            transport.close(timeout_s=0.0)
            return Ending(code, reason, everyone=False)
        try:
            missing = coordinator.end(END_GRACE_S)
        except BaseException as error:  # the job is aborted instead
            missing = [-1]
            reason += f" (ending it failed too: {type(error).__name__}: {error})"
        pending = transport.close(timeout_s=0.2 if missing else END_GRACE_S)
        return Ending(code, reason, everyone=not missing and not pending)
    if isinstance(exc, CoordinatorLost):
        transport.close(timeout_s=0.0)
        return Ending(EXIT_FAILED, f"rank {rank} ({role}): {exc}", everyone=False)
    if isinstance(exc, Stopped):
        code, reason = signal_exit_code(exc.signum), f"{exc} on rank {rank} ({role})"
        report: Signalled | Error = Signalled(exc.signum)
    else:
        _print_traceback(exc, rank, role)
        code, reason = EXIT_FAILED, f"rank {rank} ({role}) failed: {type(exc).__name__}: {exc}"
        report = Error(reason)
    answered = False
    try:
        transport.pulse.unwatch()
        transport.pulse.stop()
        transport.send(0, report)
        deadline = time.monotonic() + END_GRACE_S
        while not answered and (left := deadline - time.monotonic()) > 0:
            reply = transport.wait(source=0, what="Shutdown", timeout_s=left)
            answered = isinstance(reply.message, Shutdown)
        transport.send(0, Bye())
    except BaseException:  # rank 0 did not answer: the job is aborted
        answered = False
    pending = transport.close(timeout_s=END_GRACE_S if answered else 0.0)
    if not answered:
        reason += "; the coordinator (rank 0) did not answer"
    return Ending(code, reason, everyone=answered and not pending)


def _share_eos_ids(comm: MPI.Comm, config: RunConfig) -> frozenset[int]:
    """The target's EOS ids (generation config first, as ``generate``), read on rank 0 and given
    to every rank: generation stops on the target's EOS, and so must the drafter, whose own
    EOS ids may differ (a base target with an instruct drafter). Before the run starts, so a
    failure here is raised on every rank alike."""
    verdict: tuple[bool, object] | None = None
    if comm.Get_rank() == 0:
        try:
            if config.emulated:
                ids: frozenset[int] = frozenset()
            else:
                from dsi_mpi.backends.hf import eos_ids, load_config

                ids = eos_ids(load_config(config.target))
            verdict = (True, sorted(ids))
        except Exception as exc:  # every rank must learn it
            verdict = (False, f"{type(exc).__name__}: {exc}")
    ok, value = comm.bcast(verdict, root=0)
    if not ok:
        raise RuntimeError(f"rank 0 could not read the target's end-of-sequence ids: {value}")
    return frozenset(value)


def _print_traceback(exc: BaseException, rank: int, role: str) -> None:
    """The failing rank's traceback, on its own stderr (``DSI_MPI_QUIET_ERRORS=1``: none); the
    one-line reason is printed by the exit path."""
    if os.environ.get("DSI_MPI_QUIET_ERRORS") != "1":
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
        text = "".join(lines).rstrip()
        print(f"dsi-mpi: rank {rank} ({role}): traceback of its failure:\n{text}", file=sys.stderr,
              flush=True)
