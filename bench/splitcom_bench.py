"""SplitCom benchmark: split federated LoRA with and without temporal activation compression.

For each split shape (standard: client holds the first `split.cut` blocks; U-shape: the client also keeps
the last `split.tail` = 1 blocks, final norm, LM head and labels) it runs six variants on the same model,
data, samples, rounds and seed, each into its own run directory under --out/<shape>/<variant>:

    vanilla               compression.method=none             (plain SFL, the reference)
    fixed                 splitcom, fixed threshold theta
    bangbang              splitcom, bang-bang threshold driven by validation perplexity
    ddpg                  splitcom, DDPG threshold controller
    fixed+int8            splitcom fixed, uploads coded int8 per token
    fixed+int8+residual   splitcom fixed, int8, changed samples sent as residuals against the held copy

Standard split: compression on the activations (uplink); U-shape: on all four interfaces (activations
and tail gradients up, body outputs and gradients down), the fedtune defaults. Thresholds, controller
settings and the cut come from the config (configs/splitcom.toml); --set overrides apply to every run.

Targets (SplitCom, arXiv 2602.10564): standard uplink reduction 98.6 %, U-shape total reduction 95.8 %,
each taken as the best reduction among variants whose eval loss is within 1 % of vanilla's. Reductions are
against each run's own uncompressed equivalent and include every message (adapter uploads too);
the split-exchange-only reductions are reported alongside.

A variant whose run directory already holds a summary.json written by the same configuration (config.toml)
is reused, not rerun (so an interrupted benchmark continues); one with a checkpoint of the same configuration
but no summary is resumed. --fresh reruns everything. Wall times of reused runs were measured when they ran.

    python bench/splitcom_bench.py                                   # SmolLM2, configs/splitcom.toml
    python bench/splitcom_bench.py --shapes standard --variants vanilla,fixed
    python bench/splitcom_bench.py --config configs/tiny.toml --set paradigm=split --set split.cut=2 \\
        --set federation.rounds=3 --set train.local_steps=3 --out /tmp/splitcom-tiny
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

SHAPES = ("standard", "ushape")
SHAPE_TITLES = {"standard": "standard split", "ushape": "U-shape split"}
VARIANTS = ("vanilla", "fixed", "bangbang", "ddpg", "fixed+int8", "fixed+int8+residual")
MB = 1e6
LOSS_TOLERANCE_PCT = 1.0  # "within 1 % of vanilla"
TARGETS = {  # shape -> (summary key under comm, label, target reduction %)
    "standard": ("uplink_reduction", "uplink reduction", 98.6),
    "ushape": ("total_reduction", "total reduction", 95.8),
}
IFACE_SHORT = {"activations": "act", "body_output": "out", "tail_gradients": "tgrad", "gradients": "grad"}

# every variant sets every compression knob it depends on, so the base config's [compression] only supplies
# thresholds and controller settings
VARIANT_SETS: dict[str, list[str]] = {
    "vanilla": ["compression.method=none", "compression.codec=none", "compression.residual=false"],
    "fixed": ["compression.method=splitcom", "compression.controller=fixed", "compression.codec=none",
              "compression.residual=false"],
    "bangbang": ["compression.method=splitcom", "compression.controller=bangbang", "compression.codec=none",
                 "compression.residual=false"],
    "ddpg": ["compression.method=splitcom", "compression.controller=ddpg", "compression.codec=none",
             "compression.residual=false"],
    "fixed+int8": ["compression.method=splitcom", "compression.controller=fixed", "compression.codec=int8",
                   "compression.residual=false"],
    "fixed+int8+residual": ["compression.method=splitcom", "compression.controller=fixed",
                            "compression.codec=int8", "compression.residual=true"],
}


# ---------------------------------------------------------------------------------------------
# Configurations


def shape_overrides(shape: str, cut: int, layers: int | None) -> tuple[list[str], list[str]]:
    """(--set overrides, notes) for the split shape; the cut is the base config's split.cut."""
    notes: list[str] = []
    if shape == "standard":
        return ["paradigm=split", "split.ushape=false"], notes
    tail, head = 1, cut
    if layers is not None and head + tail >= layers:
        head = max(1, layers - 1 - tail)
        notes.append(f"U-shape head clamped from {cut} to {head} blocks (model has {layers}, tail {tail})")
    return ["paradigm=split", "split.ushape=true", f"split.cut={head}", f"split.tail={tail}"], notes


