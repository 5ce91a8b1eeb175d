"""JCPBA and its baselines: the bandwidth step's optimality, the solver against SciPy's global search,
baseline ordering, constraints, and the planner inside a run (simulated time, stragglers, resume)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import TINY
from scipy.optimize import differential_evolution, minimize

from fedtune.cli import main
from fedtune.engine.runner import Runner
from fedtune.network.channel import dbm_to_w, uplink_rate
from fedtune.network.devices import PRESETS
from fedtune.network.planner import (
    BASELINES,
    PLANNERS,
    PlanError,
    PlanProblem,
    bandwidth_step,
    least_pruning,
    pruning_step,
    shares_for_deadline,
)


def random_problem(rng: np.random.Generator, k: int, **kw) -> PlanProblem:
    """Compute 0.1-5 s, uploads 1-50 MB, SNR 0-40 dB over 20 MHz, 0.3 s downlink."""
    args = dict(compute_s=rng.uniform(0.1, 5, k), up_bits=8 * rng.uniform(1e6, 5e7, k), down_s=np.full(k, 0.3),
                snr=10 ** rng.uniform(0, 4, k), bandwidth_hz=20e6, rho_min=np.zeros(k), rho_max=0.6, budget=0.3,
                tx_power_w=np.full(k, 0.2), compute_j=rng.uniform(1, 10, k))
    args.update(kw)
    return PlanProblem(**args)


def global_search(p: PlanProblem, rho: np.ndarray | None = None) -> float:
    """SciPy's global search over (shares, rates): differential evolution on a penalised max, then SLSQP on the
    epigraph form (min T s.t. t_k <= T, sum b <= 1, sum rho <= K budget) from its best point. With ``rho``
    given, over the shares only. Written from the formulas, not with the planner's helpers."""
    k = p.k
    fixed = rho is not None

    def times(b, r):  # b, r: (k,) or (k, S)
        snr, comp, bits, down = (v.reshape(k, *([1] * (b.ndim - 1))) for v in (p.snr, p.compute_s, p.up_bits,
                                                                                 p.down_s))
        b = np.maximum(b, 1e-12)
        rate = b * p.bandwidth_hz * np.log1p(snr / b) / np.log(2)
        return (1 - p.compute_cut * r) * comp + (1 - p.bytes_cut * r) * (bits / rate + down)

    def split(x):
        return x[:k], ((rho if x.ndim == 1 else rho[:, None]) if fixed else x[k:2 * k])

    def penalised(x):  # vectorised: x is (dims, S)
        b, r = split(x)
        over = np.maximum(0.0, b.sum(0) - 1) + (0.0 if fixed else np.maximum(0.0, r.sum(0) - k * p.budget))
        return times(b, r).max(0) * (1 + 1e3 * over)

    bounds = [(1e-6, 1.0)] * k + ([] if fixed else [(p.rho_min[i], p.rho_max) for i in range(k)])
    de = differential_evolution(penalised, bounds, seed=0, tol=1e-10, maxiter=400, popsize=20, polish=False,
                                vectorized=True, updating="deferred")
    x0 = np.r_[de.x, float(de.fun)]
    cons = [{"type": "ineq", "fun": lambda x: 1 - x[:k].sum()},
            {"type": "ineq", "fun": lambda x: x[-1] - times(*split(x[:-1]))}]
    if not fixed:
        cons.append({"type": "ineq", "fun": lambda x: k * p.budget - x[k:2 * k].sum()})
    res = minimize(lambda x: x[-1], x0, method="SLSQP", bounds=bounds + [(0, None)], constraints=cons,
                   options={"ftol": 1e-12, "maxiter": 500})
    best = float(de.fun)
    b, r = split(res.x[:-1])
    if b.sum() <= 1 + 1e-9 and (fixed or r.sum() <= k * p.budget + 1e-9):
        best = min(best, float(times(b, r).max()))
    return best


# ---------------------------------------------------------------------------------------------
# The two steps


@pytest.mark.parametrize("seed", range(4))
def test_bandwidth_step_equalises_finishing_times_and_no_split_does_better(seed):
    rng = np.random.default_rng(seed)
    k = 2 + seed % 3
    p = random_problem(rng, k)
    rho = rng.uniform(0, 0.5, k)
    share, latency = bandwidth_step(p, rho)
    times = p.times(share, rho)
    assert share.sum() == pytest.approx(1.0, abs=1e-9) and np.all(share > 0)
    np.testing.assert_allclose(times, latency, rtol=1e-9)  # everyone finishes together
    assert latency <= global_search(p, rho) * (1 + 1e-7)
    # any other split that sums to 1 has a slower client
    for _ in range(200):
        other = rng.dirichlet(np.ones(k))
        assert p.latency(other, rho) >= latency * (1 - 1e-12)


