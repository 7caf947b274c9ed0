"""What each mode decides (pure): how far the drafter runs ahead, who prefills, when a task goes
out. Everything else is common to the three modes and lives in :mod:`dsi_mpi.policy`.

The rules read a :class:`Coverage`, a small public view of one prompt's progress, never the
prompt's own state (docs/design.md, "The coordinator's policy").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class Coverage(NamedTuple):
    """How far one prompt is committed, drafted and covered by verification tasks."""

    committed: int  # committed length: position ``committed`` is the next to commit
    drafted: int  # committed tokens plus the drafts received
    covered_end: int  # highest position some live task covers
    limit: int  # the drafter may draft positions < limit
    drafter_stopped: bool  # the drafter proposes nothing more in this epoch unless told


class Rules:
    """What a mode decides; everything else is common to the three modes."""

    name = ""
    uses_drafter = True
    one_server = False  # SI and non-SI verify on exactly one server
    widen_queued = False  # the task that gets a free server covers everything queued

    def run_ahead(self, lookahead: int, sp: int) -> int:
        """Drafts the drafter may hold beyond the committed prefix."""
        raise NotImplementedError

    def prefill(self, servers: Sequence[int]) -> Sequence[int]:
        """Servers that prefill the prompt (a zero-draft task each) when it begins."""
        raise NotImplementedError

    def next_task_length(self, view: Coverage, lookahead: int, outstanding: bool,
                         min_drafts: int = 1) -> int | None:
        """Context length of the next task to create, or None. ``min_drafts``: a task carries
        no drafts or at least this many (where a forward of two tokens costs much more than
        one, a few drafts do not pay for it)."""
        raise NotImplementedError


class DSIRules(Rules):
    name = "dsi"
    widen_queued = True  # tasks queue only when every server is busy (fewer than Eq. 1 asks)

    def run_ahead(self, lookahead: int, sp: int) -> int:
        return lookahead * (sp + 1)  # fill every server and queue one more block

    def prefill(self, servers: Sequence[int]) -> Sequence[int]:
        # Every server at once: TTFT is paid once, in parallel, and the first result gives
        # the first token.
        return servers

    def next_task_length(self, view: Coverage, lookahead: int, outstanding: bool,
                         min_drafts: int = 1) -> int | None:
        avail, covered = view.drafted, view.covered_end
        if view.committed > covered:
            # The next position has no verifier: send what we have, now, or no drafts at all
            # (the non-SI step) when too few to pay for a longer forward.
            return avail if avail - view.committed >= min_drafts else view.committed
        if avail - covered >= lookahead:
            return covered + lookahead
        if view.drafter_stopped and avail > covered:
            return avail  # no more drafts are coming: verify the tail
        return None


class NonSIRules(DSIRules):
    """One zero-draft task per token: the DSI rules with no drafts at all."""

    name = "nonsi"
    uses_drafter = False
    one_server = True
    widen_queued = False

    def run_ahead(self, lookahead: int, sp: int) -> int:
        return 0

    def prefill(self, servers: Sequence[int]) -> Sequence[int]:
        return servers[:1]


class SIRules(Rules):
    name = "si"
    one_server = True

    def run_ahead(self, lookahead: int, sp: int) -> int:
        return lookahead  # one block, then wait for its verdict

    def prefill(self, servers: Sequence[int]) -> Sequence[int]:
        return ()  # classic SI: the first verification includes the prompt's prefill

    def next_task_length(self, view: Coverage, lookahead: int, outstanding: bool,
                         min_drafts: int = 1) -> int | None:
        if outstanding:
            return None  # the drafter waits for the verdict of the one task
        avail, n = view.drafted, view.committed
        if avail - n >= lookahead or view.drafter_stopped or avail >= view.limit:
            return min(avail, n + lookahead)
        return None


RULES: dict[str, Rules] = {r.name: r for r in (DSIRules(), SIRules(), NonSIRules())}


def default_run_ahead(mode: str, lookahead: int, sp: int) -> int:
    """Drafts the drafter may hold beyond the committed prefix: SI drafts one block and waits;
    DSI may fill every server and queue one more block."""
    return RULES[mode].run_ahead(lookahead, sp)
