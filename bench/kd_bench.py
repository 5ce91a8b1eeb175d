"""KD-FedLLM against training alone and against FedLLM: what makes KD pay.

On the comparison config's scale (configs/compare.toml: SmolLM2-135M-Instruct on E2E, 4 clients, Dirichlet alpha 0.5,
3 rounds x 3 local steps x batch 8) every variant trains on the same samples with the same seed, each into its own
run directory under --out/kd/<variant>:

    local                   every client trains alone (the baseline KD must beat)
    fedllm                  FedAvg of the LoRA adapters (the quality KD must come close to, and its bytes)
    kd                      the comparison's KD: 32 public prompts, top-8 logits, T 2, one distillation step a round
    distill-4               four pure distillation steps a round on the public set
    public-128              128 public prompts (4x the knowledge shared, 4x the logits sent)
    public-128+distill-4    both
    server-distill          FedDF-style: the server distils its own adapter from the aggregated logits (4 steps,
                            128 public prompts); the server's adapter is the evaluated model
    confidence              public-128+distill-4 with confidence-weighted soft labels

Goals (issue 21): KD's final eval loss at least 5 % below local-only and within 5 % of FedLLM's, at 10 x less
communication than FedLLM or better. A finished run of the same configuration is reused, a checkpointed one
resumed.

    python bench/kd_bench.py                                         # -> bench/out/kd
    python bench/kd_bench.py --variants local,fedllm,kd,distill-4
    python bench/kd_bench.py --config configs/tiny.toml --out /tmp/kd-tiny
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from variant_runs import (
    SHORT_WARMUP,
    Outcome,
    VariantRunner,
    parse_variant_args,
    publish,
    reused_note,
)

MORE = ["kd.public_samples=128", "kd.distill_steps=4"]
VARIANTS = {
    "local": ["paradigm=local"],
    "fedllm": ["paradigm=fedllm"],
    "kd": ["paradigm=kd"],
    "distill-4": ["paradigm=kd", "kd.distill_steps=4"],
    "public-128": ["paradigm=kd", "kd.public_samples=128"],
    "public-128+distill-4": ["paradigm=kd", *MORE],
    "server-distill": ["paradigm=kd", *MORE, "kd.server_model=true"],
    "confidence": ["paradigm=kd", *MORE, "kd.aggregation=confidence"],
}
BELOW_LOCAL, NEAR_FEDLLM, FEWER_BYTES = 0.95, 1.05, 10.0  # the goals
KB = 1e3


def row_of(o: Outcome) -> dict[str, Any]:
    s = o.summary or {}
    return {"variant": o.variant, "status": o.status, "error": o.error, "run_dir": o.run_dir,
            "overrides": o.overrides, "initial_eval_loss": s.get("initial", {}).get("eval_loss"),
            "final_eval_loss": s.get("final", {}).get("eval_loss"),
            "mean_client_eval_loss": s.get("kd", {}).get("mean_client_eval_loss"),
            "metrics": s.get("final", {}).get("metrics") or {}, "total_bytes": s.get("comm", {}).get("total_bytes"),
            "client_flops": s.get("compute", {}).get("client_flops"), "wall_s": s.get("time", {}).get("wall_s")}


def assess(rows: list[dict[str, Any]]) -> list[str]:
    """Each KD variant against the three goals (local and fedllm must have run)."""
    by = {r["variant"]: r for r in rows if r["final_eval_loss"] is not None}
    local, fed = by.get("local"), by.get("fedllm")
    if local is None or fed is None:
        return ["- not assessable: local or fedllm missing"]
    lines = []
    for r in rows:
        if r["variant"] in ("local", "fedllm") or r["final_eval_loss"] is None:
            continue
        loss = r["final_eval_loss"]
        vs_local, vs_fed = loss / local["final_eval_loss"], loss / fed["final_eval_loss"]
        fewer = fed["total_bytes"] / r["total_bytes"] if r["total_bytes"] else float("inf")
        met = vs_local <= BELOW_LOCAL and vs_fed <= NEAR_FEDLLM and fewer >= FEWER_BYTES
        lines.append(f"- {r['variant']}: {vs_local:.3f} x local (goal ≤ {BELOW_LOCAL}), {vs_fed:.3f} x fedllm "
                     f"(≤ {NEAR_FEDLLM}), {fewer:.0f} x fewer bytes (≥ {FEWER_BYTES:.0f}): "
                     f"{'MET' if met else 'MISSED'}")
    return lines


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| variant | eval loss (before → after) | mean client eval loss | BLEU / ROUGE-L | total KB | "
             "client TFLOP | wall s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["final_eval_loss"] is None:
            lines.append(f"| {r['variant']} | FAILED: {r['error']} | | | | | |")
            continue
        m = r["metrics"]
        metric = f"{m['bleu']:.1f} / {m['rougeL']:.1f}" if "bleu" in m else "—"
        client = "—" if r["mean_client_eval_loss"] is None else f"{r['mean_client_eval_loss']:.4f}"
        lines.append(f"| {r['variant']} | {r['initial_eval_loss']:.4f} → {r['final_eval_loss']:.4f} | {client} | "
                     f"{metric} | {(r['total_bytes'] or 0) / KB:.0f} | {(r['client_flops'] or 0) / 1e12:.1f} | "
                     f"{r['wall_s'] or 0:.0f} |")
    return lines


def main() -> int:
    args, chosen = parse_variant_args(__doc__, "configs/compare.toml", "bench/out/kd", VARIANTS)
    started, out = time.perf_counter(), Path(args.out)
    runner = VariantRunner(args.config, args.set, out, args.fresh, None if args.no_warmup else
                           ["paradigm=kd", *SHORT_WARMUP])
    outcomes = {"kd": [runner.run("kd", v, VARIANTS[v], []) for v in chosen]}
    rows = [row_of(o) for o in outcomes["kd"]]
    md = ["# KD-FedLLM against local-only and FedLLM", "", f"config {args.config} {' '.join(args.set)}".rstrip(), "",
          *table(rows), "", "## Goals", "", *assess(rows)]
    md += reused_note(outcomes)
    publish(out, md, {"args": vars(args), "rows": rows}, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