def test_bandwidth_step_shares_solve_the_finishing_time_equation():
    rng = np.random.default_rng(7)
    p = random_problem(rng, 3)
    rho = np.array([0.1, 0.0, 0.4])
    for deadline in (8.0, 15.0, 40.0):
        share = shares_for_deadline(p, rho, deadline)
        with np.errstate(invalid="ignore"):
            np.testing.assert_allclose(p.times(share, rho)[np.isfinite(share)], deadline, rtol=1e-9)
        smaller = share * (1 - 1e-6)
        assert np.all(p.times(smaller, rho) > deadline)  # the smallest share that meets it


def test_pruning_step_meets_the_deadline_with_the_least_bandwidth():
    rng = np.random.default_rng(3)
    p = random_problem(rng, 3)
    _, deadline = bandwidth_step(p, p.rho_min)
    deadline *= 0.8
    rho = pruning_step(p, deadline)
    assert rho is not None and rho.sum() <= 3 * p.budget + 1e-9
    total = shares_for_deadline(p, rho, deadline).sum()
    # SLSQP over the rates from several starts finds no smaller total
    objective = lambda r: float(np.sum(shares_for_deadline(p, np.asarray(r), deadline)))  # noqa: E731
    cons = [{"type": "ineq", "fun": lambda r: 3 * p.budget - np.sum(r)}]
    for start in rng.dirichlet(np.ones(3), 5) * 3 * p.budget:
        start = np.clip(start, 0, p.rho_max)
        if not np.isfinite(objective(start)):
            continue
        res = minimize(objective, start, method="SLSQP", bounds=[(0, p.rho_max)] * 3, constraints=cons)
        if res.success and np.isfinite(res.fun):
            assert total <= res.fun * (1 + 1e-6)


# ---------------------------------------------------------------------------------------------
# The solver


@pytest.mark.parametrize("seed", range(6))
def test_jcpba_is_within_one_percent_of_scipys_global_search(seed):
    rng = np.random.default_rng(100 + seed)
    k = 2 + seed % 3
    p = random_problem(rng, k, rho_min=np.where(rng.uniform(size=k) < 0.3, 0.2, 0.0))
    plan = PLANNERS.get("jcpba")(p)
    best = global_search(p)
    assert plan.latency_s <= best * 1.01
    assert plan.latency_s >= best * (1 - 1e-6)  # and the search finds nothing better


@pytest.mark.parametrize("seed", range(4))
def test_jcpba_with_measured_pruning_costs_is_within_one_percent_of_scipys_global_search(seed):
    """Pruning keeps 1 - kc rho of the compute and 1 - ks rho of the bytes (SmolLM2 with LoRA: about 0.72 and 0.55)."""
    rng = np.random.default_rng(300 + seed)
    k = 2 + seed % 3
    p = random_problem(rng, k, compute_cut=0.72, bytes_cut=0.55, compute_s=rng.uniform(0.1, 20, k))
    plan = PLANNERS.get("jcpba")(p)
    best = global_search(p)
    assert best * (1 - 1e-6) <= plan.latency_s <= best * 1.01
    textbook = PLANNERS.get("jcpba")(dataclasses.replace(p, compute_cut=1.0, bytes_cut=1.0))
    assert p.times(plan.share, plan.rho) == pytest.approx(plan.finish_s, rel=1e-12)
    assert textbook.latency_s < plan.latency_s  # pruning buys less than 1 - rho promises


def test_least_pruning_meets_the_deadline_with_the_smallest_total_rate():
    rng = np.random.default_rng(11)
    p = random_problem(rng, 4, compute_cut=0.7, bytes_cut=0.6, budget=0.5)
    optimum = PLANNERS.get("jcpba")(p).latency_s
    for deadline in (optimum, optimum * 1.03, optimum * 1.2):
        rho = least_pruning(p, deadline)
        band = lambda r: float(np.sum(shares_for_deadline(p, np.asarray(r), deadline)))  # noqa: E731
        assert rho is not None and band(rho) <= 1 + 1e-7
        # SLSQP from several starts finds no smaller total rate that fits the band
        cons = [{"type": "ineq", "fun": lambda r: 1 - band(r)}]
        for start in rng.uniform(0, p.rho_max, (5, 4)):
            if band(start) > 1:
                continue
            res = minimize(np.sum, start, method="SLSQP", bounds=[(0, p.rho_max)] * 4, constraints=cons)
            if res.success and band(res.x) <= 1 + 1e-9:
                assert rho.sum() <= res.x.sum() + 1e-6
    assert least_pruning(p, optimum * 0.9) is None  # below the optimum nothing fits


