"""Per-round plans: each client's bandwidth share and pruning rate (JCPBA and its baselines).

Client k's round, with share ``b_k`` and pruning rate ``rho_k`` (pruning scales compute and upload alike):

    t_k = (1 - rho_k) A_k  +  (1 - rho_k) S_k / R_k(b_k)  +  D_k

``A_k`` unpruned compute seconds, ``S_k`` unpruned upload bits, ``R_k`` the Shannon rate of the share
(:func:`fedtune.network.channel.uplink_rate`), ``D_k`` downlink seconds (a broadcast, not pruned). A round
lasts ``max_k t_k``. Constraints: ``sum b_k <= 1``; ``rho_min_k <= rho_k <= rho_max`` (``rho_min_k``: the
least pruning that makes the model fit the device's memory); quality: ``mean rho_k <= budget``.

JCPBA minimises the round latency by block coordinate descent on two blocks:

- **bandwidth step** (rates fixed): the shares that equalise finishing times. For a deadline T each client
  needs the smallest share with ``t_k = T`` (the rate is increasing in the share, inverted in closed form);
  bisection (``brentq``) finds the smallest T whose shares sum to 1.
- **pruning step** (deadline fixed): the rates that meet the deadline with the least total bandwidth under the
  quality budget. A client's smallest share meeting T is convex and decreasing in its rate, so this is a
  separable convex problem, solved exactly with one Lagrange multiplier on the budget (bisection again).
  The next bandwidth step then has spare band and lowers the deadline.

The latency falls at every iteration, and at a fixed point the rates need the whole band at the smallest
deadline any rates could meet, which makes it the global optimum (``tests/test_jcpba.py`` checks it against
``scipy.optimize.differential_evolution`` + SLSQP). The textbook pruning step (bandwidth fixed, give each
client the smallest rate meeting the current deadline) stalls instead: once every finishing time is equal
neither block alone can lower the maximum, and on random instances it stops up to 65 % above the optimum.
The plan ends with that step's rule: each client gets the smallest rate that meets the final deadline with
its share, so no client is pruned more than the latency needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy.optimize import brentq
from scipy.special import lambertw

from fedtune.errors import FedtuneError
from fedtune.network.channel import LN2, share_for_rate, uplink_rate
from fedtune.registry import Registry


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

    def up_s(self, share: np.ndarray, rho: np.ndarray) -> np.ndarray:
        bits = (1.0 - np.asarray(rho)) * self.up_bits
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(bits > 0, bits / self.rates(share), 0.0)

    def times(self, share: np.ndarray, rho: np.ndarray) -> np.ndarray:
        return (1.0 - np.asarray(rho)) * self.compute_s + self.up_s(share, rho) + self.down_s

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
    up = problem.up_s(share, rho)
    return Plan(name, share, rho, (1 - rho) * problem.compute_s, up, problem.down_s.copy(),
                problem.tx_power_w * up + (1 - rho) * problem.compute_j, problem.latency(share, rho), iterations)


# ---------------------------------------------------------------------------------------------
# The two blocks


def shares_for_deadline(problem: PlanProblem, rho: np.ndarray, deadline: float) -> np.ndarray:
    """Each client's smallest share finishing by ``deadline`` at rates ``rho`` (inf where none does)."""
    fixed = (1 - rho) * problem.compute_s + problem.down_s
    bits = (1 - rho) * problem.up_bits
    slack = deadline - fixed
    with np.errstate(divide="ignore", invalid="ignore"):
        needed = np.where(slack > 0, bits / slack, np.inf)
    out = share_for_rate(np.where(bits > 0, needed, 0.0), problem.bandwidth_hz, problem.snr)
    idle = np.where(slack >= -1e-12 * max(deadline, 1.0), 0.0, np.inf)  # nothing to send: meets it or not
    return np.where(bits > 0, out, idle)


def bandwidth_step(problem: PlanProblem, rho: np.ndarray) -> tuple[np.ndarray, float]:
    """Shares equalising finishing times at rates ``rho``: (shares summing to 1, latency)."""
    k = problem.k
    rho = np.asarray(rho, float)
    full = problem.times(np.ones(k), rho)  # each client alone on the whole band
    lo = float(np.max(full))
    hi = problem.latency(np.full(k, 1.0 / k), rho)  # equal shares are feasible
    excess = lambda t: float(np.sum(shares_for_deadline(problem, rho, t))) - 1.0  # noqa: E731
    if excess(lo) <= 0:
        deadline = lo
    else:
        while excess(hi) > 0:  # rounding at the equal-share point
            hi *= 1 + 1e-12
        deadline = brentq(excess, lo, hi, xtol=1e-15, rtol=1e-13) if hi > lo else hi
        while excess(deadline) > 1e-12:
            deadline *= 1 + 1e-14
    share = np.minimum(shares_for_deadline(problem, rho, deadline), 1.0)
    spare = 1.0 - share.sum()
    if spare > 0:  # compute-bound rounds leave band over: hand it out (it only shortens uploads)
        share = share + spare * (share / share.sum() if share.sum() > 0 else np.full(k, 1.0 / k))
    return share, problem.latency(share, rho)


