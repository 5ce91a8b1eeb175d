"""JCPBA vs its baselines: simulated wall-clock time of FedLLM over a heterogeneous wireless network.

Runs FedLLM once per planner (``network.planner`` = jcpba, equal, bandwidth_only, pruning_only, uniform_pruning)
on the same model, data, partition, channels and seed, through ``fedtune.engine.compare`` (so an interrupted bench
resumes and finished runs are reused). FedLLM applies each plan's pruning rates to the clients' models, so the
FLOPs and bytes behind the simulated seconds are measured on the pruned models.

Per planner: total simulated seconds, simulated seconds to reach the target eval loss (cumulative ``sim_s`` in
``metrics.jsonl`` at the first evaluation with ``eval_loss <= target``; target = the 'equal' planner's final eval
loss unless ``--target-loss``), final eval loss, bytes, client FLOPs, stragglers, and the reduction vs 'equal'.
Target (from the source): more than 40 % less time than equal bandwidth without pruning, at equal or lower eval
loss. One markdown table goes to stdout, ``OUT/results.md`` and ``OUT/result.json``.

    python bench/jcpba_bench.py                                   # configs/jcpba.toml -> bench/out/jcpba
    python bench/jcpba_bench.py --set federation.rounds=3 --out bench/out/jcpba-3
    python bench/jcpba_bench.py --config configs/tiny.toml --set "devices.profiles=['phone','jetson','laptop']"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from fedtune.config import load_config
from fedtune.engine.compare import ComparisonPlan, Sweep, run_comparison
from fedtune.network.planner import PLANNERS
from fedtune.report.comparison import simulated_to_target
from fedtune.report.render import read_metrics

PLANNER_NAMES = ("jcpba", "equal", "bandwidth_only", "pruning_only", "uniform_pruning")
REFERENCE = "equal"
GOAL = 40.0  # % less simulated time than 'equal' (to the target loss)


# ---------------------------------------------------------------------------------------------
# The plan, before any training


def planned(cfg, planners: tuple[str, ...], show_round: int) -> tuple[list[str], dict]:
    """Markdown lines of round ``show_round``'s JCPBA plan per client and every planner's planned latency per round
    (nominal workload, model on the meta device), and the same numbers as data."""
    from fedtune.engine.plan_table import planning_network

    sim = planning_network(cfg)
    w = sim.workload
    rounds = list(range(1, cfg.federation.rounds + 1))
    per_round = {name: [] for name in planners}
    textbook = []  # JCPBA under the source's model of pruning: 1 - rho of the FLOPs and of the bytes
    shown = None
    for r in rounds:
        rp = sim.plan(r)
        for name in planners:
            plan = PLANNERS.get(name)(rp.problem)
            per_round[name].append(plan.latency_s)
            if r == show_round and name == "jcpba":
                shown = (rp, plan)
        textbook.append(PLANNERS.get("jcpba")(replace(rp.problem, compute_cut=1.0, bytes_cut=1.0)).latency_s)
    lines = [f"Nominal round per client (unpruned): adapter {w.up_bytes / 1e6:.2f} MB up and down, "
             f"{w.flops.max() / 1e12:.3g} TFLOP, training memory {w.memory_bytes / 1e9:.3g} GB; "
             f"band {cfg.network.bandwidth_hz / 1e6:g} MHz, {cfg.network.fading} fading, "
             f"rho_max {cfg.network.rho_max}, mean rho budget {cfg.network.mean_rho_budget}, latency slack "
             f"{cfg.network.latency_slack:g}. Pruned at rate rho, a client keeps 1 - {w.compute_cut:.3f} rho of its "
             f"FLOPs and 1 - {w.bytes_cut:.3f} rho of its adapter bytes (measured).", ""]
    if shown is not None:
        rp, plan = shown
        lines += [f"JCPBA plan of round {show_round} (downlink broadcast {rp.down_rate_bps / 1e6:.3g} Mbit/s):", "",
                  "| client | device | dist m | gain dB | share | rho | compute s | comm s | finish s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for i, cid in enumerate(rp.clients):
            lines.append(f"| {cid} | {sim.profiles[cid].name} | {rp.channel.distance_m[i]:.0f} | "
                         f"{rp.channel.gain_db[i]:.1f} | {plan.share[i]:.3f} | {plan.rho[i]:.3f} | "
                         f"{plan.compute_s[i]:.3g} | {plan.comm_s[i]:.3g} | {plan.finish_s[i]:.3g} |")
        lines.append("")
    ref = per_round.get(REFERENCE)
    lines += ["Planned round latency (s) by planner, per round and in total:", "",
              "| planner | " + " | ".join(f"round {r}" for r in rounds) + " | total | vs equal |",
              "|---|" + "---|" * (len(rounds) + 2)]
    for name in sorted(planners, key=lambda n: sum(per_round[n])):
        total = sum(per_round[name])
        vs = f"{(total / sum(ref) - 1) * 100:+.1f} %" if ref else "—"
        lines.append(f"| {name} | " + " | ".join(f"{x:.3g}" for x in per_round[name]) + f" | {total:.4g} | {vs} |")
    if ref:
        lines += ["", f"Under the source's model of pruning (a client pruned at rho keeps 1 - rho of its FLOPs and "
                  f"of its adapter bytes, instead of the measured 1 - {w.compute_cut:.3f} rho and "
                  f"1 - {w.bytes_cut:.3f} rho) JCPBA would plan {(1 - sum(textbook) / sum(ref)) * 100:.1f} % less "
                  f"time than equal over these rounds (round latencies {', '.join(f'{x:.3g}' for x in textbook)})."]
    return lines, {"per_round_s": per_round, "jcpba_textbook_per_round_s": textbook, "adapter_bytes": w.up_bytes,
                   "round_tflop": float(w.flops.max() / 1e12), "compute_cut": w.compute_cut, "bytes_cut": w.bytes_cut}


# ---------------------------------------------------------------------------------------------
# What the runs measured


def seconds_to_target(records: list[dict], target: float) -> float | None:
    """Cumulative simulated seconds at the first evaluation with eval loss <= ``target`` (None: never)."""
    return simulated_to_target(sorted(records, key=lambda r: r["round"]), target)


def row_of(planner: str, summary: dict, records: list[dict]) -> dict:
    rates = [r for rec in records for r in (rec.get("pruning_rates") or [0.0] * len(rec.get("clients") or []))]
    return {
        "planner": planner,
        "initial_eval_loss": summary["initial"]["eval_loss"],
        "final_eval_loss": summary["final"]["eval_loss"],
        "simulated_s": summary["time"]["simulated_s"],
        "planned_s": summary.get("network", {}).get("planned_s"),
        "sim_s_per_round": [rec.get("sim_s") or 0.0 for rec in sorted(records, key=lambda r: r["round"])
                            if rec["round"] > 0],
        "eval_loss_per_round": [rec.get("eval_loss") for rec in sorted(records, key=lambda r: r["round"])],
        "train_loss_per_round": [rec.get("train_loss") for rec in sorted(records, key=lambda r: r["round"])
                                 if rec["round"] > 0],
        "uplink_bytes": summary["comm"]["uplink_bytes"],
        "downlink_bytes": summary["comm"]["downlink_bytes"],
        "client_flops": summary["compute"]["client_flops"],
        "energy_j": summary.get("network", {}).get("energy_j"),
        "stragglers": summary.get("stragglers", 0),
        "mean_rho": sum(rates) / len(rates) if rates else 0.0,
        "max_rho": max(rates, default=0.0),
        "wall_s": summary["time"]["wall_s"],
        "by_rate": summary.get("pruning", {}).get("by_rate", {}),
        "records": [{"round": rec["round"], "eval_loss": rec.get("eval_loss"), "sim_s": rec.get("sim_s") or 0.0}
                    for rec in records],
    }


def pct_less(value: float | None, ref: float | None) -> float | None:
    if value is None or not ref:
        return None
    return (1.0 - value / ref) * 100.0


def _f(x, spec: str, none: str = "—") -> str:
    return none if x is None else format(x, spec)


def _quote(text: str) -> str:
    return text if all(ch.isalnum() or ch in "._=-/" for ch in text) else '"' + text.replace('"', '\\"') + '"'


def _s(x: float | None, none: str = "—") -> str:
    """Seconds: one decimal from 10 s up, else three significant digits."""
    return none if x is None else f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


def results_table(rows: list[dict], target: float) -> list[str]:
    lines = [f"'to target' = simulated seconds until the first evaluation at or below eval loss {target:.4f}; "
             "'less than equal' = reduction vs the equal-bandwidth, no-pruning baseline (negative: more time).", "",
             "| planner | final eval loss | sim s to target | less than equal (to target) | total sim s | "
             "less than equal (total) | planned s | mean / max rho | uplink MB | downlink MB | client TFLOP | "
             "energy J | stragglers |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['planner']} | {r['final_eval_loss']:.4f} | {_s(r['to_target_s'], 'not reached')} | "
            f"{_f(r['less_to_target_pct'], '.1f')} % | {_s(r['simulated_s'])} | {_f(r['less_total_pct'], '.1f')} % | "
            f"{_s(r['planned_s'])} | {r['mean_rho']:.2f} / {r['max_rho']:.2f} | {r['uplink_bytes'] / 1e6:.1f} | "
            f"{r['downlink_bytes'] / 1e6:.1f} | {r['client_flops'] / 1e12:.2f} | {_f(r['energy_j'], '.1f')} | "
            f"{r['stragglers']} |")
    return [line.replace("— %", "—") for line in lines]


def measured_shrink(by_rate: dict, compute_cut: float, bytes_cut: float) -> list[dict]:
    """Per applied rate: measured adapter bytes and training FLOPs per token relative to rate 0, and the planner's
    model of them (``1 - cut * rho``, the cuts fitted on pruned copies before training)."""
    base = by_rate.get("0")
    if not base:
        return []
    out = []
    for key, v in sorted(by_rate.items(), key=lambda kv: float(kv[0])):
        rate = float(key)
        if rate == 0:
            continue
        out.append({"rho": rate, "model_bytes": 1 - bytes_cut * rate, "model_flops": 1 - compute_cut * rate,
                    "bytes": v["adapter_bytes"] / base["adapter_bytes"],
                    "flops": v["train_flops_per_token"] / base["train_flops_per_token"]})
    return out


def verdict(rows: dict[str, dict], target: float, cuts: tuple[float, float]) -> list[str]:
    j, e = rows.get("jcpba"), rows.get(REFERENCE)
    if j is None or e is None:
        return ["(jcpba or equal not run: no verdict)"]
    lines = []
    cut = j["less_to_target_pct"]
    loss_ok = j["final_eval_loss"] <= e["final_eval_loss"]
    met = cut is not None and cut > GOAL
    if j["to_target_s"] is None:
        lines.append(f"**Target MISSED**: JCPBA never reached the target eval loss {target:.4f} "
                     f"(its final eval loss {j['final_eval_loss']:.4f} vs equal's {e['final_eval_loss']:.4f}).")
    else:
        lines.append(f"**Target {'met' if met else 'MISSED'}**: JCPBA reached eval loss {target:.4f} in "
                     f"{_s(j['to_target_s'])} simulated s vs equal's {_s(e['to_target_s'])} s: "
                     f"{cut:.1f} % less time (goal > {GOAL:.0f} %"
                     + ("" if met else f"; missed by {GOAL - cut:.1f} points") + "). "
                     f"Total over all rounds: {_f(j['less_total_pct'], '.1f')} % less. Final eval loss "
                     f"{j['final_eval_loss']:.4f} vs equal's {e['final_eval_loss']:.4f} "
                     f"({'equal or lower' if loss_ok else 'higher'}).")
    # the converse at equal loss: how long equal took to reach the loss JCPBA ended at
    e_at_j = seconds_to_target(e["records"], j["final_eval_loss"])
    if e_at_j:
        lines.append(f"At JCPBA's own final eval loss ({j['final_eval_loss']:.4f}): JCPBA {_s(j['simulated_s'])} s, "
                     f"equal first at or below it after {_s(e_at_j)} s = "
                     f"{pct_less(j['simulated_s'], e_at_j):.1f} % less time for JCPBA.")
    # what was planned vs what was measured
    if j["planned_s"] and e["planned_s"]:
        lines.append(f"Planned (nominal workload; a pruned client keeps 1 - {cuts[0]:.3f} rho of its FLOPs and "
                     f"1 - {cuts[1]:.3f} rho of its adapter bytes): JCPBA "
                     f"{_s(j['planned_s'])} s vs equal {_s(e['planned_s'])} s = "
                     f"{pct_less(j['planned_s'], e['planned_s']):.1f} % less; measured: "
                     f"{_s(j['simulated_s'])} s vs {_s(e['simulated_s'])} s = {j['less_total_pct']:.1f} % less. "
                     f"Measured / planned seconds: JCPBA {j['simulated_s'] / j['planned_s']:.3f}, "
                     f"equal {e['simulated_s'] / e['planned_s']:.3f}.")
    shrink = measured_shrink(j["by_rate"], *cuts)
    if shrink:
        top = max(shrink, key=lambda s: s["rho"])
        mean_b = sum(s["bytes"] / s["model_bytes"] for s in shrink) / len(shrink)
        mean_f = sum(s["flops"] / s["model_flops"] for s in shrink) / len(shrink)
        lines.append(f"Measured on the pruned models JCPBA applied ({len(shrink)} distinct rates): at rho "
                     f"{top['rho']:.3g} the adapter (upload and download) is {top['bytes']:.3f} of full size (planned "
                     f"{top['model_bytes']:.3f}; 1 - rho would be {1 - top['rho']:.3f}) and the training FLOPs per "
                     f"token {top['flops']:.3f} (planned {top['model_flops']:.3f}); over all applied rates bytes are "
                     f"{mean_b:.3f}x and FLOPs {mean_f:.3f}x the planner's model.")
    lines.append("Eval loss after each round (round 0 = before training): " + "; ".join(
        f"{name} {' '.join(_f(x, '.3f') for x in r['eval_loss_per_round'])}" for name, r in rows.items())
        + ". Mean client training loss in round 1 (measured on each client's own, possibly pruned, model): "
        + ", ".join(f"{name} {_f(r['train_loss_per_round'][0] if r['train_loss_per_round'] else None, '.2f')}"
                    for name, r in rows.items()) + ".")
    per_round = [(1 - a / b) * 100 for a, b in zip(j["sim_s_per_round"], e["sim_s_per_round"]) if b]
    if per_round:
        lines.append("Per-round measured reduction vs equal: " + ", ".join(f"{x:.1f} %" for x in per_round)
                     + f" (round seconds JCPBA {', '.join(_s(x) for x in j['sim_s_per_round'])}; equal "
                     f"{', '.join(_s(x) for x in e['sim_s_per_round'])}).")
    return lines


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/jcpba.toml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="bench/out/jcpba")
    parser.add_argument("--target-loss", type=float, default=None,
                        help="eval loss to reach (default: the 'equal' planner's eval loss after --target-round)")
    parser.add_argument("--target-round", type=int, default=None,
                        help="round whose 'equal' eval loss is the target (default: its last round)")
    parser.add_argument("--planners", default=",".join(PLANNER_NAMES), help="comma-separated (default: all five)")
    parser.add_argument("--plan-round", type=int, default=1, help="round whose JCPBA plan is printed per client")
    args = parser.parse_args()

    started = time.perf_counter()
    planners = tuple(p.strip() for p in args.planners.split(",") if p.strip())
    out = Path(args.out)
    overrides = [*args.set, "runtime.progress=false"]
    console = Console(stderr=True)

    # 1. the plan alone (no training): JCPBA must plan clearly below 'equal' for this device mix
    cfg = load_config(args.config, [*overrides, "paradigm=fedllm", "network.planner=jcpba"])
    plan_lines, plan_data = planned(cfg, planners, args.plan_round)
    print("\n".join(["## Plan (no training)", "", *plan_lines, ""]), flush=True)

    # 2. the runs: one FedLLM run per planner, resumable
    plan = ComparisonPlan(config=args.config, paradigms=["fedllm"], overrides=overrides,
                          sweeps=[Sweep("network.planner", planners)], baselines=False)
    run_comparison(plan, out, console)
    runs = {p: out / "runs" / plan.run_label("fedllm", {"network.planner": p}) for p in planners}
    summaries = {p: json.loads((d / "summary.json").read_text()) for p, d in runs.items()}
    metrics = {p: read_metrics(d / "metrics.jsonl") for p, d in runs.items()}

    # 3. the table
    rows = {p: row_of(p, summaries[p], metrics[p]) for p in planners}
    if args.target_loss is not None:
        target, target_from = args.target_loss, "given"
    elif REFERENCE in rows:
        losses = rows[REFERENCE]["eval_loss_per_round"]
        at = len(losses) - 1 if args.target_round is None else args.target_round
        if not 0 < at < len(losses):
            parser.error(f"--target-round {at}: the runs have rounds 1 to {len(losses) - 1}")
        target, target_from = losses[at], f"the equal planner's eval loss after round {at}"
    else:
        target, target_from = max(r["final_eval_loss"] for r in rows.values()), "the highest final eval loss"
    ref = rows.get(REFERENCE)
    for r in rows.values():
        r["to_target_s"] = seconds_to_target(metrics[r["planner"]], target)
    for r in rows.values():
        r["less_to_target_pct"] = pct_less(r["to_target_s"], ref["to_target_s"]) if ref else None
        r["less_total_pct"] = pct_less(r["simulated_s"], ref["simulated_s"]) if ref else None
    ordered = [rows[p] for p in planners]
    c = cfg
    setting = (f"{c.model.source} (LoRA r {c.lora.r}), FedLLM, {c.data.dataset} ({c.data.max_train_samples} train / "
               f"{c.data.max_eval_samples} eval samples, max_length {c.data.max_length}), "
               f"{c.federation.num_clients} clients ({c.federation.clients_per_round or c.federation.num_clients} "
               f"per round), devices {', '.join(c.devices.profiles)}; {c.federation.rounds} rounds x "
               f"{c.train.local_steps} local steps x batch {c.train.batch_size}; seed {c.seed}")
    cmd = "python bench/jcpba_bench.py" + "".join(f" --set {_quote(s)}" for s in args.set) + (
        f" --config {args.config}" if args.config != "configs/jcpba.toml" else "") + (
        f" --target-loss {args.target_loss}" if args.target_loss is not None else "") + (
        f" --target-round {args.target_round}" if args.target_round is not None else "")
    result_lines = ["## Results", "", f"`{cmd}`", "", setting + ".", "",
                    f"Target eval loss {target:.4f} ({target_from}).", "", *results_table(ordered, target), "",
                    *verdict(rows, target, (plan_data["compute_cut"], plan_data["bytes_cut"])), ""]
    print("\n".join(result_lines), flush=True)
    print(f"bench total {time.perf_counter() - started:.0f} s wall (runs reused where finished)")

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(["# JCPBA benchmark", "", *result_lines, "## Plan (no training)", "",
                                               *plan_lines, ""]))
    (out / "result.json").write_text(json.dumps({
        "args": vars(args), "seed": cfg.seed, "target_loss": target, "target_from": target_from, "goal_pct": GOAL,
        "met": bool(rows.get("jcpba", {}).get("less_to_target_pct") is not None
                    and rows["jcpba"]["less_to_target_pct"] > GOAL),
        "rows": ordered, "plan": plan_data, "runs": {p: str(d) for p, d in runs.items()},
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
