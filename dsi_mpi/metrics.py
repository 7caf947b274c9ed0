"""Counters of one generation, kept in pure code so every driver (reference decoders, MPI
runtime, simulator) reports the same quantities the same way; and what the target servers'
forward times say about a generation (:func:`target_work`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# What became of a target forward (a verification task), as the coordinator knows at the end:
TARGET_OUTCOMES = (
    "accepted",  # its tokens were committed and none of its drafts was rejected
    "rejected",  # its tokens were committed up to a rejected draft, replaced by its token there
    "unused",  # finished, none of its tokens was needed (another task had given them, or the
    #            output was complete), but it was built on committed text only: its cache is kept
    "stale",  # finished, but built on a rejected draft (or its result came too late): wasted
    "cancelled",  # abandoned part-way by a CANCEL: wasted
)
WASTED = ("stale", "cancelled")


@dataclass
class Counters:
    """Every committed position is exactly one of: an accepted draft, a rejected draft replaced
    by the target's correction, or a target token committed where no draft was verified
    (non-SI steps, SI bonus tokens, positions the drafter had not reached)."""

    accepted: int = 0  # drafts equal to the target's token (or accepted by rejection sampling)
    rejected: int = 0  # drafts replaced by the target's token
    forced: int = 0  # target tokens committed with no draft to verify
    target_forwards: int = 0  # verification forwards that ran to completion
    drafts_received: int = 0  # drafts the coordinator received (every epoch; stale ones too)
    drafts_late: int = 0  # drafts that arrived for a position already committed without them
    verifications_sent: int = 0  # tasks sent to target servers (runtime and simulator)
    verifications_cancelled: int = 0  # tasks preempted by a cancel message
    verifications_aborted: int = 0  # of those, forwards the server actually abandoned
    # Acceptance per position in a block (vLLM's definition): a block is the drafts that one
    # verification task fed to the target. accepted_per_position[i] counts the blocks whose drafts
    # 0..i were all accepted, blocks_per_position[i] the blocks verified that held a draft i.
    blocks_verified: int = 0  # blocks whose first draft was verified
    accepted_per_position: list[int] = field(default_factory=list)
    blocks_per_position: list[int] = field(default_factory=list)

    def observe_draft(self, index: int, accepted: bool, block_drafts: int) -> None:
        """Draft ``index`` (from 0) of a block of ``block_drafts`` drafts was verified, drafts
        0..index-1 having been accepted."""
        if index == 0:
            self.blocks_verified += 1
            _add(self.blocks_per_position, block_drafts)
        if accepted:
            _add(self.accepted_per_position, index + 1, start=index)

    @property
    def acceptance_per_position(self) -> list[float]:
        """vLLM's per-position acceptance rate: of the blocks verified that held a draft ``i``,
        the share whose draft ``i`` was accepted (and so every draft before it). Not conditional
        on the drafts before: entry i is the chance that a block commits at least i + 1 drafts.
        With blocks of one size (vLLM's, SI's) the denominators are all the number of blocks; DSI
        also sends shorter blocks (a task with the drafts there are when a position has no
        verifier), which count only where they held a draft."""
        accepted = self.accepted_per_position + [0] * len(self.blocks_per_position)
        return [a / b for a, b in zip(accepted, self.blocks_per_position, strict=False)]

    def observe_block(self, drafted: int, accepted: int, committed: int) -> None:
        """One SI verification of ``drafted`` drafts, ``accepted`` of them accepted, of which
        the first ``committed`` tokens were kept (fewer when EOS or the token limit cut the
        block): the accepted drafts, then a correction or bonus token."""
        kept = min(accepted, committed)
        self.accepted += kept
        for index in range(kept):
            self.observe_draft(index, True, drafted)
        if committed > kept and accepted < drafted:
            self.observe_draft(kept, False, drafted)
        if committed > kept:
            if accepted < drafted:
                self.rejected += 1
            else:
                self.forced += 1

    @property
    def verified(self) -> int:
        """Draft positions verified: accepted + rejected."""
        return self.accepted + self.rejected

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.verified if self.verified else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per verification round, a round ending at each correction or
        target-only token (SI's 'tokens per iteration'; 1.0 for non-SI)."""
        rounds = self.rejected + self.forced
        return (self.accepted + rounds) / rounds if rounds else 0.0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = asdict(self)
        out["acceptance_rate"] = self.acceptance_rate
        out["mean_accepted_length"] = self.mean_accepted_length
        out["acceptance_per_position"] = self.acceptance_per_position
        return out


def _add(counts: list[int], end: int, start: int = 0) -> None:
    """Add one to ``counts[start:end]``, growing the list as needed."""
    counts.extend([0] * (end - len(counts)))
    for i in range(start, end):
        counts[i] += 1


def target_work(forwards: Mapping[int, tuple[int, float]], outcomes: Mapping[int, str],
                servers: Sequence[int], wall_time_s: float) -> dict[str, Any]:
    """What the target servers spent on one generation, from each task's forward time.

    ``forwards``: task id -> (server, seconds its forward ran), as the replies said;
    ``outcomes``: task id -> one of :data:`TARGET_OUTCOMES`. The busy fraction of a server is
    its forward time over the wall time, at most 1 (the replies to cancelled tasks, drained
    after the last token, may end a little after it)."""
    by_outcome = dict.fromkeys(TARGET_OUTCOMES, 0.0)
    busy = dict.fromkeys(servers, 0.0)
    for task_id, (server, seconds) in forwards.items():
        by_outcome[outcomes.get(task_id, "stale")] += seconds
        busy[server] = busy.get(server, 0.0) + seconds
    return {
        "target_time_s": sum(by_outcome.values()),
        "target_time_by_outcome_s": by_outcome,
        "wasted_target_time_s": sum(by_outcome[o] for o in WASTED),
        "target_ranks": list(servers),
        "target_busy_fraction": [min(1.0, busy[s] / wall_time_s) if wall_time_s > 0 else 0.0
                                 for s in servers],
    }