def _rho_floor(problem: PlanProblem, deadline: float) -> np.ndarray:
    """Least rate with which each client can meet ``deadline`` at all (whole band), memory included."""
    r1 = uplink_rate(np.ones(problem.k), problem.bandwidth_hz, problem.snr)
    budget = deadline - problem.down_s
    with np.errstate(divide="ignore", invalid="ignore"):
        per_second = problem.compute_s + np.where(problem.up_bits > 0, problem.up_bits / r1, 0.0)
        keep = np.where(per_second > 0, budget / per_second, np.inf)  # max (1 - rho) meeting the deadline
    return np.maximum(problem.rho_min, np.maximum(0.0, 1.0 - keep))


def _slope_fn(problem: PlanProblem, deadline: float) -> Callable[[np.ndarray], np.ndarray]:
    """``rho -> d b_k / d rho`` (<= 0): the derivative of each client's smallest share meeting ``deadline``.

    A lean closed form (Lambert W, no fallbacks): it runs thousands of times per pruning step, and only its
    sign relative to the multiplier matters.
    """
    bw, snr, bits, comp = problem.bandwidth_hz, problem.snr, problem.up_bits, problem.compute_s
    window = deadline - problem.down_s
    scale = LN2 / (bw * snr)
    sends = bits > 0

    def slope(rho: np.ndarray) -> np.ndarray:
        keep = 1.0 - rho
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            slack = window - keep * comp
            q = keep * bits / slack * scale
            w = -np.real(lambertw(-q * np.exp(-q), k=-1)) - q  # ln(1 + snr / share)
            share = snr / np.expm1(w)
            d_rate = -bits * window / slack**2  # d(required rate) / d rho
            d_share = bw * (w - snr / (share + snr)) / LN2  # d rate / d share
            return np.where(sends, d_rate / d_share, 0.0)

    return slope


def pruning_step(problem: PlanProblem, deadline: float, iters: int = 48) -> np.ndarray | None:
    """Rates meeting ``deadline`` with the least total bandwidth under ``rho_max`` and the budget (None: none do).

    Minimises ``sum_k b_k(rho_k)`` with ``b_k`` each client's smallest share meeting the deadline (convex,
    decreasing): for a multiplier ``nu`` on the budget each client takes the rate where ``b_k' = -nu``
    (bisection on the derivative, all clients at once), and ``nu`` is found by ``brentq`` so the rates use
    the budget. Clients without upload take their floor rate.
    """
    lo = _rho_floor(problem, deadline)
    hi = np.full(problem.k, problem.rho_max)
    if np.any(lo > hi + 1e-12) or lo.sum() > problem.k * problem.budget + 1e-12:
        return None
    lo = np.minimum(lo, hi)
    flexible = (problem.up_bits > 0) & (hi > lo)
    slope = _slope_fn(problem, deadline)

    def rates_at(nu: float) -> np.ndarray:
        a, b = lo.copy(), hi.copy()
        for _ in range(iters):
            mid = 0.5 * (a + b)
            right = slope(mid) + nu < 0  # still falling: the optimum lies to the right
            a, b = np.where(right, mid, a), np.where(right, b, mid)
        return np.where(flexible, 0.5 * (a + b), lo)

    allowed = problem.k * problem.budget
    rho = rates_at(0.0)
    if rho.sum() <= allowed:
        return rho
    steepest = -slope(np.minimum(lo + 1e-9 * (hi - lo), hi))
    nu_hi = float(np.max(np.where(flexible & np.isfinite(steepest), steepest, 0.0), initial=0.0)) * 2 + 1e-300
    while rates_at(nu_hi).sum() > allowed + 1e-12:
        nu_hi *= 2
    nu = brentq(lambda v: rates_at(v).sum() - allowed, 0.0, nu_hi, xtol=1e-13 * nu_hi, rtol=1e-12)
    rho = rates_at(nu)
    if rho.sum() > allowed:  # bisection rounding: take the excess from the most pruned
        rho = np.maximum(lo, rho - (rho.sum() - allowed) * (rho - lo) / max((rho - lo).sum(), 1e-300))
    return rho


