"""Counters of one generation, kept in pure code so every driver (reference decoders, MPI
runtime, simulator) reports the same quantities the same way."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Counters:
    """Every committed position is exactly one of: an accepted draft, a rejected draft replaced
    by the target's correction, or a target token committed where no draft was verified
    (non-SI steps, SI bonus tokens, positions the drafter had not reached)."""

    accepted: int = 0  # drafts equal to the target's token (or accepted by rejection sampling)
    rejected: int = 0  # drafts replaced by the target's token
    forced: int = 0  # target tokens committed with no draft to verify
    target_forwards: int = 0  # verification forwards that ran to completion
    drafter_forwards: int = 0
    drafts_late: int = 0  # drafts that arrived for a position already committed without them
    verifications_sent: int = 0  # tasks sent to target servers (runtime and simulator)
    verifications_cancelled: int = 0  # tasks preempted by a cancel message
    verifications_aborted: int = 0  # of those, forwards the server actually abandoned

    def observe_block(self, drafted: int, accepted: int, committed: int) -> None:
        """One SI verification of ``drafted`` drafts, ``accepted`` of them accepted, of which
        the first ``committed`` tokens were kept (fewer when EOS or the token limit cut the
        block): the accepted drafts, then a correction or bonus token."""
        kept = min(accepted, committed)
        self.accepted += kept
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

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = asdict(self)
        out["acceptance_rate"] = self.acceptance_rate
        out["mean_accepted_length"] = self.mean_accepted_length
        return out