def test_a_little_latency_slack_spares_clients_off_the_critical_path():
    """One client in a deep fade is power-limited: the whole band barely speeds it up. The fastest plan still
    gives it nearly all the band and prunes everyone else; 2 % slack leaves them unpruned."""
    k = 6
    args = dict(compute_s=np.full(k, 0.5), up_bits=np.full(k, 8 * 1e7), down_s=np.full(k, 1.0),
                snr=np.r_[1e-4, np.full(k - 1, 300.0)], bandwidth_hz=20e6, rho_min=np.zeros(k), rho_max=0.5,
                budget=0.5, compute_cut=0.72, bytes_cut=0.55)
    fastest = PLANNERS.get("jcpba")(PlanProblem(**args))
    relaxed = PLANNERS.get("jcpba")(PlanProblem(**args, slack=0.02))
    assert fastest.rho[0] == pytest.approx(0.5) and np.all(fastest.rho[1:] > 0.1)  # the squeeze
    assert relaxed.rho[0] > 0.4 and np.all(relaxed.rho[1:] == 0)
    assert fastest.latency_s < relaxed.latency_s <= fastest.latency_s * 1.02 * (1 + 1e-9)
    assert relaxed.share.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(8))
def test_jcpba_beats_every_baseline_and_respects_the_constraints(seed):
    rng = np.random.default_rng(200 + seed)
    k = int(rng.integers(2, 9))
    p = random_problem(rng, k, rho_min=np.where(rng.uniform(size=k) < 0.25, 0.15, 0.0),
                       compute_s=rng.uniform(0.1, 20, k))
    plan = PLANNERS.get("jcpba")(p)
    assert plan.share.sum() <= 1 + 1e-9 and np.all(plan.share >= 0)
    assert np.all(plan.rho >= p.rho_min - 1e-12) and np.all(plan.rho <= p.rho_max + 1e-12)
    assert plan.rho.mean() <= p.budget + 1e-9
    assert plan.latency_s == pytest.approx(plan.finish_s.max(), rel=1e-12)
    baselines = {name: PLANNERS.get(name)(p) for name in BASELINES}
    for name, base in baselines.items():
        assert plan.latency_s <= base.latency_s * (1 + 1e-9), name
        assert base.share.sum() <= 1 + 1e-9 and base.rho.mean() <= p.budget + 1e-9, name
    assert np.all(baselines["equal"].share == 1 / k) and np.all(baselines["equal"].rho == p.rho_min)
    assert np.all(baselines["bandwidth_only"].rho == p.rho_min)
    assert np.ptp(baselines["uniform_pruning"].rho[p.rho_min == 0]) == 0
    assert baselines["bandwidth_only"].latency_s <= baselines["equal"].latency_s * (1 + 1e-12)
    assert baselines["pruning_only"].latency_s <= baselines["equal"].latency_s * (1 + 1e-12)


def test_energy_is_radio_plus_compute():
    p = random_problem(np.random.default_rng(1), 3)
    plan = PLANNERS.get("jcpba")(p)
    np.testing.assert_allclose(plan.energy_j, p.tx_power_w * plan.up_s + (1 - plan.rho) * p.compute_j)


def test_memory_forces_pruning_and_impossible_settings_say_why():
    p = random_problem(np.random.default_rng(2), 3, rho_min=np.array([0.4, 0.0, 0.0]))
    assert PLANNERS.get("jcpba")(p).rho[0] >= 0.4 and PLANNERS.get("equal")(p).rho[0] == 0.4
    with pytest.raises(PlanError, match="must prune 0.70 .* above network.rho_max = 0.6"):
        PLANNERS.get("jcpba")(random_problem(np.random.default_rng(2), 3, rho_min=np.array([0.7, 0, 0])))
    with pytest.raises(PlanError, match="exceeds the quality budget"):
        PLANNERS.get("equal")(random_problem(np.random.default_rng(2), 2, rho_min=np.array([0.5, 0.5])))


