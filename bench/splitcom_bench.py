"""SplitCom benchmark: split federated LoRA with and without compression of what crosses the cut.

Each split shape has its shipped configuration (fedtune's SplitCom settings): the standard split (the client holds
the first `split.cut` blocks) is configs/splitcom.toml, the U-shape (the client also keeps the last `split.tail` = 1
blocks, final norm, LM head and labels) configs/splitcom-ushape.toml. Per shape the variants below run on the same
model, data, samples, rounds and seed, each into its own run directory under --out/<shape>/<variant>:

    vanilla        every compression stage off (plain SFL, the reference)
    reuse          SplitCom temporal reuse alone (fixed threshold, nothing coded)
    reuse+int8     reuse, uploads int8 per token (the best of fedtune before issue 20)
    shipped        the configuration as shipped
    shipped-zstd   shipped without entropy coding (what zstd adds)
    sample-cosine  shipped with the paper's whole-sample cosine instead of the least similar token's
    no-reuse       shipped without reuse: every sample sent every step, coded (what the codecs alone cost in quality)
    residual       shipped, changed samples sent as residuals against the held copy (error feedback)
    one-theta      shipped without per-interface thresholds (U-shape: the body output at theta 0.999 too)
    tgrad-int4     U-shape shipped with the tail gradients in topk-int4 instead of topk-int2
    fixed          shipped with the fixed threshold controller (theta = compression.theta)
    bangbang       shipped with the bang-bang threshold controller
    ddpg           shipped with the DDPG threshold controller
    budget         shipped with the budget controller (each session sends compression.byte_budget of its bytes)

Targets (issue 20, on SmolLM2 / E2E, at most 10 epochs): standard `comm.uplink_reduction` >= 99.0 %, U-shape
`comm.total_reduction` >= 97.0 %, each at an eval loss within 1 % of vanilla's and a task metric (BLEU, ROUGE-L)
within 1 point. Reductions are against each run's own uncompressed equivalent from its ledger and include every
message (LoRA adapter downloads and uploads too); the split-exchange-only reductions are reported alongside.

A variant whose run directory already holds a summary.json written by the same configuration (config.toml)
is reused, not rerun (so an interrupted benchmark continues); one with a checkpoint of the same configuration
but no summary is resumed. --fresh reruns everything. Wall times of reused runs were measured when they ran.
Besides results.md / result.json it draws frontier.png (total bytes against eval loss, every variant a point) and
reduction_by_epoch.png (the cumulative reduction after each epoch).

    python bench/splitcom_bench.py                                   # SmolLM2, the shipped configs
    python bench/splitcom_bench.py --shapes standard --variants vanilla,shipped
    python bench/splitcom_bench.py --config configs/tiny.toml --ushape-config configs/tiny.toml --set split.cut=2 \\
        --set federation.rounds=3 --set train.local_steps=3 --out /tmp/splitcom-tiny
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from variant_runs import Outcome, VariantRunner, add_run_arguments, labels_with, num_layers, publish

from fedtune.compression.budget import BudgetSettings
from fedtune.config import load_config
from fedtune.core.errors import FedtuneError

SHAPES = ("standard", "ushape")
SHAPE_TITLES = {"standard": "standard split", "ushape": "U-shape split"}
VARIANTS = ("vanilla", "reuse", "reuse+int8", "shipped", "shipped-zstd", "sample-cosine", "no-reuse", "residual",
            "one-theta", "tgrad-int4", "fixed", "bangbang", "ddpg", "budget")
MB = 1e6
LOSS_TOLERANCE_PCT = 1.0  # "within 1 % of vanilla"
METRIC_TOLERANCE_POINTS = 1.0  # "the task metric within 1 point of vanilla"
TARGETS = {  # shape -> (summary key under comm, label, target reduction %)
    "standard": ("uplink_reduction", "uplink reduction", 99.0),
    "ushape": ("total_reduction", "total reduction", 97.0),
}
IFACE_SHORT = {"activations": "act", "body_output": "out", "tail_gradients": "tgrad", "gradients": "grad"}

#: The budget controller's knobs at their defaults: a run with reuse off reads none of them, so one vanilla run
#: serves shipped configs that differ only there.
BUDGET_DEFAULTS = [f"compression.{k}={BudgetSettings.model_fields[k].default}" for k in ("byte_budget", "budget_gain")]
#: Every compression stage off: vanilla's overrides, and the start of the variants that take stages away.
OFF = ["compression.method=none", "compression.codec=none", "compression.residual=false", "compression.entropy=none",
       "compression.adapter_codec=none", "compression.adapter_download_codec=none", "compression.per_interface={}",
       "compression.error_feedback=false", "compression.controller=fixed", "compression.thresholds={}",
       "compression.resend_budget=none", "compression.metric=cosine", *BUDGET_DEFAULTS]
VARIANT_SETS: dict[str, list[str]] = {
    "vanilla": OFF,
    "reuse": [*OFF, "compression.method=splitcom"],
    "reuse+int8": [*OFF, "compression.method=splitcom", "compression.codec=int8"],
    "shipped": [],
    "shipped-zstd": ["compression.entropy=none"],
    "sample-cosine": ["compression.metric=cosine"],
    "no-reuse": ["compression.method=none"],
    "residual": ["compression.residual=true"],
    "one-theta": ["compression.thresholds={}"],
    "tgrad-int4": ["compression.per_interface.tail_gradients.codec=topk-int4"],
    "fixed": ["compression.controller=fixed"],
    "bangbang": ["compression.controller=bangbang"],
    "ddpg": ["compression.controller=ddpg"],
    "budget": ["compression.controller=budget"],
}


# ---------------------------------------------------------------------------------------------
# Configurations


def shape_overrides(shape: str, cut: int, layers: int | None) -> tuple[list[str], list[str]]:
    """(--set overrides, notes) for the split shape; the cut is the shape's config's split.cut."""
    notes: list[str] = []
    if shape == "standard":
        return ["paradigm=split", "split.ushape=false"], notes
    tail, head = 1, cut
    if layers is not None and head + tail >= layers:
        head = max(1, layers - 1 - tail)
        notes.append(f"U-shape head clamped from {cut} to {head} blocks (model has {layers}, tail {tail})")
    return ["paradigm=split", "split.ushape=true", f"split.cut={head}", f"split.tail={tail}"], notes


WARMUP = ["paradigm=split", "split.ushape=false", *OFF, "federation.rounds=1", "train.local_epochs=0.001",
          "data.max_eval_samples=8", "eval.max_new_tokens=4"]


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


def cumulative_reductions(run_dir: str, key: str) -> list[float]:
    """``comm.<key>`` (uplink_reduction or total_reduction) after each round, from the run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        m = json.loads(line)
        if not m.get("round"):
            continue
        up, up0 = m.get("cum_uplink_bytes"), m.get("cum_uncompressed_uplink_bytes", m.get("cum_uplink_bytes"))
        down, down0 = m.get("cum_downlink_bytes"), m.get("cum_uncompressed_downlink_bytes", m.get("cum_downlink_bytes"))
        actual, base = (up, up0) if key == "uplink_reduction" else (up + down, up0 + down0)
        out.append(1.0 - actual / base if base else 0.0)
    return out


