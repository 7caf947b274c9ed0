"""Which rank does what: rank 0 coordinates, then drafter ranks, then target servers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dsi_mpi.config import ConfigError

MIN_RANKS = {"nonsi": 2, "si": 3, "dsi": 3}


@dataclass(frozen=True)
class Layout:
    world_size: int
    drafters: tuple[int, ...]  # ranks of drafter servers
    targets: tuple[int, ...]  # ranks of target servers

    def role(self, rank: int) -> str:
        if rank == 0:
            return "coordinator"
        if rank in self.drafters:
            return "drafter"
        return "target"

    def active_targets(self, mode: str, sp: int | None) -> tuple[int, ...]:
        """Target ranks a mode uses: one for si and nonsi, ``sp`` (default all) for dsi."""
        if mode != "dsi":
            return self.targets[:1]
        return self.targets[: sp or len(self.targets)]


def make_layout(world_size: int, modes: Sequence[str], sp: int | None = None,
                num_drafters: int = 1) -> Layout:
    """The layout for ``world_size`` ranks, or a ConfigError saying how many are needed."""
    need = max(MIN_RANKS[m] for m in modes)
    if "dsi" in modes and sp is not None:
        need = max(need, 1 + num_drafters + sp)
    if world_size < need:
        detail = (f" (--sp {sp} needs 1 coordinator + {num_drafters} drafter + {sp} targets)"
                  if sp else "")
        raise ConfigError(
            f"--mode {','.join(modes)} needs at least {need} MPI ranks, got {world_size}{detail}: "
            f"launch with mpiexec -n {need} (nonsi 2, si 3, dsi 3 or more)"
        )
    if world_size == 2:  # nonsi alone: coordinator and one target, no drafter
        return Layout(world_size, drafters=(), targets=(1,))
    drafters = tuple(range(1, 1 + num_drafters))
    return Layout(world_size, drafters=drafters, targets=tuple(range(1 + num_drafters, world_size)))