def test_a_client_with_nothing_to_upload_needs_no_band():
    p = PlanProblem(compute_s=[1.0, 2.0, 3.0], up_bits=[0.0, 8e7, 8e7], down_s=[0.0] * 3, snr=[100.0, 10.0, 1e3],
                    bandwidth_hz=1e6, rho_min=[0.0] * 3, rho_max=0.5, budget=0.2)
    plan = PLANNERS.get("jcpba")(p)
    assert plan.share[0] == 0 and plan.share.sum() == pytest.approx(1.0)
    assert plan.latency_s <= min(PLANNERS.get(n)(p).latency_s for n in BASELINES) * (1 + 1e-9)


# ---------------------------------------------------------------------------------------------
# Inside a run


def _lines(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def network_run(tmp_path_factory):
    from fedtune.config import load_config

    out = tmp_path_factory.mktemp("net") / "jcpba"
    cfg = load_config(TINY, ["network.planner=jcpba", "federation.rounds=2",
                             "devices.profiles=['phone', 'jetson', 'laptop']"])
    return cfg, out, Runner(cfg, out).run()


def test_run_reports_simulated_time_consistent_with_the_ledger(network_run):
    cfg, out, summary = network_run
    lines = _lines(out)
    net = cfg.network
    assert summary["time"]["simulated_s"] > 0
    assert summary["time"]["simulated_s"] == pytest.approx(sum(r["sim_s"] for r in lines), rel=1e-12)
    assert lines[0]["sim_s"] == 0.0
    n0 = dbm_to_w(net.noise_dbm_per_hz)
    for rec in lines[1:]:
        rows = rec["sim_clients"]
        assert [r["client"] for r in rows] == rec["clients"] and rec["stragglers"] == 0
        assert rec["sim_s"] == pytest.approx(max(r["finish_s"] for r in rows), rel=1e-12)
        assert sum(r["share"] for r in rows) == pytest.approx(1.0, abs=1e-9)
        assert np.mean([r["rho"] for r in rows]) <= net.mean_rho_budget + 1e-9
        for r in rows:
            device = PRESETS[r["device"]]
            assert r["pruning_applied"] == (r["rho"] > 0)  # FedLLM trains the pruned model the plan asks for
            assert r["comm_s"] == pytest.approx(r["up_s"] + r["down_s"], rel=1e-12)
            flops = r["compute_s"] * device.flops_per_s
            assert r["energy_j"] == pytest.approx(device.tx_power_w * r["up_s"] + net.energy_pj_per_flop * 1e-12 * flops)
    assert any(r["rho"] > 0 for rec in lines[1:] for r in rec["sim_clients"])  # the phone is pruned
    # seconds x rate give back exactly the bytes the ledger recorded and the FLOPs the client measured
    for client in summary["clients"]:
        rows = [(rec, r) for rec in lines[1:] for r in rec["sim_clients"] if r["client"] == client["id"]]
        device = PRESETS[rows[0][1]["device"]]
        up_bits = down_bits = 0.0
        for rec, r in rows:
            snr = device.tx_power_w * 10 ** (r["gain_db"] / 10) / (net.bandwidth_hz * n0)
            up_bits += r["up_s"] * uplink_rate(np.array([r["share"]]), net.bandwidth_hz, np.array([snr]))[0]
            down_bits += r["down_s"] * rec["down_rate_bps"]
        assert up_bits / 8 == pytest.approx(client["uplink_bytes"], rel=1e-9)
        assert down_bits / 8 == pytest.approx(client["downlink_bytes"], rel=1e-9)
        assert sum(r["compute_s"] for _, r in rows) * device.flops_per_s == pytest.approx(client["flops"], rel=1e-9)
    for client in summary["clients"]:
        rows = [r for rec in lines[1:] for r in rec["sim_clients"] if r["client"] == client["id"]]
        assert client["comm_s"] == pytest.approx(sum(r["comm_s"] for r in rows), rel=1e-12)
        assert client["compute_s"] == pytest.approx(sum(r["compute_s"] for r in rows), rel=1e-12)
        assert client["energy_j"] > 0
    assert summary["network"]["planner"] == "jcpba" and summary["stragglers"] == 0


def test_resumed_run_has_the_same_simulated_time(network_run, tmp_path):
    cfg, out, _ = network_run
    short = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 1})})
    Runner(short, tmp_path / "r").run()
    Runner(cfg, tmp_path / "r").run(resume=True)
    assert [r["sim_s"] for r in _lines(tmp_path / "r")] == [r["sim_s"] for r in _lines(out)]