def _seconds_per_keep(problem: PlanProblem, share: np.ndarray) -> np.ndarray:
    """Compute + upload seconds of the unpruned model at ``share`` (a client's time is this x (1 - rho) + D)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return problem.compute_s + np.where(problem.up_bits > 0, problem.up_bits / problem.rates(share), 0.0)


def least_rates(problem: PlanProblem, share: np.ndarray, deadline: float) -> np.ndarray:
    """Each client's smallest rate meeting ``deadline`` with its ``share`` (memory's floor included)."""
    per_keep = _seconds_per_keep(problem, share)
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = np.where(per_keep > 0, (deadline - problem.down_s) / per_keep, np.inf)
    return np.clip(np.maximum(problem.rho_min, 1.0 - keep), 0.0, problem.rho_max)


def pruning_for_bandwidth(problem: PlanProblem, share: np.ndarray) -> tuple[np.ndarray, float]:
    """Shares fixed: the smallest deadline some rates meet under ``rho_max`` and the budget, and those rates."""
    per_keep = _seconds_per_keep(problem, share)
    lo = float(np.max((1 - problem.rho_max) * per_keep + problem.down_s))
    hi = float(np.max((1 - problem.rho_min) * per_keep + problem.down_s))
    excess = lambda t: float(least_rates(problem, share, t).sum()) - problem.k * problem.budget  # noqa: E731
    deadline = lo if excess(lo) <= 0 or hi <= lo else brentq(excess, lo, hi, xtol=1e-15, rtol=1e-13)
    while excess(deadline) > 1e-12:
        deadline *= 1 + 1e-14
    rho = least_rates(problem, share, deadline)
    return rho, problem.latency(share, rho)


# ---------------------------------------------------------------------------------------------
# Planners by name

Planner = Callable[[PlanProblem], Plan]
PLANNERS: Registry[Planner] = Registry("planner")


@PLANNERS.register("jcpba")
def jcpba(problem: PlanProblem, max_iter: int = 100, tol: float = 1e-9) -> Plan:
    """Joint client-specific pruning and bandwidth allocation by block coordinate descent (module doc)."""
    problem.check()
    if problem.k == 0:
        return make_plan(problem, "jcpba", np.zeros(0), np.zeros(0))
    rho = problem.rho_min.copy()
    share, latency = bandwidth_step(problem, rho)
    iterations = 1
    for _ in range(max_iter):
        new_rho = pruning_step(problem, latency)
        if new_rho is None:
            break
        new_share, new_latency = bandwidth_step(problem, new_rho)
        iterations += 1
        if new_latency >= latency * (1 - tol):
            if new_latency < latency:
                rho, share, latency = new_rho, new_share, new_latency
            break
        rho, share, latency = new_rho, new_share, new_latency
    rho = np.minimum(rho, least_rates(problem, share, latency))
    return make_plan(problem, "jcpba", share, rho, iterations)


@PLANNERS.register("equal")
def equal(problem: PlanProblem) -> Plan:
    """Equal bandwidth, no pruning (beyond what memory forces)."""
    problem.check()
    return make_plan(problem, "equal", np.full(problem.k, 1.0 / max(problem.k, 1)), problem.rho_min)


@PLANNERS.register("bandwidth_only")
def bandwidth_only(problem: PlanProblem) -> Plan:
    """Bandwidth step only: shares equalising finishing times, no pruning (beyond what memory forces)."""
    problem.check()
    if problem.k == 0:
        return make_plan(problem, "bandwidth_only", np.zeros(0), np.zeros(0))
    share, _ = bandwidth_step(problem, problem.rho_min)
    return make_plan(problem, "bandwidth_only", share, problem.rho_min)


@PLANNERS.register("pruning_only")
def pruning_only(problem: PlanProblem) -> Plan:
    """Equal bandwidth; per-client rates giving the smallest latency under ``rho_max`` and the budget."""
    problem.check()
    share = np.full(problem.k, 1.0 / max(problem.k, 1))
    if problem.k == 0:
        return make_plan(problem, "pruning_only", share, np.zeros(0))
    rho, _ = pruning_for_bandwidth(problem, share)
    return make_plan(problem, "pruning_only", share, rho)


@PLANNERS.register("uniform_pruning")
def uniform_pruning(problem: PlanProblem) -> Plan:
    """One rate for every client (the budget, capped at ``rho_max``; memory may force more on some, and then
    the common rate drops to stay within the budget), with shares equalising finishing times."""
    problem.check()
    if problem.k == 0:
        return make_plan(problem, "uniform_pruning", np.zeros(0), np.zeros(0))
    target = min(problem.budget, problem.rho_max)
    mean_at = lambda u: float(np.maximum(problem.rho_min, u).mean()) - problem.budget  # noqa: E731
    common = target if mean_at(target) <= 1e-12 else brentq(mean_at, 0.0, target, xtol=1e-15)
    rho = np.minimum(np.maximum(problem.rho_min, common), problem.rho_max)
    share, _ = bandwidth_step(problem, rho)
    return make_plan(problem, "uniform_pruning", share, rho)


BASELINES = ("equal", "pruning_only", "bandwidth_only", "uniform_pruning")
