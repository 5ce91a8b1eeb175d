"""The ``linear`` threshold controller: theta moves linearly from ``theta`` to ``theta_end`` over the run.

Early in fine-tuning a sample's activations change a lot between epochs and reuse costs quality; late, they
barely move. A schedule from strict to lax reuses more as training settles, with no learner to tune. (The
worked example of adding a controller with a setting of its own: README, "Extending fedtune".)
"""

from __future__ import annotations

from pydantic import Field

from fedtune.compression.controllers import CONTROLLERS, SessionObservation, ThresholdController
from fedtune.config.base import Section


class LinearSettings(Section):
    theta_end: float = Field(0.99, ge=0, le=1, description="Linear schedule: the threshold at the end of the run (it starts at "
                             "theta and moves linearly with the share of the run done).")


@CONTROLLERS.register("linear")
class LinearSchedule(ThresholdController):
    """theta(progress) = theta + (theta_end - theta) * progress, progress as of the last finished session."""

    Settings = LinearSettings

    def __init__(self, theta: float, settings: LinearSettings, seed: int) -> None:
        super().__init__(theta, settings, seed)
        self.start = float(theta)  # from the config: the same on resume; the state is the current theta

    def end_session(self, obs: SessionObservation) -> None:
        self._theta = self.start + (self.cfg.theta_end - self.start) * min(max(obs.progress, 0.0), 1.0)