def test_no_network_means_zero_simulated_time(tmp_path, tiny_config):
    summary = Runner(tiny_config("federation.rounds=1"), tmp_path / "n").run()
    assert summary["time"]["simulated_s"] == 0.0 and "network" not in summary
    assert [r["sim_s"] for r in _lines(tmp_path / "n")] == [0.0, 0.0]


def test_clients_missing_the_deadline_are_dropped_and_counted(tmp_path, tiny_config, monkeypatch):
    from fedtune.federated.strategies import STRATEGIES

    fedavg = STRATEGIES.get("fedavg")
    aggregated: list[list[int]] = []
    real = fedavg.aggregate

    def spy(self, global_state, updates):
        aggregated.append(sorted(u.client for u in updates))
        return real(self, global_state, updates)

    monkeypatch.setattr(fedavg, "aggregate", spy)
    # client 0 is 2.1 km away and power-limited: its upload takes 1.17 s on a third of the band and 1.13 s on all
    # of it, so it is within reach of a 1.15 s deadline (it is asked) but misses it under equal shares; the others
    # take milliseconds
    cfg = tiny_config("network.planner=equal", "network.fading=none", "network.distances_m=[2100, 30, 30]",
                      "network.rho_max=0", "network.deadline_s=1.15", "federation.rounds=2")
    summary = Runner(cfg, tmp_path / "d").run()
    lines = _lines(tmp_path / "d")
    for rec in lines[1:]:
        assert {"client": 0, "reason": "straggler"} in rec["rejected"] and rec["left_out"] == 0
        assert rec["stragglers"] == 1 and rec["sim_s"] == 1.15
        rows = {r["client"]: r for r in rec["sim_clients"]}
        assert rows[0]["straggler"] and rows[0]["finish_s"] > 1.15
        assert not rows[1]["straggler"] and rows[1]["finish_s"] < 0.1
    assert aggregated == [[1, 2], [1, 2]]
    assert summary["stragglers"] == 2 and summary["clients"][0]["stragglers"] == 2
    assert summary["rejected_updates"] == 2


def test_a_client_out_of_reach_of_the_deadline_is_left_out_before_the_round(tmp_path, tiny_config, capsys):
    from fedtune.engine.plan_table import planning_network
    from fedtune.network.simtime import planning_problem

    # client 0 is 30 km away: even alone on the whole band its upload takes far longer than the 1 s deadline
    sets = ("network.planner=jcpba", "network.fading=none", "network.distances_m=[30000, 30, 30]",
            "network.deadline_s=1.0", "federation.rounds=1")
    cfg = tiny_config(*sets)
    sim = planning_network(cfg)
    rp = sim.plan(1)
    assert rp.left_out == [0] and rp.clients == [1, 2] and rp.plan.latency_s < 1.0
    # planned with it, JCPBA gives it the band and every client misses the deadline
    everyone, _ = planning_problem(cfg, sim.channel, sim.channel.draw(1, [0, 1, 2]), sim.workload, sim.profiles)
    assert np.all(PLANNERS.get("jcpba")(everyone).finish_s > 1.0)
    summary = Runner(cfg, tmp_path / "o").run()
    rec = _lines(tmp_path / "o")[1]
    assert rec["clients"] == [1, 2] and rec["rejected"] == [{"client": 0, "reason": "out_of_reach"}]
    assert rec["left_out"] == 1 and rec["stragglers"] == 0
    assert 0 < rec["sim_s"] < 1.0  # the server does not wait for a client it left out
    assert [r["client"] for r in rec["sim_clients"]] == [1, 2]
    c0 = summary["clients"][0]
    assert c0["uplink_bytes"] == c0["downlink_bytes"] == 0 and c0["rounds_trained"] == 0
    assert summary["network"]["left_out"] == 1 and summary["stragglers"] == 0
    # without a deadline nobody is left out
    assert planning_network(tiny_config(*sets[:3])).plan(1).left_out == []
    assert main(["plan", str(TINY), *(x for kv in sets for x in ("--set", kv))]) == 0
    assert "left out of the round" in capsys.readouterr().out


