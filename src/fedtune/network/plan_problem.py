"""One round's planning problem (:class:`PlanProblem`) and its answer (:class:`Plan`); the planners that
solve it are in :mod:`fedtune.network.planner`.

Client k's round, with share ``b_k`` and pruning rate ``rho_k``:

    t_k = c(rho_k) A_k  +  s(rho_k) (S_k / R_k(b_k) + D_k),    c(rho) = 1 - kc rho,  s(rho) = 1 - ks rho

``A_k`` unpruned compute seconds, ``S_k`` unpruned upload bits, ``R_k`` the Shannon rate of the share
(:func:`fedtune.network.channel.uplink_rate`), ``D_k`` unpruned downlink seconds (the broadcast rate). ``c`` and
``s`` are the fractions of compute and of adapter bytes a pruned client keeps: ``kc = ks = 1`` is the textbook
``1 - rho``; a run measures them on its own model (:func:`fedtune.network.workload.pruning_cuts`), where at
rho 0.5 a SmolLM2 LoRA adapter keeps about 0.77 of its bytes (0.72 with heads pruned too), not 0.5. A round
lasts ``max_k t_k``.
Constraints: ``sum b_k <= 1``; ``rho_min_k <= rho_k <= rho_max`` (``rho_min_k``: the least pruning that makes
the model fit the device's memory); quality: ``mean rho_k <= budget``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedtune.core.errors import FedtuneError
from fedtune.network.channel import uplink_rate


class PlanError(FedtuneError):
    """No plan satisfies the constraints (memory, pruning limit, quality budget)."""


@dataclass(frozen=True)
class PlanProblem:
    """One round's planning inputs for K clients (arrays of length K, seconds and bits)."""

    compute_s: np.ndarray  # A_k: unpruned compute seconds
    up_bits: np.ndarray  # S_k: unpruned upload, bits
    down_s: np.ndarray  # D_k: downlink seconds
    snr: np.ndarray  # p_k g_k / (B N0): SNR over the whole band
    bandwidth_hz: float
    rho_min: np.ndarray  # least pruning that fits memory
    rho_max: float
    budget: float  # mean rho <= budget
    tx_power_w: np.ndarray = field(default=None)  # for energy
    compute_j: np.ndarray = field(default=None)  # unpruned compute energy, J
    compute_cut: float = 1.0  # kc: compute kept at rate rho is 1 - kc rho
    bytes_cut: float = 1.0  # ks: adapter bytes (up and down) kept at rate rho are 1 - ks rho
    slack: float = 0.0  # JCPBA: latency accepted above the optimum in exchange for less pruning

    def __post_init__(self) -> None:
        k = len(self.compute_s)
        for name in ("compute_s", "up_bits", "down_s", "snr", "rho_min", "tx_power_w", "compute_j"):
            value = getattr(self, name)
            object.__setattr__(self, name, np.zeros(k) if value is None else np.asarray(value, float).reshape(k))

    @property
    def k(self) -> int:
        return len(self.compute_s)

    def rates(self, share: np.ndarray) -> np.ndarray:
        return uplink_rate(share, self.bandwidth_hz, self.snr)

    def keep_compute(self, rho: np.ndarray) -> np.ndarray:
        return 1.0 - self.compute_cut * np.asarray(rho, float)

    def keep_bytes(self, rho: np.ndarray) -> np.ndarray:
        return 1.0 - self.bytes_cut * np.asarray(rho, float)

    def up_s(self, share: np.ndarray, rho: np.ndarray) -> np.ndarray:
        bits = self.keep_bytes(rho) * self.up_bits
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(bits > 0, bits / self.rates(share), 0.0)

    def times(self, share: np.ndarray, rho: np.ndarray) -> np.ndarray:
        return self.keep_compute(rho) * self.compute_s + self.up_s(share, rho) + self.keep_bytes(rho) * self.down_s

    def latency(self, share: np.ndarray, rho: np.ndarray) -> float:
        return float(np.max(self.times(share, rho))) if self.k else 0.0

    def check(self) -> None:
        """Raise :class:`PlanError` when no rates satisfy memory, ``rho_max`` and the quality budget together."""
        worst = int(np.argmax(self.rho_min)) if self.k else 0
        if self.k and self.rho_min[worst] > self.rho_max + 1e-12:
            raise PlanError(f"client #{worst} of the round must prune {self.rho_min[worst]:.2f} of the model to fit "
                            f"its device's memory, above network.rho_max = {self.rho_max}")
        if self.k and self.rho_min.mean() > self.budget + 1e-12:
            raise PlanError(f"the pruning that memory forces (mean rate {self.rho_min.mean():.2f}) exceeds the "
                            f"quality budget network.mean_rho_budget = {self.budget}")


@dataclass(frozen=True)
class Plan:
    """A round's allocation: per-client share, pruning rate, seconds and energy; latency = max finish."""

    planner: str
    share: np.ndarray
    rho: np.ndarray
    compute_s: np.ndarray
    up_s: np.ndarray
    down_s: np.ndarray
    energy_j: np.ndarray
    latency_s: float
    iterations: int = 0

    @property
    def comm_s(self) -> np.ndarray:
        return self.up_s + self.down_s

    @property
    def finish_s(self) -> np.ndarray:
        return self.compute_s + self.comm_s


def make_plan(problem: PlanProblem, name: str, share: np.ndarray, rho: np.ndarray, iterations: int = 0) -> Plan:
    share = np.asarray(share, float)
    rho = np.clip(np.round(np.asarray(rho, float), 12), 0.0, None)  # no -1e-17 or 0.4999999999999989 rates
    up, keep = problem.up_s(share, rho), problem.keep_compute(rho)
    return Plan(name, share, rho, keep * problem.compute_s, up, problem.keep_bytes(rho) * problem.down_s,
                problem.tx_power_w * up + keep * problem.compute_j, problem.latency(share, rho), iterations)

