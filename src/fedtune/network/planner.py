"""Per-round plans: each client's bandwidth share and pruning rate (JCPBA and its baselines).

Client k's round, with share ``b_k`` and pruning rate ``rho_k``, lasts

    t_k = c(rho_k) A_k  +  s(rho_k) (S_k / R_k(b_k) + D_k),    c(rho) = 1 - kc rho,  s(rho) = 1 - ks rho

and the round ``max_k t_k``, under ``sum b_k <= 1``, ``rho_min_k <= rho_k <= rho_max`` and
``mean rho_k <= budget``. The symbols and constraints are spelt out in :mod:`fedtune.network.plan_problem`
(:class:`PlanProblem`, :class:`Plan`, :class:`PlanError`), whose names are re-exported here.

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

The fastest plan is not unique, and pruning costs quality, so the plan ends with the **least pruning**
(smallest sum of rates) that meets the deadline ``(1 + slack) x`` the optimum within the band: the dual of
the pruning step (same per-client rule, the multiplier set so the shares fill the band instead of the rates
the budget). With ``slack`` 0 it drops only pruning that buys no time; a small slack keeps a client off the
critical path from being pruned for a sliver of latency (e.g. when one client in a deep fade, power-limited,
takes nearly the whole band and so squeezes everyone else into pruning).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.optimize import brentq
from scipy.special import lambertw

from fedtune.core.registry import Registry
from fedtune.network.channel import LN2, share_for_rate
from fedtune.network.plan_problem import Plan, PlanError, PlanProblem, make_plan

__all__ = ["BASELINES", "PLANNERS", "PRUNING_PLANNERS", "Plan", "PlanError", "PlanProblem", "Planner", "bandwidth_step",
           "least_pruning", "least_rates", "make_plan", "pruning_for_bandwidth", "pruning_step",
           "shares_for_deadline"]


# ---------------------------------------------------------------------------------------------
# The two blocks


def shares_for_deadline(problem: PlanProblem, rho: np.ndarray, deadline: float) -> np.ndarray:
    """Each client's smallest share finishing by ``deadline`` at rates ``rho`` (inf where none does)."""
    fixed = problem.keep_compute(rho) * problem.compute_s + problem.keep_bytes(rho) * problem.down_s
    bits = problem.keep_bytes(rho) * problem.up_bits
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
    share = _fill_band(np.minimum(shares_for_deadline(problem, rho, deadline), 1.0))
    return share, problem.latency(share, rho)


def _fill_band(share: np.ndarray) -> np.ndarray:
    """Shares summing to 1: band left over (compute-bound clients) is handed out in proportion, where it only
    shortens uploads; a rounding excess is taken back the same way."""
    total = share.sum()
    if total <= 0:
        return np.full(len(share), 1.0 / max(len(share), 1))
    return share / total if total > 1 else share + (1.0 - total) * share / total


