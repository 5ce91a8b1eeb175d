"""Epsilon at delta for client-level DP, from Google's ``dp-accounting`` (Renyi DP accountant).

fedtune samples a fixed number m of the n clients each round, without replacement, so the neighbouring relation
is *replacing one client's data* (the one dp-accounting supports for that sampling, Wang et al. 2019). Under it a
client's clipped update (norm <= C) can change the sum by 2C, so noise of std z C on the sum is a Gaussian
mechanism of noise multiplier z / 2. Add/remove-one figures (what Flower and Opacus report, with Poisson sampling)
come out smaller for the same noise; fedtune does not quote them because its sampling is not Poisson.

- central DP: one round is ``SampledWithoutReplacement(n, m, Gaussian(z / 2))`` (plain ``Gaussian(z / 2)`` when
  every client takes part); rounds compose.
- local DP: the server sees each upload, so sampling hides nothing: a client's epsilon composes ``Gaussian(z / 2)``
  over the rounds it took part in, and the run's epsilon is the largest of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dp_accounting
from dp_accounting import mechanism_calibration
from dp_accounting.rdp import RdpAccountant

REPLACE_ONE = dp_accounting.privacy_accountant.NeighboringRelation.REPLACE_ONE
DESCRIPTION = ("Renyi DP accountant of dp-accounting; neighbouring: one client's data replaced; "
               "clients sampled without replacement")


@dataclass(frozen=True)
class ClientAccountant:
    """Epsilon of ``rounds`` rounds of client-level DP with noise multiplier ``z`` (std z C on the sum)."""

    num_clients: int
    per_round: int
    delta: float
    local: bool = False

    def round_event(self, z: float) -> dp_accounting.DpEvent:
        gaussian = dp_accounting.GaussianDpEvent(z / 2)
        if self.local or self.per_round >= self.num_clients:
            return gaussian
        return dp_accounting.SampledWithoutReplacementDpEvent(self.num_clients, self.per_round, gaussian)

    def epsilon(self, z: float, rounds: int) -> float:
        """Epsilon at ``delta`` after ``rounds`` rounds (0 for none; inf without noise)."""
        if rounds <= 0:
            return 0.0
        if z <= 0:
            return math.inf
        accountant = RdpAccountant(neighboring_relation=REPLACE_ONE)
        accountant.compose(dp_accounting.SelfComposedDpEvent(self.round_event(z), rounds))
        return float(accountant.get_epsilon(self.delta))

    def calibrate(self, target_epsilon: float, rounds: int) -> float:
        """The smallest noise multiplier whose ``rounds`` rounds spend at most ``target_epsilon``."""
        z = mechanism_calibration.calibrate_dp_mechanism(
            lambda: RdpAccountant(neighboring_relation=REPLACE_ONE),
            lambda z: dp_accounting.SelfComposedDpEvent(self.round_event(z), rounds),
            target_epsilon, self.delta,
            mechanism_calibration.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4)
        while self.epsilon(z, rounds) > target_epsilon:  # the bracket's tolerance may land a hair above
            z *= 1 + 1e-4
        return float(z)