def test_plan_command_prints_the_table_without_training(capsys, tmp_path):
    assert main(["plan", str(TINY), "--set", "network.planner=jcpba", "--set",
                 "devices.profiles=['phone', 'jetson', 'laptop']", "--round", "2"]) == 0
    out = capsys.readouterr().out
    for text in ("round 2", "phone", "jetson", "share", "rho", "comp s", "comm s", "jcpba *", "equal",
                 "pruning_only", "bandwidth_only", "uniform_pruning", "* the configured planner", "rho: pruning rate"):
        assert text in out, text
    from fedtune.engine.plan_table import _kept

    assert _kept(0.0, "adapter bytes") == "all of its adapter bytes (pruning removes none of them)"
    assert _kept(0.353, "FLOPs") == "1 - 0.353 rho of its FLOPs"
    assert main(["plan", str(TINY), "--set", "network.planner=fastest"]) == 2
    assert "unknown planner 'fastest'" in capsys.readouterr().err


def test_plan_command_matches_the_runs_plan(network_run):
    from fedtune.engine.plan_table import plan_round

    cfg, out, _ = network_run
    _, rp, latencies = plan_round(cfg, round=1)
    rows = _lines(out)[1]["sim_clients"]
    np.testing.assert_allclose(rp.plan.share, [r["share"] for r in rows], rtol=1e-12)
    np.testing.assert_allclose(rp.plan.rho, [r["rho"] for r in rows], rtol=1e-12, atol=1e-15)
    assert latencies["jcpba"] == pytest.approx(_lines(out)[1]["planned_s"], rel=1e-12)
    assert latencies["jcpba"] <= min(latencies[n] for n in BASELINES) * (1 + cfg.network.latency_slack)


def test_the_planner_models_pruning_with_the_costs_of_the_pruned_models_the_run_trained(network_run):
    """Workload cuts are fitted on weightless pruned copies before training; the run measures the real ones."""
    from fedtune.engine.plan_table import planning_network

    cfg, _, summary = network_run
    w = planning_network(cfg).workload
    assert 0.3 < w.bytes_cut < 0.9 and 0.3 < w.compute_cut < 1.0  # far from the textbook 1 - rho
    by_rate = summary["pruning"]["by_rate"]
    base = by_rate["0"]
    applied = [key for key in by_rate if float(key) > 0]
    assert applied
    for key in applied:
        rate, pruned = float(key), by_rate[key]
        assert pruned["adapter_bytes"] / base["adapter_bytes"] == pytest.approx(1 - w.bytes_cut * rate, abs=0.05)
        flops = pruned["train_flops_per_token"] / base["train_flops_per_token"]
        assert flops == pytest.approx(1 - w.compute_cut * rate, abs=0.05)


def _sim(*overrides, memory=1e7):
    from fedtune.config import load_config
    from fedtune.network.simtime import NetworkSim, default_profiles
    from fedtune.network.workload import Workload

    cfg = load_config(TINY, ["network.planner=jcpba", "federation.num_clients=5", *overrides])
    workload = Workload(flops=np.linspace(1e10, 5e10, 5), up_bytes=140_000, down_bytes=140_000, memory_bytes=memory)
    return NetworkSim(cfg, workload, default_profiles(cfg)[0])


def test_round_plans_cover_the_sampled_clients_and_depend_only_on_seed_and_round():
    a, b = _sim("federation.clients_per_round=3"), _sim("federation.clients_per_round=3")
    b.plan(4)  # call order does not matter
    for round in (1, 2, 3):
        pa, pb = a.plan(round), b.plan(round)
        assert len(pa.clients) == 3 and pa.clients == pb.clients
        np.testing.assert_array_equal(pa.plan.share, pb.plan.share)
        np.testing.assert_array_equal(pa.plan.rho, pb.plan.rho)
        assert a.pruning_rates(round) == dict(zip(pa.clients, pa.plan.rho.tolist()))
    assert a.plan(1).channel.gain.tolist() != a.plan(2).channel.gain.tolist() or a.plan(1).clients != a.plan(2).clients


def test_a_device_that_cannot_fit_the_model_stops_the_run_before_training():
    from fedtune.network.planner import PlanError

    with pytest.raises(PlanError, match=r"must prune 0.67 .* network.rho_max = 0.5"):
        _sim("devices.profiles=['phone']", memory=3e9)  # 1 GB phones, 3 GB to train
    plan = _sim("devices.profiles=['phone', 'laptop', 'laptop', 'laptop', 'laptop']", memory=1.5e9).plan(1)
    assert plan.plan.rho[0] >= 1 - 1 / 1.5 - 1e-12  # the phone prunes at least a third
