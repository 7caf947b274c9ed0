"""Where ranks run: which GPU each model rank uses, and whether each rank has a core to spin on.

GPUs: one per model rank of a node, none for the coordinator.

A node's model ranks (every rank but rank 0) are numbered in rank order from 0 on each node
(the node: the host name, and Slurm's node name under ``srun``). Local model rank ``j``
takes the ``j``-th GPU it can see, so ``CUDA_VISIBLE_DEVICES`` is honoured as CUDA honours it:
``cuda:j`` is the ``j``-th entry of that list. Ranks that see different lists (a launcher
that binds GPUs per task, such as ``srun --gpus-per-task=1``) are numbered apart, one count
per distinct list, so each takes its own first GPU.

A node with fewer GPUs than model ranks is an error on every rank, unless sharing is asked
for with ``DSI_MPI_SHARE_GPUS=1``: then local model rank ``j`` takes GPU ``j mod count``.

The mapping is pure (:func:`visible_gpus`, :func:`gpu_for`); :func:`model_device` gathers
what it needs over MPI. ``python -m mpi4py -m dsi_mpi.devices`` under ``srun`` or ``mpiexec``
prints the binding each rank would get, without loading a model (a dry run for job scripts).

Cores: a waiting rank spins on ``Iprobe`` when every rank of its node has a core of its own
(:func:`choose_poll` on the CPU affinity masks of the node's ranks, gathered by
:func:`poll_strategy`), and sleeps between probes otherwise; see ``docs/cluster.md``.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

from dsi_mpi.config import POLL_CHOICES, ConfigError

if TYPE_CHECKING:
    from mpi4py import MPI

    from dsi_mpi.roles import Layout

SHARE_ENV = "DSI_MPI_SHARE_GPUS"


class DeviceError(ConfigError):
    """The GPUs of a node do not fit its model ranks; raised on every rank alike."""


def share_requested(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(SHARE_ENV, "").strip().lower() in ("1", "true", "yes")


def visible_gpus(cuda_visible_devices: str | None, count: int) -> tuple[str, ...]:
    """The GPUs a process sees, named as ``CUDA_VISIBLE_DEVICES`` names them (indices, UUIDs
    or MIG ids), or ``"0".."count-1"`` when it is unset. ``count`` is how many CUDA reports:
    CUDA stops reading the list at its first invalid entry, so only the first ``count`` count."""
    if cuda_visible_devices is None:
        return tuple(str(i) for i in range(count))
    names = [name.strip() for name in cuda_visible_devices.split(",")]
    return tuple(names[:count])


def gpu_for(local_index: int, node_views: Sequence[Sequence[str]], share: bool = False,
            node: str = "this node") -> str:
    """The device of model rank ``local_index`` of a node, given the GPUs each model rank of
    that node sees (``node_views``, in rank order); raises :class:`DeviceError`."""
    views = [tuple(v) for v in node_views]
    # Ranks that see the same list share out its GPUs in rank order: slot = index among them.
    slots = [views[:i].count(v) for i, v in enumerate(views)]
    view, slot = views[local_index], slots[local_index]
    if not view:
        raise DeviceError(f"{node}: model ranks see no GPU "
                          "(no device, or CUDA_VISIBLE_DEVICES empty): request GPUs for the job "
                          "(e.g. sbatch --gpus-per-node=N) or use --device cpu")
    if slot >= len(view) and not share:
        raise DeviceError(
            f"{node}: {views.count(view)} model ranks but {len(view)} GPU(s) visible to them "
            f"({','.join(view)}): launch one model rank per GPU (the coordinator, rank 0, needs "
            f"none), request more GPUs, or set {SHARE_ENV}=1 to let model ranks share GPUs")
    name = view[slot % len(view)]
    # Ranks that see different but overlapping lists must not pick the same GPU either.
    clash = [i for i, (v, s) in enumerate(zip(views, slots, strict=True))
             if v != view and s < len(v) and v[s] == name]
    if clash and not share:
        raise DeviceError(
            f"{node}: model ranks {local_index} and {clash[0]} would both use GPU {name} (their "
            f"CUDA_VISIBLE_DEVICES overlap): give each its own GPUs, or set {SHARE_ENV}=1 to share")
    return f"cuda:{slot % len(view)}"


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def node_of_this_process() -> str:
    """The node this process runs on, as far as GPUs go: its host name, and under Slurm also
    the Slurm node (several slurmds can share a host, each with its own GPUs)."""
    slurm_node = os.environ.get("SLURMD_NODENAME")
    host = socket.gethostname()
    return f"{host} (slurm node {slurm_node})" if slurm_node and slurm_node != host else host


def _bind(comm: MPI.Comm, is_model: bool, count: int | None) -> tuple[str, str]:
    """(device, node) of this rank; collective over ``comm``. ``count``: GPUs this rank
    sees (None for the coordinator, which takes none).

    Ranks are grouped by :func:`node_of_this_process`, not by a shared-memory split: an MPI
    knows which ranks share a node only as well as its launcher tells it, and the pip MPICH
    under ``srun --distribution=arbitrary`` (the multi-node job script) puts every rank on a
    node of its own, which would give every model rank GPU 0."""
    rank, node = comm.Get_rank(), node_of_this_process()
    view = (visible_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"), count or 0)
            if is_model else None)
    everyone = comm.allgather((node, view))
    device, error = "cpu", None
    if is_model:
        mine = [r for r, (n, v) in enumerate(everyone) if n == node and v is not None]
        try:
            device = gpu_for(mine.index(rank), [everyone[r][1] for r in mine],
                             share_requested(), node)
        except DeviceError as exc:
            error = str(exc)
    # Every rank learns every error, so that all fail alike instead of some waiting forever.
    errors = list(dict.fromkeys(e for e in comm.allgather(error) if e is not None))
    if errors:
        raise DeviceError("; ".join(errors))
    return device, node


def cores_of_this_process() -> frozenset[int]:
    """The logical CPUs this process may run on: its affinity mask, which ``taskset``, cgroups
    and launcher binding (``srun --cpu-bind``, ``mpiexec -bind-to``) all narrow."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no masks, assume every core
        return frozenset(range(os.cpu_count() or 1))


