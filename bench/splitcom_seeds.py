"""SplitCom over several seeds or data sets: one row per ``bench/splitcom_bench.py`` output directory.

A task metric on a few dozen held-out prompts moves by a point or more from one seed to the next (the seed redraws
the samples, the partition, the LoRA initialisation and the data order), so the issue-20 bounds are judged on the
spread, not on one draw. This script reads the ``result.json`` each bench run wrote and prints, per shape and
compressed variant, one row per directory (reduction, eval loss against that directory's own vanilla, BLEU and
ROUGE-L against vanilla's) and then the mean, the range and the number of runs within every bound.

    python bench/splitcom_bench.py --variants vanilla,shipped                                  # seed 0
    python bench/splitcom_bench.py --variants vanilla,shipped --set seed=1 --out bench/out/splitcom-seed1
    python bench/splitcom_seeds.py bench/out/splitcom bench/out/splitcom-seed1                 # -> stdout and --out
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tomllib
from pathlib import Path
from typing import Any

from splitcom_bench import LOSS_TOLERANCE_PCT, METRIC_TOLERANCE_POINTS, TARGETS


def _seed(result: dict[str, Any]) -> Any:
    """The run's seed: recorded by the bench, else read from a run directory's config.toml."""
    if "seed" in result:
        return result["seed"]
    for shape in result["shapes"].values():
        for row in shape["rows"]:
            path = Path(row["run_dir"]) / "config.toml"
            if path.is_file():
                return tomllib.loads(path.read_text()).get("seed")
    return None


def rows_of(run: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (shape, compressed variant) of a bench run, against that run's vanilla."""
    out = []
    for shape, res in result["shapes"].items():
        key, _, target = TARGETS[shape]
        by_name = {r["variant"]: r for r in res["rows"] if r["status"] != "failed"}
        vanilla = by_name.get("vanilla")
        if vanilla is None:
            continue
        v = vanilla["metrics"]
        for name, r in by_name.items():
            if name == "vanilla" or r.get(key) is None:
                continue
            m = r["metrics"]
            d_bleu = m["bleu"] - v["bleu"] if "bleu" in m and "bleu" in v else None
            d_rouge = m["rougeL"] - v["rougeL"] if "rougeL" in m and "rougeL" in v else None
            row = {"run": run, "seed": _seed(result), "data": result.get("data", "?"), "shape": shape,
                   "variant": name, "reduction_pct": r[key] * 100, "loss_pct": r["loss_vs_vanilla_pct"],
                   "d_bleu": d_bleu, "d_rouge": d_rouge, "vanilla_bleu": v.get("bleu"), "target_pct": target}
            row["within"] = (row["reduction_pct"] >= target and row["loss_pct"] <= LOSS_TOLERANCE_PCT
                             and all(d is None or d >= -METRIC_TOLERANCE_POINTS for d in (d_bleu, d_rouge)))
            out.append(row)
    return out


def _f(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _spread(values: list[float | None], spec: str) -> str:
    vs = [v for v in values if v is not None]
    if not vs:
        return "—"
    return f"{format(statistics.mean(vs), spec)} ({format(min(vs), spec)} to {format(max(vs), spec)})"


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for shape, variant in dict.fromkeys((r["shape"], r["variant"]) for r in rows):
        group = [r for r in rows if r["shape"] == shape and r["variant"] == variant]
        key, label, target = TARGETS[shape]
        lines += ["", f"### {shape}: {variant} ({label}, target {target:g} %)", "",
                  f"| run | data | seed | {label} % | eval loss vs vanilla | BLEU vs vanilla (vanilla's) | "
                  "ROUGE-L vs vanilla | within every bound |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in group:
            lines.append(f"| {r['run']} | {r['data']} | {r['seed']} | {r['reduction_pct']:.2f} | "
                         f"{_f(r['loss_pct'], '+.2f')} % | {_f(r['d_bleu'], '+.2f')} ({_f(r['vanilla_bleu'], '.2f')})"
                         f" | {_f(r['d_rouge'], '+.2f')} | {'yes' if r['within'] else 'no'} |")
        lines.append(f"| mean (range) | | | {_spread([r['reduction_pct'] for r in group], '.2f')} | "
                     f"{_spread([r['loss_pct'] for r in group], '+.2f')} % | "
                     f"{_spread([r['d_bleu'] for r in group], '+.2f')} | "
                     f"{_spread([r['d_rouge'] for r in group], '+.2f')} | "
                     f"{sum(r['within'] for r in group)} of {len(group)} |")
    lines += ["", f"Bounds: the reduction at its target, eval loss at most {LOSS_TOLERANCE_PCT:g} % above vanilla's, "
              f"BLEU and ROUGE-L at most {METRIC_TOLERANCE_POINTS:g} point below vanilla's (each run against its own "
              "vanilla)."]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="splitcom_bench.py output directories")
    parser.add_argument("--out", type=Path, default=Path("bench/out/splitcom-seeds.md"))
    args = parser.parse_args()
    rows = []
    for d in args.dirs:
        path = d / "result.json"
        if not path.is_file():
            parser.error(f"{path}: not found (run bench/splitcom_bench.py --out {d} first)")
        rows += rows_of(d.name, json.loads(path.read_text()))
    lines = table(rows)
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# SplitCom over seeds and data sets\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
