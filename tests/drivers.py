"""Drivers of the policy shared by several test modules (plain helpers, no tests here).

- :func:`forced_share` runs the simulator on the slow-drafter configuration of
  docs/design.md, "Forced commits", with the policy as it is or as it once was
  (:class:`RestartOnForced`).
"""

from __future__ import annotations

from dsi_mpi.policy import PromptRun, Send
from dsi_mpi.simulate import Latencies, MessageModel, simulate_once

# Phi3-14B / Phi3-4B on HumanEval (the paper's latencies), 9 ranks: the configuration on which
# the old policy collapsed into non-SI (docs/design.md, "Forced commits").
PHI3 = Latencies(target_tpot_ms=52.1, drafter_tpot_ms=34.0, target_ttft_ms=67.2,
                 drafter_ttft_ms=41.8)
PHI3_PROMPT = (1, 2, 3, 4, 5, 6, 7, 8)


class RestartOnForced(PromptRun):
    """The policy as it once was: a target token committed where no draft was held rolls the
    drafter back, as a rejection does, throwing away the drafter's forward in flight. With a
    drafter slower than about half the target, DSI then never regains its lead."""

    def _forced(self, j: int, token: int) -> list[Send] | None:
        return self._correct(j, token)


def forced_share(messages: MessageModel, restart_on_forced: bool, seeds: range = range(5),
                 lat: Latencies = PHI3, preempt_drafter: bool = True) -> float:
    """The share of committed tokens that the target gave where no draft had arrived (near 1:
    DSI has collapsed into non-SI), over simulated DSI runs (sp 7, lookahead 1, acceptance
    0.95), with the old policy if ``restart_on_forced``."""
    prompt_run = RestartOnForced if restart_on_forced else PromptRun
    runs = [simulate_once("dsi", lat, 0.95, 1, 7, 50, seed, prompt=PHI3_PROMPT, messages=messages,
                          prompt_run=prompt_run, preempt_drafter=preempt_drafter)
            for seed in seeds]
    return sum(r.counters.forced for r in runs) / sum(len(r.tokens) for r in runs)
