"""Heterogeneous LoRA ranks: clients of ranks 2, 4, 8 and 16 against every client at rank 8, per aggregation.

On the comparison config's scale (configs/compare.toml: SmolLM2-135M-Instruct on E2E, 4 clients, Dirichlet alpha
0.5, 3 rounds x 3 local steps) every variant trains on the same samples with the same seed, each into its own run
directory under --out/<variant>:

    homogeneous-8   every client rank 8 (FedAvg), the reference
    zero_pad        ranks 2/4/8/16 (global rank 16), zero-padded factors averaged (the naive baseline)
    hetlora         the same ranks, per-component norm-weighted averaging with rank self-pruning
    flexlora        the same ranks, the mean of the full-size updates re-factorised by truncated SVD
    flora           the same ranks, exact stacking re-factorised to rank 16 each round

It prints eval loss, task metric, total bytes and each client's rank and bytes up / down.

    python bench/lora_ranks.py                                   # -> bench/out/lora-ranks
    python bench/lora_ranks.py --config configs/tiny.toml --set federation.num_clients=4 --out /tmp/ranks-tiny
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from variant_runs import SHORT_WARMUP, VariantRunner, parse_variant_args, publish, reused_note

HETERO = ["lora.r=16", "lora.ranks=[2, 4, 8, 16]"]
VARIANTS = {
    "homogeneous-8": ["lora.r=8", "lora.ranks=[]"],
    **{name: [*HETERO, f"lora.rank_aggregation={name}"] for name in ("zero_pad", "hetlora", "flexlora", "flora")},
}
MB = 1e6


def main() -> int:
    args, chosen = parse_variant_args(__doc__, "configs/compare.toml", "bench/out/lora-ranks", VARIANTS)
    started, out = time.perf_counter(), Path(args.out)
    sets = [*args.set, "paradigm=fedllm", "federation.num_clients=4"]
    runner = VariantRunner(args.config, sets, out, args.fresh, None if args.no_warmup else SHORT_WARMUP)
    outcomes = {"ranks": [runner.run("ranks", v, VARIANTS[v], []) for v in chosen]}
    md = ["# Heterogeneous LoRA ranks", "", f"config {args.config} {' '.join(sets)}".rstrip(), "",
          "| variant | eval loss (before → after) | BLEU / ROUGE-L | total MB | ranks (start → end) | "
          "MB up per client | MB down per client |", "|---|---|---|---|---|---|---|"]
    rows = []
    for o in outcomes["ranks"]:
        s = o.summary or {}
        if not s:
            md.append(f"| {o.variant} | FAILED: {o.error} | | | | | |")
            continue
        clients = sorted(s.get("clients", []), key=lambda c: c["id"])
        m = s["final"].get("metrics") or {}
        ranks = " ".join(f"{c.get('lora_rank', 8)}→{c.get('lora_rank_final', c.get('lora_rank', 8))}"
                         for c in clients)
        md.append(f"| {o.variant} | {s['initial']['eval_loss']:.4f} → {s['final']['eval_loss']:.4f} | "
                  + (f"{m['bleu']:.1f} / {m['rougeL']:.1f}" if "bleu" in m else "—")
                  + f" | {s['comm']['total_bytes'] / MB:.1f} | {ranks} | "
                  + " ".join(f"{c['uplink_bytes'] / MB:.2f}" for c in clients) + " | "
                  + " ".join(f"{c['downlink_bytes'] / MB:.2f}" for c in clients) + " |")
        rows.append({"variant": o.variant, "final_eval_loss": s["final"]["eval_loss"], "metrics": m,
                     "total_bytes": s["comm"]["total_bytes"], "clients": clients})
    md += reused_note(outcomes)
    publish(out, md, {"args": vars(args), "rows": rows}, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
