"""Split-FedLLM benchmark: centralized, FedLLM and split variants on the same model, data and samples.

Every variant trains with the same rounds, clients, local steps, batch, seed and partition (only the
paradigm and its split settings differ), each into its own run directory under --out:

    centralized      paradigm=centralized (pooled data, reference)
    fedllm           paradigm=fedllm (federated LoRA)
    split-fixed      paradigm=split, split.cut=K                          (SplitFed-V2, one fixed cut)
    split-adaptive   paradigm=split, split.cut=K, split.adaptive=true     (SplitFT adaptive cuts)
    split-rank       paradigm=split, split.cut=K, split.cut_rank=R, cut_rank_side=both
    split-ushape     paradigm=split, split.cut=K, split.ushape=true, split.tail=1

A second scenario repeats split-fixed vs split-adaptive under partition.method=length_dirichlet,
partition.alpha=0.1 (SplitFT reports 15-20 % lower perplexity for adaptive cuts there).

A variant whose run directory already holds a summary.json written by the same training configuration
(config.toml; runtime settings don't count) is reused, not rerun (so an interrupted benchmark continues); one
with a checkpoint of the same configuration but no summary is resumed. --fresh reruns everything. Wall ratios
are only strictly comparable between variants run in the same invocation; reused ones are marked.

    python bench/split_bench.py                                   # SmolLM2 demo config (slow on CPU)
    python bench/split_bench.py --config configs/tiny.toml --out /tmp/splitbench-tiny
    python bench/split_bench.py --variants fedllm,split-fixed --skip-length --set federation.rounds=2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from variant_runs import Outcome, VariantRunner, add_run_arguments, labels_with, num_layers, publish

from fedtune.config import load_config
from fedtune.core.errors import FedtuneError

VARIANTS = ("centralized", "fedllm", "split-fixed", "split-adaptive", "split-rank", "split-ushape")
LENGTH_VARIANTS = ("split-fixed", "split-adaptive")
MB = 1e6
TFLOP = 1e12


# ---------------------------------------------------------------------------------------------
# Configurations


def variant_overrides(variant: str, cut: int, rank: int, layers: int | None) -> tuple[list[str], list[str]]:
    """(--set overrides, notes) that turn the base configuration into ``variant``."""
    notes: list[str] = []
    if variant in ("centralized", "fedllm"):
        return [f"paradigm={variant}"], notes
    split = ["paradigm=split", f"split.cut={cut}"]
    if variant == "split-fixed":
        return split, notes
    if variant == "split-adaptive":
        return [*split, "split.adaptive=true"], notes
    if variant == "split-rank":
        return [*split, f"split.cut_rank={rank}", "split.cut_rank_side=both"], notes
    if variant == "split-ushape":
        tail = 1
        head = cut
        if layers is not None and head + tail >= layers:
            head = max(1, layers - 1 - tail)
            notes.append(f"U-shape head clamped from {cut} to {head} blocks (model has {layers}, tail {tail})")
        return ["paradigm=split", f"split.cut={head}", "split.ushape=true", f"split.tail={tail}"], notes
    raise ValueError(variant)


WARMUP = ["paradigm=fedllm", "federation.rounds=1", "train.local_steps=1", "data.max_eval_samples=8",
          "eval.max_new_tokens=4"]


# ---------------------------------------------------------------------------------------------
# Rows and tables


def row_of(o: Outcome, central_wall: float | None) -> dict[str, Any]:
    s = o.summary or {}
    comm, compute, clients = s.get("comm", {}), s.get("compute", {}), s.get("clients", [])
    paradigm = s.get("paradigm")
    split = paradigm == "split"
    if split:
        exchange = comm.get("exchange_bytes", comm.get("activation_uplink_bytes", 0) + comm.get("gradient_downlink_bytes", 0))
        adapter = comm.get("adapter_bytes")
    else:
        exchange = None
        adapter = comm.get("total_bytes") if paradigm == "fedllm" else None  # FedLLM traffic is all adapters
    client_flops = [c.get("flops", 0) for c in clients] if paradigm != "centralized" else []
    wall = s.get("time", {}).get("wall_s")
    return {
        "variant": o.variant,
        "scenario": o.group,
        "status": o.status,
        "paradigm": paradigm,
        "overrides": o.overrides,
        "notes": o.notes,
        "run_dir": o.run_dir,
        "error": o.error,
        "initial_eval_loss": s.get("initial", {}).get("eval_loss"),
        "final_eval_loss": s.get("final", {}).get("eval_loss"),
        "final_eval_ppl": s.get("final", {}).get("eval_ppl"),
        "uplink_bytes": comm.get("uplink_bytes"),
        "downlink_bytes": comm.get("downlink_bytes"),
        "total_bytes": comm.get("total_bytes"),
        "exchange_bytes": exchange,
        "adapter_bytes": adapter,
        "client_flops": compute.get("client_flops"),
        "client_flops_mean": sum(client_flops) / len(client_flops) if client_flops else None,
        "client_peak_bytes": s.get("memory", {}).get("client_peak_bytes") if paradigm != "centralized" else None,
        "server_flops": compute.get("server_flops"),
        "wall_s": wall,
        "wall_ratio": wall / central_wall if wall is not None and central_wall else None,
        "cut_layers": {str(c.get("id", i)): c["cut_layer"] for i, c in enumerate(clients) if "cut_layer" in c} or None,
    }


def _f(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "—" if value is None else f"{value / scale:.{digits}f}"


def _cuts(cuts: dict[str, list[int]] | None) -> str:
    if not cuts:
        return "—"
    finals = [h[-1] for h in cuts.values()]
    text = " ".join(f"c{c}:{h[-1]}" for c, h in cuts.items())
    moved = any(len(set(h)) > 1 for h in cuts.values())
    if moved:
        text += " (from " + " ".join(str(h[0]) for h in cuts.values()) + ")"
    return text if finals else "—"


HEADER = ("variant", "eval loss (before → after)", "ppl after", "uplink MB", "downlink MB", "act+grad MB",
          "adapter MB", "client TFLOP", "client TFLOP/client", "client peak MB", "server TFLOP", "wall s",
          "wall / centralized", "final cut layers")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] * len(HEADER)) + "|"]
    for r in rows:
        name = r["variant"] + (f" ({r['status']})" if r["status"] in ("reused", "resumed") else "")
        if r["status"] == "failed":
            lines.append("| " + " | ".join([name, "FAILED", *["—"] * (len(HEADER) - 2)]) + " |")
            continue
        loss = f"{_f(r['initial_eval_loss'], digits=4)} → {_f(r['final_eval_loss'], digits=4)}"
        ratio = "—" if r["wall_ratio"] is None else f"{r['wall_ratio']:.2f}x"
        cells = [name, loss, _f(r["final_eval_ppl"]), _f(r["uplink_bytes"], MB), _f(r["downlink_bytes"], MB),
                 _f(r["exchange_bytes"], MB), _f(r["adapter_bytes"], MB), _f(r["client_flops"], TFLOP, 4),
                 _f(r["client_flops_mean"], TFLOP, 4), _f(r["client_peak_bytes"], MB, 1),
                 _f(r["server_flops"], TFLOP, 4), _f(r["wall_s"], digits=1), ratio, _cuts(r["cut_layers"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pct(new: float | None, old: float | None) -> float | None:
    return None if new is None or old is None or old == 0 else (new - old) / old * 100.0


def comparisons(scenarios: dict[str, dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    lines: list[str] = []
    data: dict[str, Any] = {}

    def ok(rows: dict[str, dict], v: str) -> dict | None:
        r = rows.get(v)
        return r if r and r["status"] != "failed" else None

    for key, sc in scenarios.items():
        rows = {r["variant"]: r for r in sc["rows"]}
        fixed, adaptive = ok(rows, "split-fixed"), ok(rows, "split-adaptive")
        if sc.get("error"):
            lines.append(f"- {sc['title']}: adaptive vs fixed not available: {sc['error']}")
        elif fixed and adaptive:
            change = pct(adaptive["final_eval_ppl"], fixed["final_eval_ppl"])
            data[f"{key}.adaptive_vs_fixed_ppl_pct"] = change
            verdict = ""
            if key == "length":
                verdict = (" — SplitFT's claim (15-20 % lower) " +
                           ("reproduced" if change is not None and change <= -15 else "NOT reproduced"))
            lines.append(f"- {sc['title']}: split-adaptive vs split-fixed perplexity "
                         f"{fixed['final_eval_ppl']:.3f} → {adaptive['final_eval_ppl']:.3f} "
                         f"({change:+.1f} %){verdict}")
        elif key == "length":
            lines.append(f"- {sc['title']}: adaptive vs fixed not available (a variant failed or was not run)")
    rows = {r["variant"]: r for r in scenarios["main"]["rows"]} if "main" in scenarios else {}
    fed = ok(rows, "fedllm")
    for v in ("split-fixed", "split-adaptive", "split-rank", "split-ushape"):
        r = ok(rows, v)
        if fed and r and fed["client_flops"]:
            ratio = r["client_flops"] / fed["client_flops"]
            data[f"main.{v}.client_flops_vs_fedllm"] = ratio
            lines.append(f"- client FLOPs {v} vs fedllm: {r['client_flops'] / TFLOP:.4f} vs "
                         f"{fed['client_flops'] / TFLOP:.4f} TFLOP = {ratio:.3f}x ({pct(r['client_flops'], fed['client_flops']):+.1f} %)")
    if not fed:
        lines.append("- client FLOPs split vs fedllm: not available (fedllm not run or failed)")
    return lines, data


# ---------------------------------------------------------------------------------------------
# Main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, config="configs/demo.toml", out="bench/out/split")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list, subset of {','.join(VARIANTS)}")
    parser.add_argument("--cut", type=int, default=3, help="K: client blocks for the split variants (default 3)")
    parser.add_argument("--cut-rank", type=int, default=4, help="R: split.cut_rank for split-rank (default 4)")
    parser.add_argument("--length-alpha", type=float, default=0.1, help="Dirichlet alpha of the length scenario")
    parser.add_argument("--skip-length", action="store_true", help="skip the length-Dirichlet scenario")
    args = parser.parse_args()

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    out = Path(args.out)
    base_overrides = [*args.set, "runtime.progress=false"]
    started = time.perf_counter()
    try:
        base = load_config(args.config, base_overrides)
    except FedtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    layers = num_layers(base)

    plan = [("main", "scenario 1: " + f"{base.partition.method} partition (alpha {base.partition.alpha})", variants, [])]
    length_variants = [v for v in LENGTH_VARIANTS if v in variants]
    if not args.skip_length and length_variants:
        plan.append(("length", f"scenario 2: length_dirichlet partition (alpha {args.length_alpha})",
                     length_variants, ["partition.method=length_dirichlet", f"partition.alpha={args.length_alpha}"]))

    outcomes: dict[str, list[Outcome]] = {}
    errors: dict[str, str] = {}
    runner = VariantRunner(args.config, args.set, out, args.fresh, None if args.no_warmup else WARMUP)
    for key, title, names, scenario_overrides in plan:
        print(f"{title}: {', '.join(names)}", flush=True)
        outcomes[key] = []
        for variant in names:
            overrides, notes = variant_overrides(variant, args.cut, args.cut_rank, layers)
            for note in notes:
                print(f"  note: {variant}: {note}", flush=True)
            outcomes[key].append(runner.run(key, variant, [*scenario_overrides, *overrides], notes))
        failed = [o for o in outcomes[key] if o.status == "failed"]
        if failed and len(failed) == len(outcomes[key]) and len({o.error for o in failed}) == 1:
            errors[key] = failed[0].error  # e.g. the partition cannot be made: one reason for the scenario

    # centralized of scenario 1 is the reference wall time for both scenarios
    central = next((o for o in outcomes.get("main", []) if o.variant == "centralized" and o.summary), None)
    central_wall = central.summary["time"]["wall_s"] if central else None
    scenarios: dict[str, dict[str, Any]] = {}
    for key, title, _, scenario_overrides in plan:
        scenarios[key] = {"title": title, "overrides": scenario_overrides, "error": errors.get(key),
                          "rows": [row_of(o, central_wall) for o in outcomes[key]]}
    lines_cmp, cmp_data = comparisons(scenarios)

    model = next((o.summary["model"] for os_ in outcomes.values() for o in os_ if o.summary), {})
    reused, resumed = labels_with(outcomes, "reused"), labels_with(outcomes, "resumed")
    md: list[str] = [
        "# Split-FedLLM benchmark",
        "",
        f"model: {model.get('name') or model.get('source', '?')} on {model.get('device', '?')}; "
        f"config {args.config} {' '.join(args.set)}".rstrip(),
        f"equal samples: rounds {base.federation.rounds}, clients {base.federation.num_clients}, local steps "
        f"{base.train.local_steps}, batch {base.train.batch_size}, seed {base.seed}; lora.r {base.lora.r}; "
        f"split cut K={args.cut}, cut_rank R={args.cut_rank}" + (f"; model blocks {layers}" if layers else ""),
    ]
    if reused:
        md.append(f"reused (summary.json of the same config.toml; not rerun): {', '.join(reused)}")
    if resumed:
        md.append(f"resumed from checkpoint: {', '.join(resumed)}")
    for key, sc in scenarios.items():
        md += ["", f"## {sc['title']}", ""]
        if sc["error"]:
            md.append(f"**scenario could not run:** {sc['error']}")
            continue
        md.append(table(sc["rows"]))
        for r in sc["rows"]:
            if r["status"] == "failed":
                md.append(f"\n- {r['variant']} failed: {r['error']}")
            for note in r["notes"]:
                md.append(f"\n- {r['variant']}: {note}")
    md += ["", "## Comparisons", "", *lines_cmp, "",
           "act+grad MB: split cut-layer exchange (activations up, gradients down; U-shape adds body output down "
           "and tail gradients up). adapter MB: LoRA weights exchanged (FedLLM: all of its traffic). "
           "Wall ratio vs the centralized run of scenario 1"
           + (" (some runs reused from earlier invocations: their wall times were measured then)." if reused or resumed
              else ", all measured in this run."),
           "split-adaptive holds split.val_samples per client out of training to score the cut (same steps and batch).",
           ]
    publish(out, md, {
        "args": vars(args), "model": model, "num_layers": layers, "scenarios": scenarios,
        "comparisons": cmp_data, "comparison_lines": lines_cmp, "reused": reused, "resumed": resumed,
        "central_wall_s": central_wall,
    }, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
