"""FedLLM's aggregation strategies against centralized training, under IID and strongly non-IID data.

On the comparison config's scale (configs/compare.toml: SmolLM2-135M-Instruct on E2E, 4 clients, 3 rounds x 3 local
steps x batch 8) every variant below trains on the same samples with the same seed, once per partition (IID, and
Dirichlet alpha 0.1 over restaurant names), each into its own run directory under --out/<partition>/<variant>:

    centralized          the reference: one model on all clients' samples, the same number of samples in all
    fedavg               sample-weighted mean of the adapters' A and B
    fedavg-product       the mean of each module's B.A, re-factorised to rank r by truncated SVD (exact LoRA mean)
    kept-optimizer       fedavg, each client keeping its AdamW state from one round to its next
    fedavgm              server momentum 0.9 at server lr 1
    server-lr-K          server lr K = the clients per round, no momentum: the clients' changes are summed,
                         not averaged (with small local steps, K clients' 3-step changes add up to what
                         centralized's 3K sequential steps do; the mean advances only as far as one client)
    server-lr-K+kept     server-lr-K with each client keeping its AdamW state (a fresh AdamW's first steps are
                         about lr x sign(gradient) on every coordinate: summed over K clients, that noise adds up)
    fedadam, fedyogi     adaptive server optimizers at their default server lr (0.01)
    scaffold             control variates correcting each local gradient by c - c_i

Goals (issue 21): the best FedLLM setting within 1.05 x centralized's eval loss under Dirichlet alpha 0.1 and
within 1.02 x under IID. A finished run directory of the same configuration is reused, a checkpointed one resumed.

    python bench/fedllm_strategies.py                                   # -> bench/out/fedllm-strategies
    python bench/fedllm_strategies.py --partitions dirichlet-0.1 --variants centralized,fedavg,server-lr-K
    python bench/fedllm_strategies.py --config configs/tiny.toml --out /tmp/strategies-tiny
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from variant_runs import Outcome, VariantRunner, add_run_arguments, labels_with, publish

from fedtune.config import load_config
from fedtune.core.errors import FedtuneError

PARTITIONS = {"iid": ["partition.method=iid"],
              "dirichlet-0.1": ["partition.method=dirichlet", "partition.alpha=0.1"]}
GOALS = {"iid": 1.02, "dirichlet-0.1": 1.05}  # FedLLM eval loss / centralized's, at most
MB = 1e6


def variant_sets(clients_per_round: int) -> dict[str, list[str]]:
    return {
        "centralized": ["paradigm=centralized"],
        "fedavg": ["paradigm=fedllm"],
        "fedavg-product": ["paradigm=fedllm", "federation.lora_aggregation=product"],
        "kept-optimizer": ["paradigm=fedllm", "train.keep_optimizer_state=true"],
        "fedavgm": ["paradigm=fedllm", "federation.strategy=fedavgm"],
        "server-lr-K": ["paradigm=fedllm", "federation.strategy=fedavgm", "federation.server_momentum=0",
                        f"federation.server_lr={clients_per_round}"],
        "server-lr-K+kept": ["paradigm=fedllm", "federation.strategy=fedavgm", "federation.server_momentum=0",
                             f"federation.server_lr={clients_per_round}", "train.keep_optimizer_state=true"],
        "fedadam": ["paradigm=fedllm", "federation.strategy=fedadam"],
        "fedyogi": ["paradigm=fedllm", "federation.strategy=fedyogi"],
        "scaffold": ["paradigm=fedllm", "federation.strategy=scaffold"],
    }


def row_of(o: Outcome, reference: float | None) -> dict[str, Any]:
    s = o.summary or {}
    loss = s.get("final", {}).get("eval_loss")
    return {"variant": o.variant, "partition": o.group, "status": o.status, "error": o.error, "run_dir": o.run_dir,
            "overrides": o.overrides, "initial_eval_loss": s.get("initial", {}).get("eval_loss"),
            "final_eval_loss": loss, "ratio": None if loss is None or not reference else loss / reference,
            "metrics": s.get("final", {}).get("metrics") or {}, "total_bytes": s.get("comm", {}).get("total_bytes"),
            "wall_s": s.get("time", {}).get("wall_s")}


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| variant | eval loss (before → after) | × centralized | BLEU / ROUGE-L | total MB | wall s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] == "failed":
            lines.append(f"| {r['variant']} | FAILED: {r['error']} | | | | |")
            continue
        m = r["metrics"]
        metric = f"{m['bleu']:.1f} / {m['rougeL']:.1f}" if "bleu" in m else "—"
        ratio = "ref" if r["variant"] == "centralized" else "—" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(f"| {r['variant']} | {r['initial_eval_loss']:.4f} → {r['final_eval_loss']:.4f} | {ratio} | "
                     f"{metric} | {(r['total_bytes'] or 0) / MB:.1f} | {r['wall_s'] or 0:.0f} |")
    return lines


def verdict(partition: str, rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    goal = GOALS.get(partition)
    fed = [r for r in rows if r["variant"] != "centralized" and r["ratio"] is not None]
    if goal is None or not fed:
        return f"- {partition}: not assessable (centralized or every FedLLM variant missing)", {}
    best = min(fed, key=lambda r: r["ratio"])
    met = best["ratio"] <= goal
    data = {"goal": goal, "best_variant": best["variant"], "best_ratio": best["ratio"], "met": met}
    return (f"- {partition}: goal ≤ {goal:.2f} × centralized: {'MET' if met else 'MISSED'} — best is "
            f"{best['variant']} at {best['ratio']:.3f} ×"), data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, config="configs/compare.toml", out="bench/out/fedllm-strategies")
    parser.add_argument("--partitions", default=",".join(PARTITIONS), help=f"subset of {','.join(PARTITIONS)}")
    parser.add_argument("--variants", default="", help="comma list (default: all)")
    args = parser.parse_args()
    try:
        base = load_config(args.config, [*args.set, "runtime.progress=false"])
    except FedtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sets = variant_sets(base.federation.sampled)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()] or list(sets)
    partitions = [p.strip() for p in args.partitions.split(",") if p.strip()]
    unknown = [v for v in chosen if v not in sets] + [p for p in partitions if p not in PARTITIONS]
    if unknown:
        parser.error(f"unknown variant or partition {', '.join(unknown)}; variants: {', '.join(sets)}; "
                     f"partitions: {', '.join(PARTITIONS)}")
    started, out = time.perf_counter(), Path(args.out)
    runner = VariantRunner(args.config, args.set, out, args.fresh, None if args.no_warmup else
                           ["federation.rounds=1", "train.local_steps=1", "data.max_eval_samples=8",
                            "eval.max_new_tokens=4"])
    outcomes: dict[str, list[Outcome]] = {}
    for partition in partitions:
        print(f"{partition}: {', '.join(chosen)}", flush=True)
        outcomes[partition] = [runner.run(partition, v, [*PARTITIONS[partition], *sets[v]], []) for v in chosen]
    md = ["# FedLLM strategies against centralized", "",
          f"config {args.config} {' '.join(args.set)}".rstrip(),
          f"rounds {base.federation.rounds}, clients {base.federation.num_clients} ({base.federation.sampled} a "
          f"round), local steps {base.train.local_steps}, batch {base.train.batch_size}, lr {base.train.lr:g}, "
          f"train samples {base.data.max_train_samples}, eval samples {base.data.max_eval_samples}, seed {base.seed}"]
    results, verdicts = {}, []
    for partition, group in outcomes.items():
        ref = next((o for o in group if o.variant == "centralized" and o.summary), None)
        reference = ref.summary["final"]["eval_loss"] if ref else None
        rows = [row_of(o, reference) for o in group]
        line, data = verdict(partition, rows)
        verdicts.append(line)
        results[partition] = {"rows": rows, "goal": data}
        md += ["", f"## {partition}", "", *table(rows)]
    md += ["", "## Goals", "", *verdicts]
    reused = labels_with(outcomes, "reused")
    if reused:
        md += ["", f"reused (a finished run of the same configuration): {', '.join(reused)}"]
    publish(out, md, {"args": vars(args), "seed": base.seed, "partitions": results, "verdicts": verdicts}, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