def _linear_in_rho(problem: PlanProblem, share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """With ``share`` fixed a client's finishing time is affine in its rate: ``t0 - rho dt``; returns (t0, dt)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(problem.up_bits > 0, problem.up_bits / problem.rates(share), 0.0)
    t0 = problem.compute_s + up + problem.down_s
    return t0, problem.compute_cut * problem.compute_s + problem.bytes_cut * (up + problem.down_s)


def _rates_meeting(t0: np.ndarray, dt: np.ndarray, deadline: float) -> np.ndarray:
    """Smallest ``rho >= 0`` with ``t0 - rho dt <= deadline`` (inf where no rate does)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.where(dt > 0, (t0 - deadline) / dt, np.inf)
    return np.where(t0 <= deadline, 0.0, np.where(np.isfinite(t0) & np.isfinite(need), need, np.inf))


def _rho_floor(problem: PlanProblem, deadline: float) -> np.ndarray:
    """Least rate with which each client can meet ``deadline`` at all (whole band), memory included."""
    return np.maximum(problem.rho_min, _rates_meeting(*_linear_in_rho(problem, np.ones(problem.k)), deadline))


def _slope_fn(problem: PlanProblem, deadline: float) -> Callable[[np.ndarray], np.ndarray]:
    """``rho -> d b_k / d rho`` (<= 0): the derivative of each client's smallest share meeting ``deadline``.

    A lean closed form (Lambert W, no fallbacks): it runs thousands of times per pruning step, and only its
    sign relative to the multiplier matters.
    """
    bw, snr, bits, comp, down = problem.bandwidth_hz, problem.snr, problem.up_bits, problem.compute_s, problem.down_s
    kc, ks = problem.compute_cut, problem.bytes_cut
    scale = LN2 / (bw * snr)
    sends = bits > 0

    def slope(rho: np.ndarray) -> np.ndarray:
        keep_c, keep_s = 1.0 - kc * rho, 1.0 - ks * rho
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            slack = deadline - keep_c * comp - keep_s * down
            q = keep_s * bits / slack * scale
            w = -np.real(lambertw(-q * np.exp(-q), k=-1)) - q  # ln(1 + snr / share)
            share = snr / np.expm1(w)
            d_rate = -bits * (ks * slack + keep_s * (kc * comp + ks * down)) / slack**2  # d(required rate) / d rho
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
    bounds = _rate_bounds(problem, deadline)
    if bounds is None or bounds[0].sum() > problem.k * problem.budget + 1e-12:
        return None
    rates_at, nu_hi = _rates_for_multiplier(problem, deadline, *bounds, iters)
    allowed = problem.k * problem.budget
    rho = rates_at(0.0)
    if rho.sum() <= allowed:
        return rho
    while rates_at(nu_hi).sum() > allowed + 1e-12:
        nu_hi *= 2
    nu = brentq(lambda v: rates_at(v).sum() - allowed, 0.0, nu_hi, xtol=1e-13 * nu_hi, rtol=1e-12)
    rho = rates_at(nu)
    lo = bounds[0]
    if rho.sum() > allowed:  # bisection rounding: take the excess from the most pruned
        rho = np.maximum(lo, rho - (rho.sum() - allowed) * (rho - lo) / max((rho - lo).sum(), 1e-300))
    return rho


def least_pruning(problem: PlanProblem, deadline: float, iters: int = 48) -> np.ndarray | None:
    """Rates meeting ``deadline`` within the band with the least total pruning (None: no rates do).

    The dual of :func:`pruning_step`: minimises ``sum_k rho_k`` subject to ``sum_k b_k(rho_k) <= 1``. Same
    per-client rule (``b_k' = -nu``); ``nu`` is found so the shares fill the band. Any deadline at or above the
    optimal latency leaves the budget satisfied, since the optimum's own rates already meet it.
    """
    bounds = _rate_bounds(problem, deadline)
    if bounds is None:
        return None
    band = lambda rho: float(np.sum(shares_for_deadline(problem, rho, deadline)))  # noqa: E731
    if band(bounds[0]) <= 1.0:
        return bounds[0]
    rates_at, nu_hi = _rates_for_multiplier(problem, deadline, *bounds, iters)
    if band(rates_at(0.0)) > 1.0 + 1e-9:  # even the rates needing the least band do not fit
        return None
    while band(rates_at(nu_hi)) <= 1.0:
        nu_hi *= 2
    nu = brentq(lambda v: band(rates_at(v)) - 1.0, 0.0, nu_hi, xtol=1e-13 * nu_hi, rtol=1e-12)
    return rates_at(nu)


def _rate_bounds(problem: PlanProblem, deadline: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-client rate range that can meet ``deadline``: from the floor (whole band, memory) to ``rho_max``."""
    lo = _rho_floor(problem, deadline)
    hi = np.full(problem.k, problem.rho_max)
    if np.any(lo > hi + 1e-12):
        return None
    return np.minimum(lo, hi), hi


def _rates_for_multiplier(problem: PlanProblem, deadline: float, lo: np.ndarray, hi: np.ndarray,
                          iters: int) -> tuple[Callable[[float], np.ndarray], float]:
    """``nu -> rates`` where each client's share slope ``b_k'(rho_k) = -nu`` (within its bounds; bisection, all
    clients at once), and a multiplier above which every rate sits at its floor."""
    flexible = (problem.up_bits > 0) & (hi > lo)
    slope = _slope_fn(problem, deadline)

    def rates_at(nu: float) -> np.ndarray:
        a, b = lo.copy(), hi.copy()
        for _ in range(iters):
            mid = 0.5 * (a + b)
            right = slope(mid) + nu < 0  # still falling: the optimum lies to the right
            a, b = np.where(right, mid, a), np.where(right, b, mid)
        return np.where(flexible, 0.5 * (a + b), lo)

    steepest = -slope(np.minimum(lo + 1e-9 * (hi - lo), hi))
    nu_hi = float(np.max(np.where(flexible & np.isfinite(steepest), steepest, 0.0), initial=0.0)) * 2 + 1e-300
    return rates_at, nu_hi


def least_rates(problem: PlanProblem, share: np.ndarray, deadline: float) -> np.ndarray:
    """Each client's smallest rate meeting ``deadline`` with its ``share`` (memory's floor included)."""
    need = _rates_meeting(*_linear_in_rho(problem, share), deadline)
    return np.clip(np.maximum(problem.rho_min, need), 0.0, problem.rho_max)


def pruning_for_bandwidth(problem: PlanProblem, share: np.ndarray) -> tuple[np.ndarray, float]:
    """Shares fixed: the smallest deadline some rates meet under ``rho_max`` and the budget, and those rates."""
    t0, dt = _linear_in_rho(problem, share)
    lo = float(np.max(t0 - problem.rho_max * dt))
    hi = float(np.max(t0 - problem.rho_min * dt))
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
    deadline = latency * (1 + problem.slack)
    least = least_pruning(problem, deadline)
    if least is not None:
        least_share = _fill_band(shares_for_deadline(problem, least, deadline))
        within_budget = least.sum() <= problem.k * problem.budget + 1e-9
        if within_budget and problem.latency(least_share, least) <= deadline * (1 + 1e-9):
            return make_plan(problem, "jcpba", least_share, least, iterations)
    rho = np.minimum(rho, least_rates(problem, share, latency))  # numerical fallback: trim the optimum's rates
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
#: The planners that prune by choice (up to ``network.rho_max``); the others prune only where memory forces it.
PRUNING_PLANNERS = ("jcpba", "pruning_only", "uniform_pruning")
