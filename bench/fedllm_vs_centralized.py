"""Centralized LoRA vs FedLLM on the same model, data and total samples, measured in one run.

Prints the eval loss of each and the wall-time ratio FedLLM / centralized (goal: <= 1.10).
Wall time is the round loop of each run (training + the same evaluations), measured by the runner.

    python bench/fedllm_vs_centralized.py                      # SmolLM2 demo config
    python bench/fedllm_vs_centralized.py --config configs/tiny.toml --set federation.rounds=5
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from fedtune.config import load_config
from fedtune.engine.runner import Runner


def run_once(config: str, overrides: list[str], paradigm: str, out: Path) -> dict:
    cfg = load_config(config, [*overrides, f"paradigm={paradigm}", "runtime.progress=false"])
    if out.exists():
        shutil.rmtree(out)
    return Runner(cfg, out).run()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=1, help="ABBA repeats (order alternates each repeat)")
    parser.add_argument("--out", default="bench/out/fedllm_vs_centralized")
    args = parser.parse_args()

    out = Path(args.out)
    results: dict[str, list[dict]] = {"fedllm": [], "centralized": []}
    started = time.perf_counter()
    for rep in range(args.repeats):
        order = ["fedllm", "centralized"] if rep % 2 == 0 else ["centralized", "fedllm"]
        for paradigm in order:
            summary = run_once(args.config, args.set, paradigm, out / f"{paradigm}-{rep}")
            results[paradigm].append(summary)

    def mean(paradigm: str, section: str, key: str) -> float:
        values = [s[section][key] for s in results[paradigm]]
        return sum(values) / len(values)

    rows = []
    for paradigm in ("centralized", "fedllm"):
        rows.append({
            "paradigm": paradigm,
            "initial_eval_loss": mean(paradigm, "initial", "eval_loss"),
            "final_eval_loss": mean(paradigm, "final", "eval_loss"),
            "wall_s": mean(paradigm, "time", "wall_s"),
            "uplink_bytes": mean(paradigm, "comm", "uplink_bytes"),
            "downlink_bytes": mean(paradigm, "comm", "downlink_bytes"),
            "client_flops": mean(paradigm, "compute", "client_flops"),
            "server_flops": mean(paradigm, "compute", "server_flops"),
        })
    ratio = rows[1]["wall_s"] / rows[0]["wall_s"]
    model = results["fedllm"][0]["model"]
    print(f"model: {model['name'] or model['source']} on {model['device']}; config {args.config} {' '.join(args.set)}")
    print(f"{'paradigm':<12} {'eval loss before':>16} {'after':>8} {'wall s':>8} {'uplink MB':>10} "
          f"{'downlink MB':>12} {'client TFLOP':>13} {'server TFLOP':>13}")
    for r in rows:
        print(f"{r['paradigm']:<12} {r['initial_eval_loss']:>16.4f} {r['final_eval_loss']:>8.4f} {r['wall_s']:>8.1f} "
              f"{r['uplink_bytes'] / 1e6:>10.2f} {r['downlink_bytes'] / 1e6:>12.2f} "
              f"{r['client_flops'] / 1e12:>13.3f} {r['server_flops'] / 1e12:>13.3f}")
    print(f"wall-time ratio fedllm / centralized: {ratio:.3f} (goal <= 1.10: {'met' if ratio <= 1.10 else 'MISSED'})")
    print(f"bench total {time.perf_counter() - started:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({"rows": rows, "ratio": ratio, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