def row_of(o: Outcome, vanilla_loss: float | None, key: str) -> dict[str, Any]:
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
        "metrics": s.get("final", {}).get("metrics") or {},
        "reduction_by_epoch": cumulative_reductions(o.run_dir, key),
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


HEADER = ("variant", "eval loss after", "loss vs vanilla", "BLEU / ROUGE-L (vs vanilla)", "uplink MB", "downlink MB",
          "uplink red. %", "total red. %", "exchange up / total red. %", "activation upload ratio per epoch",
          "final theta(s)", "wall s")


def _metric_text(r: dict[str, Any], vanilla: dict[str, Any] | None) -> str:
    m = r["metrics"]
    if "bleu" not in m:
        return "—"
    text = f"{m['bleu']:.2f} / {m['rougeL']:.2f}"
    v = (vanilla or {}).get("metrics") or {}
    if r["variant"] != "vanilla" and "bleu" in v:
        text += f" ({m['bleu'] - v['bleu']:+.2f} / {m['rougeL'] - v['rougeL']:+.2f})"
    return text


def table(rows: list[dict[str, Any]], ushape: bool) -> str:
    vanilla = next((r for r in rows if r["variant"] == "vanilla"), None)
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] * len(HEADER)) + "|"]
    for r in rows:
        name = r["variant"] + (f" ({r['status']})" if r["status"] in ("reused", "resumed") else "")
        if r["status"] == "failed":
            lines.append("| " + " | ".join([name, "FAILED", *["—"] * (len(HEADER) - 2)]) + " |")
            continue
        rel = ("ref" if r["variant"] == "vanilla" else
               "—" if r["loss_vs_vanilla_pct"] is None else f"{r['loss_vs_vanilla_pct']:+.1f} %")
        cells = [name, _f(r["final_eval_loss"], digits=4), rel, _metric_text(r, vanilla), _f(r["uplink_bytes"], MB, 3),
                 _f(r["downlink_bytes"], MB, 3), _p(r["uplink_reduction"]), _p(r["total_reduction"]),
                 f"{_p(r['exchange_uplink_reduction'])} / {_p(r['exchange_total_reduction'])}",
                 _ratios(r["upload_ratio_per_epoch"].get("activations", [])),
                 _theta_text(r["thetas"], ushape), _f(r["wall_s"], digits=1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def interface_table(rows: list[dict[str, Any]]) -> str:
    """Bytes per interface (MB sent / MB uncompressed) and the adapters, one row per variant."""
    names = list(next((r["interface_bytes"] for r in rows if r["interface_bytes"]), {}))
    head = ["variant", *names, "LoRA adapters (both ways)", "cumulative reduction after epoch 1..N %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        if r["status"] == "failed":
            continue
        cells = [r["variant"]]
        for n in names:
            sent, plain = r["interface_bytes"].get(n), r["interface_uncompressed_bytes"].get(n)
            cells.append(f"{_f(sent, MB, 3)} / {_f(plain, MB, 1)}")
        cells.append(_f(r["adapter_bytes"], MB, 3))
        cells.append(" ".join(f"{v * 100:.1f}" for v in r["reduction_by_epoch"]) or "—")
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


def metric_within(r: dict[str, Any], vanilla: dict[str, Any]) -> bool:
    """BLEU and ROUGE-L at most METRIC_TOLERANCE_POINTS below vanilla's (true where the run has no task metric)."""
    m, v = r["metrics"], vanilla["metrics"]
    return all(m[k] >= v[k] - METRIC_TOLERANCE_POINTS for k in ("bleu", "rougeL") if k in m and k in v)


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
    within = [r for r in ok if r["loss_vs_vanilla_pct"] <= LOSS_TOLERANCE_PCT and metric_within(r, vanilla)]
    lines: list[str] = []
    if not within:
        data["verdict"] = "missed"
        lines.append(f"- {title}: target {label} {target} % at eval loss within {LOSS_TOLERANCE_PCT:g} % of vanilla "
                     f"({vanilla['final_eval_loss']:.4f}): MISSED — no compressed variant stays within the loss and "
                     "metric bounds")
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
    outside = [r for r in ok if r not in within]
    if outside:
        best_any = max(ok, key=lambda r: r[key])
        if best_any in outside:
            data["best_any_variant"] = best_any["variant"]
            data["best_any_pct"] = best_any[key] * 100
            lines.append(f"  - outside the loss or task-metric bound: {best_any['variant']} reaches {best_any[key] * 100:.2f} % "
                         f"at {best_any['loss_vs_vanilla_pct']:+.2f} % loss vs vanilla")
        lines.append("  - outside the 1 % loss bound or 1 point below vanilla's task metric: " + ", ".join(
            f"{r['variant']} ({r['loss_vs_vanilla_pct']:+.2f} %)" for r in outside))
    return lines, data


# ---------------------------------------------------------------------------------------------
# Main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, config="configs/splitcom.toml", out="bench/out/splitcom")
    parser.add_argument("--ushape-config", default="configs/splitcom-ushape.toml", help="the U-shape's config")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: tabulate the chosen variants that have a finished run under --out")
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
    configs = {"standard": args.config, "ushape": args.ushape_config}
    try:
        bases = {shape: load_config(configs[shape], base_overrides) for shape in shapes}
    except FedtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    base = bases[shapes[0]]
    layers = num_layers(base)

    outcomes: dict[str, list[Outcome]] = {}
    warmup = None if args.no_warmup else WARMUP
    for shape in shapes:
        runner = VariantRunner(configs[shape], args.set, out, args.fresh, warmup)
        s_overrides, notes = shape_overrides(shape, bases[shape].split.cut, layers)
        print(f"{SHAPE_TITLES[shape]} ({configs[shape]}): {', '.join(variants)}", flush=True)
        for note in notes:
            print(f"  note: {note}", flush=True)
        chosen = [v for v in variants if not args.report_only or (out / shape / v / "summary.json").exists()]
        outcomes[shape] = [runner.run(shape, variant, [*s_overrides, *VARIANT_SETS[variant]], notes)
                           for variant in chosen]
        warmup = runner.warmup  # None once one runner warmed up

    results: dict[str, dict[str, Any]] = {}
    target_lines: list[str] = []
    for shape in shapes:
        vanilla = next((o for o in outcomes[shape] if o.variant == "vanilla" and o.summary), None)
        vanilla_loss = vanilla.summary.get("final", {}).get("eval_loss") if vanilla else None
        rows = [row_of(o, vanilla_loss, TARGETS[shape][0]) for o in outcomes[shape]]
        lines, data = targets(shape, rows)
        target_lines += lines
        results[shape] = {"title": SHAPE_TITLES[shape], "config": configs[shape],
                          "overrides": shape_overrides(shape, bases[shape].split.cut, layers)[0],
                          "rows": rows, "target": data}

    model = next((o.summary["model"] for os_ in outcomes.values() for o in os_ if o.summary and "model" in o.summary), {})
    reused, resumed = labels_with(outcomes, "reused"), labels_with(outcomes, "resumed")
    c = base.compression
    per_interface = {k: v.model_dump(exclude_none=True) for k, v in c.per_interface.items()}
    steps = (f"local epochs {base.train.local_epochs:g}" if base.train.local_epochs is not None
             else f"local steps {base.train.local_steps}")
    md: list[str] = [
        "# SplitCom benchmark",
        "",
        f"model: {model.get('name') or model.get('source', '?')} on {model.get('device', '?')}; "
        f"configs {', '.join(configs[sh] for sh in shapes)} {' '.join(args.set)}".rstrip(),
        f"equal samples: rounds {base.federation.rounds}, clients {base.federation.num_clients} "
        f"({base.partition.method}), {steps}, batch {base.train.batch_size}, train samples "
        f"{base.data.max_train_samples}, length {base.data.max_length}, seed {base.seed}; lora.r {base.lora.r}; "
        f"split cut {base.split.cut}" + (f"; model blocks {layers}" if layers else ""),
        f"shipped compression: method {c.method}, controller {c.controller}, theta {c.theta:g}, codec {c.codec}, "
        f"residual {c.residual}, entropy {c.entropy}, adapter codec {c.adapter_codec} (download "
        f"{c.adapter_download_codec}), per interface {json.dumps(per_interface)}"
        f"; metric {c.metric}, projection {c.projection_dim}, cache {c.cache_dtype}; bang-bang {c.theta_low:g}/"
        f"{c.theta_high:g} (tolerance {c.tolerance:g}), ddpg [{c.theta_min:g}, {c.theta_max:g}] lambda "
        f"{c.ddpg_lambda:g} sigma {c.ddpg_sigma:g}" + ("" if len(bases) == 1 else " (U-shape: see its config)"),
    ]
    if reused:
        md.append(f"reused (summary.json of the same config.toml; not rerun, wall measured then): {', '.join(reused)}")
    if resumed:
        md.append(f"resumed from checkpoint: {', '.join(resumed)}")
    for shape, res in results.items():
        md += ["", f"## {res['title']} ({res['config']})", "", table(res["rows"], shape == "ushape"), "",
               "bytes per interface (MB sent / MB uncompressed), adapters, and the cumulative reduction "
               f"({TARGETS[shape][1]}) after each epoch:", "", interface_table(res["rows"])]
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
    md += ["", *plot(results, out)]
    publish(out, md, {
        "args": vars(args), "seed": base.seed, "data": base.data.dataset, "model": model, "num_layers": layers, "shapes": results,
        "target_lines": target_lines, "reused": reused, "resumed": resumed,
    }, started)
    return 0


def plot(results: dict[str, dict[str, Any]], out: Path) -> list[str]:
    """frontier.png (total bytes against eval loss) and reduction_by_epoch.png; the lines naming them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (shape, res) in zip(axes[0], results.items()):
        for r in res["rows"]:
            if r["total_bytes"] is None or r["final_eval_loss"] is None:
                continue
            ax.scatter(r["total_bytes"] / MB, r["final_eval_loss"])
            ax.annotate(r["variant"], (r["total_bytes"] / MB, r["final_eval_loss"]), fontsize=8,
                        xytext=(4, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("total bytes, MB (log)")
        ax.set_ylabel("final eval loss")
        ax.set_title(res["title"])
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (shape, res) in zip(axes[0], results.items()):
        key, label, target = TARGETS[shape]
        for r in res["rows"]:
            if r["variant"] != "vanilla" and r["reduction_by_epoch"]:
                values = r["reduction_by_epoch"]
                ax.plot(range(1, len(values) + 1), [v * 100 for v in values], marker="o", label=r["variant"])
        ax.axhline(target, color="grey", linestyle="--", label=f"target {target:g} %")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"cumulative {label} %")
        ax.set_title(res["title"])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reduction_by_epoch.png", dpi=120)
    plt.close(fig)
    return [f"plots: {out / 'frontier.png'} (total bytes against eval loss), {out / 'reduction_by_epoch.png'} "
            "(cumulative reduction after each epoch)"]


if __name__ == "__main__":
    sys.exit(main())