WARMUP = ["paradigm=split", "split.ushape=false", "compression.method=none", "compression.codec=none",
          "federation.rounds=1", "train.local_epochs=0.001", "data.max_eval_samples=8", "eval.max_new_tokens=4"]


# ---------------------------------------------------------------------------------------------
# Rows and tables


def pct(new: float | None, old: float | None) -> float | None:
    return None if new is None or old is None or old == 0 else (new - old) / old * 100.0


def _thetas(compression: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """interface -> {final, min, max} of its threshold trajectory ([round, client, theta] entries)."""
    out: dict[str, dict[str, Any]] = {}
    for name, c in compression.items():
        traj = c.get("threshold_trajectory") or []
        if traj:
            values = [float(t[-1]) for t in traj]
            out[name] = {"final": values[-1], "min": min(values), "max": max(values)}
    return out


def row_of(o: Outcome, vanilla_loss: float | None) -> dict[str, Any]:
    s = o.summary or {}
    comm, compression = s.get("comm", {}), s.get("compression", {})
    loss = s.get("final", {}).get("eval_loss")
    ratios = {name: [v for _, v in sorted(c.get("upload_ratio_per_epoch", {}).items(), key=lambda kv: int(kv[0]))]
              for name, c in compression.items()}
    return {
        "variant": o.variant,
        "shape": o.group,
        "status": o.status,
        "overrides": o.overrides,
        "notes": o.notes,
        "run_dir": o.run_dir,
        "error": o.error,
        "initial_eval_loss": s.get("initial", {}).get("eval_loss"),
        "final_eval_loss": loss,
        "final_eval_ppl": s.get("final", {}).get("eval_ppl"),
        "loss_vs_vanilla_pct": pct(loss, vanilla_loss),
        "uplink_bytes": comm.get("uplink_bytes"),
        "downlink_bytes": comm.get("downlink_bytes"),
        "total_bytes": comm.get("total_bytes"),
        "uncompressed_uplink_bytes": comm.get("uncompressed_uplink_bytes"),
        "uncompressed_total_bytes": comm.get("uncompressed_total_bytes"),
        "uplink_reduction": comm.get("uplink_reduction"),
        "total_reduction": comm.get("total_reduction"),
        "exchange_uplink_reduction": comm.get("exchange_uplink_reduction"),
        "exchange_total_reduction": comm.get("exchange_total_reduction"),
        "adapter_bytes": comm.get("adapter_bytes"),
        "exchange_bytes": comm.get("exchange_bytes"),
        "upload_ratio": {n: c.get("upload_ratio") for n, c in compression.items()},
        "upload_ratio_per_epoch": ratios,
        "interface_bytes": {n: c.get("bytes") for n, c in compression.items()},
        "interface_uncompressed_bytes": {n: c.get("uncompressed_bytes") for n, c in compression.items()},
        "thetas": _thetas(compression),
        "wall_s": s.get("time", {}).get("wall_s"),
    }


def _f(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "—" if value is None else f"{value / scale:.{digits}f}"


def _p(value: float | None, digits: int = 1) -> str:
    """A fraction (0..1) as a percentage."""
    return "—" if value is None else f"{value * 100:.{digits}f}"


def _ratios(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values) if values else "—"


def _theta_text(thetas: dict[str, dict[str, Any]], ushape: bool) -> str:
    if not thetas:
        return "—"

    def one(t: dict[str, Any]) -> str:
        text = f"{t['final']:.6g}"
        return text + (f" ({t['min']:.6g}–{t['max']:.6g})" if t["min"] != t["max"] else "")

    if not ushape and set(thetas) == {"activations"}:
        return one(thetas["activations"])
    return "; ".join(f"{IFACE_SHORT.get(n, n)} {one(t)}" for n, t in thetas.items())


HEADER = ("variant", "eval loss after", "loss vs vanilla", "uplink MB", "downlink MB", "uplink red. %",
          "total red. %", "exchange up / total red. %", "activation upload ratio per epoch", "final theta(s)",
          "wall s")


def table(rows: list[dict[str, Any]], ushape: bool) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] * len(HEADER)) + "|"]
    for r in rows:
        name = r["variant"] + (f" ({r['status']})" if r["status"] in ("reused", "resumed") else "")
        if r["status"] == "failed":
            lines.append("| " + " | ".join([name, "FAILED", *["—"] * (len(HEADER) - 2)]) + " |")
            continue
        rel = ("ref" if r["variant"] == "vanilla" else
               "—" if r["loss_vs_vanilla_pct"] is None else f"{r['loss_vs_vanilla_pct']:+.1f} %")
        cells = [name, _f(r["final_eval_loss"], digits=4), rel, _f(r["uplink_bytes"], MB, 3),
                 _f(r["downlink_bytes"], MB, 3), _p(r["uplink_reduction"]), _p(r["total_reduction"]),
                 f"{_p(r['exchange_uplink_reduction'])} / {_p(r['exchange_total_reduction'])}",
                 _ratios(r["upload_ratio_per_epoch"].get("activations", [])),
                 _theta_text(r["thetas"], ushape), _f(r["wall_s"], digits=1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ushape_ratios(rows: list[dict[str, Any]]) -> list[str]:
    """Per-epoch upload ratios of the other U-shape interfaces (the table shows the activations only)."""
    lines = []
    for r in rows:
        if r["status"] == "failed" or r["variant"] == "vanilla":
            continue
        parts = [f"{IFACE_SHORT.get(n, n)} {_ratios(v)}" for n, v in r["upload_ratio_per_epoch"].items()
                 if n != "activations" and r["upload_ratio"].get(n) is not None]
        if parts:
            lines.append(f"- {r['variant']}: " + "; ".join(parts))
    return lines


def targets(shape: str, rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    key, label, target = TARGETS[shape]
    title = SHAPE_TITLES[shape]
    by_name = {r["variant"]: r for r in rows}
    vanilla = by_name.get("vanilla")
    data: dict[str, Any] = {"metric": f"comm.{key}", "target_pct": target, "loss_tolerance_pct": LOSS_TOLERANCE_PCT}
    if not vanilla or vanilla["status"] == "failed" or vanilla["final_eval_loss"] is None:
        data["verdict"] = "unavailable"
        return [f"- {title}: target {label} {target} % — not assessable (vanilla not run or failed)"], data
    ok = [r for r in rows if r["status"] != "failed" and r["variant"] != "vanilla" and r.get(key) is not None
          and r["loss_vs_vanilla_pct"] is not None]
    within = [r for r in ok if r["loss_vs_vanilla_pct"] <= LOSS_TOLERANCE_PCT]
    lines: list[str] = []
    if not within:
        data["verdict"] = "missed"
        lines.append(f"- {title}: target {label} {target} % at eval loss within {LOSS_TOLERANCE_PCT:g} % of vanilla "
                     f"({vanilla['final_eval_loss']:.4f}): MISSED — no compressed variant stays within the loss bound")
    else:
        best = max(within, key=lambda r: r[key])
        value = best[key] * 100
        met = value >= target
        data.update(verdict="met" if met else "missed", best_variant=best["variant"], best_pct=value,
                    gap_points=target - value, best_loss_vs_vanilla_pct=best["loss_vs_vanilla_pct"])
        verdict = (f"MET by {best['variant']} ({value:.2f} % >= {target} %, +{value - target:.2f} points)" if met else
                   f"MISSED by {target - value:.2f} points: best is {best['variant']} with {value:.2f} %")
        lines.append(f"- {title}: target {label} {target} % at eval loss within {LOSS_TOLERANCE_PCT:g} % of vanilla "
                     f"({vanilla['final_eval_loss']:.4f}): {verdict} (its loss {best['loss_vs_vanilla_pct']:+.2f} % vs "
                     f"vanilla; split exchange only: uplink {best['exchange_uplink_reduction'] * 100:.2f} %, "
                     f"total {best['exchange_total_reduction'] * 100:.2f} %)")
    outside = [r for r in ok if r["loss_vs_vanilla_pct"] > LOSS_TOLERANCE_PCT]
    if outside:
        best_any = max(ok, key=lambda r: r[key])
        if best_any in outside:
            data["best_any_variant"] = best_any["variant"]
            data["best_any_pct"] = best_any[key] * 100
            lines.append(f"  - beyond the loss bound: {best_any['variant']} reaches {best_any[key] * 100:.2f} % "
                         f"at {best_any['loss_vs_vanilla_pct']:+.2f} % loss vs vanilla")
        lines.append("  - outside the 1 % loss bound: " + ", ".join(
            f"{r['variant']} ({r['loss_vs_vanilla_pct']:+.2f} %)" for r in outside))
    return lines, data


# ---------------------------------------------------------------------------------------------
# Main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, config="configs/splitcom.toml", out="bench/out/splitcom")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list, subset of {','.join(SHAPES)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list, subset of {','.join(VARIANTS)}")
    args = parser.parse_args()

    def pick(text: str, valid: tuple[str, ...], what: str) -> list[str]:
        chosen = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in chosen if v not in valid]
        if unknown:
            parser.error(f"unknown {what}(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
        return [v for v in valid if v in chosen]  # canonical order: vanilla first (the reference)

    shapes = pick(args.shapes, SHAPES, "shape")
    variants = pick(args.variants, VARIANTS, "variant")
    out = Path(args.out)
    base_overrides = [*args.set, "runtime.progress=false"]
    started = time.perf_counter()
    try:
        base = load_config(args.config, base_overrides)
    except FedtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    layers = num_layers(base)

    outcomes: dict[str, list[Outcome]] = {}
    runner = VariantRunner(args.config, args.set, out, args.fresh, None if args.no_warmup else WARMUP)
    for shape in shapes:
        s_overrides, notes = shape_overrides(shape, base.split.cut, layers)
        print(f"{SHAPE_TITLES[shape]}: {', '.join(variants)}", flush=True)
        for note in notes:
            print(f"  note: {note}", flush=True)
        outcomes[shape] = [runner.run(shape, variant, [*s_overrides, *VARIANT_SETS[variant]], notes)
                           for variant in variants]

    results: dict[str, dict[str, Any]] = {}
    target_lines: list[str] = []
    for shape in shapes:
        vanilla = next((o for o in outcomes[shape] if o.variant == "vanilla" and o.summary), None)
        vanilla_loss = vanilla.summary.get("final", {}).get("eval_loss") if vanilla else None
        rows = [row_of(o, vanilla_loss) for o in outcomes[shape]]
        lines, data = targets(shape, rows)
        target_lines += lines
        results[shape] = {"title": SHAPE_TITLES[shape], "overrides": shape_overrides(shape, base.split.cut, layers)[0],
                          "rows": rows, "target": data}

    model = next((o.summary["model"] for os_ in outcomes.values() for o in os_ if o.summary and "model" in o.summary), {})
    reused, resumed = labels_with(outcomes, "reused"), labels_with(outcomes, "resumed")
    c = base.compression
    steps = (f"local epochs {base.train.local_epochs:g}" if base.train.local_epochs is not None
             else f"local steps {base.train.local_steps}")
    md: list[str] = [
        "# SplitCom benchmark",
        "",
        f"model: {model.get('name') or model.get('source', '?')} on {model.get('device', '?')}; "
        f"config {args.config} {' '.join(args.set)}".rstrip(),
        f"equal samples: rounds {base.federation.rounds}, clients {base.federation.num_clients} "
        f"({base.partition.method}), {steps}, batch {base.train.batch_size}, train samples "
        f"{base.data.max_train_samples}, length {base.data.max_length}, seed {base.seed}; lora.r {base.lora.r}; "
        f"split cut {base.split.cut}" + (f"; model blocks {layers}" if layers else ""),
        f"compression: metric {c.metric}, projection {c.projection_dim}, theta {c.theta:g}, bang-bang "
        f"{c.theta_low:g}/{c.theta_high:g} (tolerance {c.tolerance:g}), ddpg [{c.theta_min:g}, {c.theta_max:g}] "
        f"lambda {c.ddpg_lambda:g} sigma {c.ddpg_sigma:g}, cache {c.cache_dtype}",
    ]
    if reused:
        md.append(f"reused (summary.json of the same config.toml; not rerun, wall measured then): {', '.join(reused)}")
    if resumed:
        md.append(f"resumed from checkpoint: {', '.join(resumed)}")
    for shape, res in results.items():
        md += ["", f"## {res['title']}", "", table(res["rows"], shape == "ushape")]
        extra = []
        for r in res["rows"]:
            if r["status"] == "failed":
                extra.append(f"- {r['variant']} failed: {r['error']}")
        for note in (res["rows"][0]["notes"] if res["rows"] else []):
            extra.append(f"- note: {note}")
        if shape == "ushape":
            more = ushape_ratios(res["rows"])
            if more:
                extra += ["", "upload ratio per epoch of the other U-shape interfaces:", *more]
        if extra:
            md += ["", *extra]
    md += ["", "## Targets", "", *target_lines, "",
           "Reductions: 1 - bytes / the run's own uncompressed equivalent (uplink / total: every message, LoRA adapter "
           "uploads included; exchange: the split interfaces only). Loss vs vanilla: relative change of the final "
           "eval loss against the vanilla run of the same shape. Upload ratio: samples sent / samples offered on the "
           "activations interface, per data epoch."]
    publish(out, md, {
        "args": vars(args), "model": model, "num_layers": layers, "shapes": results,
        "target_lines": target_lines, "reused": reused, "resumed": resumed,
    }, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