def each_has_own_core(masks: Sequence[Collection[int]]) -> bool:
    """Whether every rank can have a core of its own, given the cores each rank may use:
    a matching of ranks to distinct cores within their masks (augmenting paths)."""
    owner: dict[int, int] = {}  # core -> rank holding it

    def place(rank: int, seen: set[int]) -> bool:
        for core in masks[rank]:
            if core not in seen:
                seen.add(core)
                if core not in owner or place(owner[core], seen):
                    owner[core] = rank
                    return True
        return False

    if not masks:
        return True
    if len({frozenset(m) for m in masks}) == 1:  # the usual case: unbound, or one shared mask
        return len(masks) <= len(masks[0])
    return all(place(rank, set()) for rank in range(len(masks)))


def choose_poll(requested: str, node_masks: Sequence[Collection[int]]) -> str:
    """``spin`` or ``backoff`` for the ranks of one node, given the CPU masks of its ranks.

    ``auto`` spins only when every rank of the node has a core of its own; with more ranks than
    cores a spinning rank would take the core that the rank it waits for needs."""
    if requested not in POLL_CHOICES:
        raise ValueError(f"poll must be one of {', '.join(POLL_CHOICES)}, got {requested!r}")
    if requested != "auto":
        return requested
    return "spin" if each_has_own_core(node_masks) else "backoff"


def poll_strategy(comm: MPI.Comm, requested: str) -> str:
    """:func:`choose_poll` for this rank's node; collective over ``comm`` (every rank calls it).
    Ranks are grouped by :func:`node_of_this_process`, as for GPUs (see :func:`_bind`)."""
    if requested != "auto":
        return choose_poll(requested, [])
    node = node_of_this_process()
    everyone = comm.allgather((node, sorted(cores_of_this_process())))
    return choose_poll(requested, [mask for n, mask in everyone if n == node])


def model_device(comm: MPI.Comm, layout: Layout, device: str) -> str:
    """The device this rank loads its model on; collective over ``comm`` when ``device`` is
    ``cuda`` (every rank, the coordinator included, must call it then).

    ``cuda`` becomes ``cuda:j`` by the rules of this module; ``cpu`` and an explicit
    ``cuda:N`` are returned as they are. The coordinator gets ``cpu``.
    """
    if device != "cuda":
        return device
    is_model = layout.role(comm.Get_rank()) != "coordinator"
    return _bind(comm, is_model, _cuda_count() if is_model else None)[0]


def binding_report(comm: MPI.Comm) -> list[str] | None:
    """A dry run of :func:`model_device`: one line per rank (on rank 0; None elsewhere) saying
    where it runs and which device it would take. Collective. Without CUDA (a login or CPU
    node) each rank assumes the GPUs ``CUDA_VISIBLE_DEVICES`` names exist."""
    import torch

    from dsi_mpi.roles import make_layout

    rank, size = comm.Get_rank(), comm.Get_size()
    # who is who as a run on these ranks would have it (a drafter from 3 ranks on)
    role = make_layout(size, ["dsi"] if size > 2 else ["nonsi"]).role(rank) if size > 1 else (
        "coordinator")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if torch.cuda.is_available():
        count, source = torch.cuda.device_count(), "cuda"
    else:
        count, source = len(visible.split(",")) if visible else 0, "assumed"
    try:
        device, node = _bind(comm, role != "coordinator", count if role != "coordinator" else None)
        shown = visible if visible is not None else "unset"
        line = (f"rank {rank} {role} on {node}: CUDA_VISIBLE_DEVICES={shown} "
                f"({source}: {count}) -> {device}")
        error = None
    except DeviceError as exc:
        line, error = f"rank {rank} {role}: error", str(exc)
    lines = comm.gather(line, root=0)
    if error is not None:
        raise DeviceError(error)
    return lines


def main() -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    try:
        lines = binding_report(comm)
    except DeviceError as exc:
        if comm.Get_rank() == 0:
            print(f"dsi-mpi: device binding: error: {exc}", file=sys.stderr, flush=True)
        return 2
    if comm.Get_rank() == 0:
        for line in lines or []:
            print(f"dsi-mpi: device binding: {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
