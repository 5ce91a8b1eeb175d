"""JCPBA vs equal bandwidth over several seeds: one row per ``bench/jcpba_bench.py`` output directory.

Each seed redraws the partition, the channels' fading, the LoRA initialisation and the data order, so one seed's
verdict can hang on one unlucky round (a deep fade). This script reads the ``result.json`` each bench run wrote
and prints, per directory (in the order given): the target eval loss, simulated seconds to it for ``equal`` and
``jcpba``, the reduction, the round at which each reached it, final eval losses, whether the goal (> 40 % less time
at equal or lower eval loss) was met, and the reduction to each of equal's per-round losses (one target is one point
of that curve); then the median and the count of runs that met the goal.

    python bench/jcpba_bench.py --target-round 5                                   # seed 0 -> bench/out/jcpba
    python bench/jcpba_bench.py --set seed=1 --planners jcpba,equal --target-round 5 --out bench/out/jcpba-seed1
    python bench/jcpba_seeds.py bench/out/jcpba bench/out/jcpba-seed1               # -> stdout and --out
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from fedtune.report.comparison import simulated_to_target


def first_round_at(records: list[dict], target: float) -> int | None:
    """Round of the first evaluation at or below ``target`` (None: never)."""
    hits = [r["round"] for r in sorted(records, key=lambda r: r["round"])
            if r.get("eval_loss") is not None and r["eval_loss"] <= target]
    return hits[0] if hits else None


def less_at_each_loss(j: dict, e: dict) -> list[float | None]:
    """For each round r of equal: % less simulated time for JCPBA to reach equal's eval loss after round r (None:
    JCPBA never did). One target loss is one point of this curve; the curve shows how much the verdict hangs on it."""
    by_round = lambda records: sorted(records, key=lambda r: r["round"])  # noqa: E731
    out, e_s = [], 0.0
    for rec in by_round(e["records"]):
        e_s += rec["sim_s"]
        if rec["round"] == 0 or rec.get("eval_loss") is None:
            continue
        j_s = simulated_to_target(by_round(j["records"]), rec["eval_loss"])
        out.append(None if j_s is None or not e_s else (1 - j_s / e_s) * 100)
    return out


def seed_row(result: dict) -> dict:
    rows = {r["planner"]: r for r in result["rows"]}
    if "jcpba" not in rows or "equal" not in rows:
        raise SystemExit(f"seed {result.get('seed')}: the bench ran {sorted(rows)}; jcpba and equal are both needed")
    j, e, target = rows["jcpba"], rows["equal"], result["target_loss"]
    less = j["less_to_target_pct"]
    return {
        "seed": result.get("seed"), "target": target, "target_from": result["target_from"],
        "equal_s": e["to_target_s"], "jcpba_s": j["to_target_s"], "less_pct": less,
        "equal_round": first_round_at(e["records"], target), "jcpba_round": first_round_at(j["records"], target),
        "equal_final": e["final_eval_loss"], "jcpba_final": j["final_eval_loss"],
        "less_total_pct": j["less_total_pct"], "curve": less_at_each_loss(j, e),
        "met": less is not None and less > result["goal_pct"] and j["final_eval_loss"] <= e["final_eval_loss"],
    }


def _f(x, spec: str, none: str = "—") -> str:
    return none if x is None else format(x, spec)


def table(rows: list[dict], goal: float) -> list[str]:
    lines = ["| run | seed | target eval loss | equal: s to target (round) | jcpba: s to target (round) | less time | "
             "final eval loss equal / jcpba | less time (all rounds) | goal met | less time to equal's loss after "
             "round 1, 2, ... |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['seed']} | {r['target']:.4f} | {_f(r['equal_s'], '.1f')} ({r['equal_round']}) | "
            f"{_f(r['jcpba_s'], '.1f', 'not reached')} ({_f(r['jcpba_round'], 'd')}) | {_f(r['less_pct'], '.1f')} % | "
            f"{r['equal_final']:.4f} / {r['jcpba_final']:.4f} | {_f(r['less_total_pct'], '.1f')} % | "
            f"{'yes' if r['met'] else 'no'} | {' / '.join(_f(x, '.0f') for x in r['curve'])} |")
    less = [r["less_pct"] for r in rows if r["less_pct"] is not None]
    lines += ["", f"Goal: > {goal:.0f} % less simulated time to the target than equal, at equal or lower final eval "
              f"loss. Met in {sum(r['met'] for r in rows)} of {len(rows)} runs"
              + (f"; median reduction {statistics.median(less):.1f} % (range {min(less):.1f} to {max(less):.1f} %)."
                 if less else ".")]
    return [line.replace("— %", "—") for line in lines]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="jcpba_bench.py output directories (one per seed)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/jcpba-seeds.md"))
    args = parser.parse_args()
    results = []
    for d in args.dirs:
        path = d / "result.json"
        if not path.is_file():
            parser.error(f"{path}: not found (run bench/jcpba_bench.py --out {d} first)")
        results.append(json.loads(path.read_text()))
    rows = [{"run": d.name, **seed_row(r)} for d, r in zip(args.dirs, results)]
    lines = table(rows, results[0]["goal_pct"])
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# JCPBA over seeds\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
