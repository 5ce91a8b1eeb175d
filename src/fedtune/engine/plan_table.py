"""``fedtune plan``: one round's plan, per client, and every planner's latency, without training."""

from __future__ import annotations

import tempfile
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from fedtune.core.progress import RunProgress
from fedtune.engine.context import build_context
from fedtune.network.planner import PLANNERS
from fedtune.network.simtime import NetworkSim, RoundPlan


def planning_network(cfg) -> NetworkSim:
    """The simulated network a run of ``cfg`` would plan with, built without training or weights (a weightless
    context: the model on the meta device, the data partitioned as the run would)."""
    with tempfile.TemporaryDirectory(prefix="fedtune-plan-") as tmp:
        return build_context(cfg, RunProgress(False), Path(tmp), weightless=True).network


def plan_round(cfg, round: int = 1) -> tuple[NetworkSim, RoundPlan, dict[str, float]]:
    """The network of a run of ``cfg`` (:func:`planning_network`), its plan for ``round``, and the latency of that
    round under every planner."""
    sim = planning_network(cfg)
    rp = sim.plan(round)
    latencies = {name: PLANNERS.get(name)(rp.problem).latency_s for name in PLANNERS.names()}
    return sim, rp, latencies


def _s(x: float) -> str:
    return f"{x:.3g}"


def _kept(cut: float, what: str) -> str:
    """What a client pruned at rate rho keeps of ``what``: ``1 - cut rho`` of it, or all when pruning spares it."""
    if cut <= 0:
        return f"all of its {what} (pruning removes none of them)"
    return f"1 - {cut:.3f} rho of its {what}"


def print_plan(cfg, round: int, console: Console) -> None:
    sim, rp, latencies = plan_round(cfg, round)
    net, w, plan = cfg.network, sim.workload, rp.plan
    console.print(f"[bold]round {round}[/]: {len(rp.clients)} clients, planner [bold]{net.planner}[/], "
                  f"band {net.bandwidth_hz / 1e6:g} MHz, {net.fading} fading, downlink broadcast "
                  f"{rp.down_rate_bps / 1e6:.3g} Mbit/s")
    console.print(f"nominal round per client (unpruned): adapter {w.up_bytes / 1e6:.3g} MB up and down, "
                  f"{w.flops.max() / 1e12:.3g} TFLOP, training memory {w.memory_bytes / 1e9:.3g} GB")
    if sim.prunes and net.rho_max > 0:
        console.print(f"pruned at rate rho, a client keeps {_kept(w.compute_cut, 'FLOPs')} and "
                      f"{_kept(w.bytes_cut, 'adapter bytes')} (measured on pruned copies of the model); "
                      f"latency slack {net.latency_slack:g}")
    table = Table(title=f"plan ({net.planner})", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  caption="share: of the band; rho: pruning rate (0 = the whole model); seconds of this round")
    for col in ("client", "device", "dist m", "gain dB", "share", "rho", "comp s", "comm s", "finish s"):
        table.add_column(col, justify="left" if col == "device" else "right", no_wrap=True)
    for i, cid in enumerate(rp.clients):
        table.add_row(str(cid), sim.profiles[cid].name, f"{rp.channel.distance_m[i]:.0f}",
                      f"{rp.channel.gain_db[i]:.1f}", f"{plan.share[i]:.3f}", f"{plan.rho[i]:.3f}",
                      _s(plan.compute_s[i]), _s(plan.comm_s[i]), _s(plan.finish_s[i]))
    console.print(table)
    if rp.left_out:
        console.print(f"left out of the round (cannot meet network.deadline_s = {net.deadline_s:g} s even alone on "
                      f"the whole band): client{'s' if len(rp.left_out) > 1 else ''} "
                      f"{', '.join(map(str, rp.left_out))}")
    ref = latencies.get("equal")
    summary = Table(title="round latency by planner", box=box.SIMPLE_HEAD,
                    caption=f"* the configured planner (network.planner = {net.planner!r})")
    summary.add_column("planner")
    summary.add_column("latency s", justify="right")
    summary.add_column("vs equal", justify="right")
    for name, latency in sorted(latencies.items(), key=lambda kv: kv[1]):
        mark = " *" if name == net.planner else ""
        summary.add_row(name + mark, _s(latency), f"{(latency / ref - 1) * 100:+.1f} %" if ref else "")
    console.print(summary)
