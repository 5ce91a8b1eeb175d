"""The ``budget`` threshold controller: theta chosen so that each session sends a set share of its bytes.

Users size a link in bytes, not in cosine thresholds. After each session the controller compares the share of the
uncompressed bytes the interface really sent with ``byte_budget`` and moves theta in log10(1 - theta), the scale on
which the useful thresholds spread out (0.99, 0.999, 0.9999, ...): too many bytes make it laxer, too few stricter,
by ``budget_gain`` decades per decade of overshoot. A session that sent everything (the first epoch, when nothing is
cached yet) says nothing about theta and is not counted. Unlike bang-bang it never re-sends a whole epoch at once,
and unlike DDPG it needs no exploration: the bytes it is told to spend are the bytes it spends.
"""

from __future__ import annotations

import math

from pydantic import Field

from fedtune.compression.controllers import CONTROLLERS, SessionObservation, ThresholdController
from fedtune.config.base import Section

LAXEST, STRICTEST = 0.9, 0.9999999  # the range theta moves in


class BudgetSettings(Section):
    byte_budget: float = Field(0.005, gt=0, le=1, description="Budget controller: the share of an interface's "
                               "uncompressed bytes each session (after the first epoch) may send. 0.005: a 99 % cut "
                               "over 10 epochs leaves 1 % on average, of which the first epoch's coded upload takes "
                               "about 0.4 % of the total.")
    budget_gain: float = Field(0.5, gt=0, le=2, description="Budget controller: decades of 1 - theta moved per "
                               "decade by which a session's byte share missed the budget.")


@CONTROLLERS.register("budget")
class BudgetController(ThresholdController):
    """log10(1 - theta) += gain * log10(share / byte_budget) after each session that reused something."""

    Settings = BudgetSettings

    def end_session(self, obs: SessionObservation) -> None:
        if obs.upload_ratio >= 1.0 or obs.bytes_full <= 0:
            return  # everything was new: nothing to learn about theta
        share = max(obs.bytes_sent, 1) / obs.bytes_full
        gap = math.log10(max(1.0 - self._theta, 1e-12))
        gap += self.cfg.budget_gain * math.log10(share / self.cfg.byte_budget)
        self._theta = min(max(1.0 - 10.0 ** gap, LAXEST), STRICTEST)
