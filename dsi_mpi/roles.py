"""Which rank does what: rank 0 coordinates, then drafter ranks, then target servers.

A target server is ``target_ranks`` consecutive ranks (tensor parallelism, ``servergroup.py``):
its first rank, the leader, is the server everyone else sees (the policy's server id, the
coordinator's peer); the others are its followers, which run the same forwards on their
shards and talk only to their leader (and to rank 0 for liveness and shutdown).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dsi_mpi.config import ConfigError

MIN_RANKS = {"nonsi": 2, "si": 3, "dsi": 3}


@dataclass(frozen=True)
class Layout:
    world_size: int
    drafters: tuple[int, ...]  # ranks of drafter servers
    targets: tuple[int, ...]  # target servers: the rank of each one's leader
    target_ranks: int = 1  # ranks per target server

    def role(self, rank: int) -> str:
        """coordinator, drafter, target (a server, or its leader) or follower."""
        if rank == 0:
            return "coordinator"
        if rank in self.drafters:
            return "drafter"
        return "target" if rank in self.targets else "follower"

    def describe(self, rank: int) -> str:
        """The role as messages name it: a follower says which server it belongs to."""
        role = self.role(rank)
        if role == "follower":
            return f"follower of target server {self.server_of(rank)}"
        return role

    def group(self, leader: int) -> tuple[int, ...]:
        """Every rank of the server led by ``leader``, the leader first."""
        return tuple(range(leader, leader + self.target_ranks))

    def server_of(self, rank: int) -> int | None:
        """The leader of the server ``rank`` belongs to (None: a coordinator or drafter)."""
        for leader in self.targets:
            if leader <= rank < leader + self.target_ranks:
                return leader
        return None

    @property
    def followers(self) -> tuple[int, ...]:
        return tuple(r for leader in self.targets for r in self.group(leader)[1:])

    def active_targets(self, mode: str, sp: int | None) -> tuple[int, ...]:
        """Target servers a mode uses: one for si and nonsi, ``sp`` (default all) for dsi."""
        if mode != "dsi":
            return self.targets[:1]
        return self.targets[: sp or len(self.targets)]


def make_layout(world_size: int, modes: Sequence[str], sp: int | None = None,
                num_drafters: int = 1, target_ranks: int = 1) -> Layout:
    """The layout for ``world_size`` ranks, or a ConfigError saying how many are needed.

    With ``target_ranks`` N, the ranks after the coordinator and drafter must make whole
    servers of N: ``world_size = 1 + drafters + servers x N``."""
    if target_ranks < 1:
        raise ConfigError(f"--target-ranks must be >= 1, got {target_ranks}")
    n = target_ranks
    need = max(MIN_RANKS[m] + n - 1 for m in modes)  # one server of n ranks
    if "dsi" in modes and sp is not None:
        need = max(need, 1 + num_drafters + sp * n)
    if world_size < need:
        per = f" x {n} ranks each" if n > 1 else ""
        detail = (f" (--sp {sp} needs 1 coordinator + {num_drafters} drafter + {sp} targets{per})"
                  if sp else "")
        launch = "" if n > 1 else " (nonsi 2, si 3, dsi 3 or more)"
        raise ConfigError(
            f"--mode {','.join(modes)} needs at least {need} MPI ranks, got {world_size}{detail}: "
            f"launch with mpiexec -n {need}{launch}"
        )
    no_drafter = set(modes) == {"nonsi"} and world_size == 1 + n  # coordinator and one server
    drafters = () if no_drafter else tuple(range(1, 1 + num_drafters))
    first = 1 + len(drafters)
    if (world_size - first) % n:
        lower = first + (world_size - first) // n * n
        counts = [c for c in (lower, lower + n) if c >= need]
        raise ConfigError(
            f"--target-ranks {n}: the {world_size - first} ranks after the coordinator and "
            f"{len(drafters)} drafter do not make whole servers of {n} ranks: launch "
            f"1 + {len(drafters)} + servers x {n} ranks "
            f"(mpiexec -n {' or -n '.join(map(str, counts))})"
        )
    return Layout(world_size, drafters=drafters, targets=tuple(range(first, world_size, n)),
                  target_ranks=n)
