"""The ``fedtune compare`` report: one table and one figure per sweep cell, all paradigms side by side.

Columns come from each run's ``summary.json`` and ``metrics.jsonl``. "Bytes to target" is the cumulative
uplink + downlink at the first evaluation whose loss is at or below the target: ``--target-loss``, or by default the
highest final eval loss among the compared (non-baseline) paradigms that ended below their initial loss, so that
each of those reaches it after some training (a paradigm that got worse does not lift the target above the start).
"""

from __future__ import annotations

import json
from itertools import accumulate
from pathlib import Path
from typing import Any, Iterable

from fedtune.core.files import atomic_write
from fedtune.report.plots import cumulative_bytes, plot_comparison
from fedtune.report.render import NA, fmt_num, format_bytes, format_flops, format_seconds, md_table, read_metrics

Cell = dict[str, str]


def at_target(metrics: list[dict[str, Any]], target: float, totals: Iterable[float]) -> float | None:
    """The running total (one per metrics row) at the first evaluation with loss <= ``target``; None if never."""
    for row, total in zip(metrics, totals):
        if row.get("eval_loss") is not None and row["eval_loss"] <= target:
            return total
    return None


def bytes_to_target(metrics: list[dict[str, Any]], target: float) -> int | None:
    """Cumulative bytes at the first evaluation with loss <= ``target``; None if never reached."""
    return at_target(metrics, target, cumulative_bytes(metrics))


def simulated_to_target(metrics: list[dict[str, Any]], target: float) -> float | None:
    """Cumulative simulated seconds at the first evaluation with loss <= ``target``; None if never reached."""
    return at_target(metrics, target, accumulate(row.get("sim_s") or 0.0 for row in metrics))


TARGET_NOTE = " (highest final loss among the compared paradigms that improved on their initial loss)"


def default_target(summaries: list[dict[str, Any]]) -> float | None:
    """The highest final eval loss among runs whose final loss is below their initial loss (None if none improved)."""
    improved = [s["final"]["eval_loss"] for s in summaries
                if s["final"]["eval_loss"] is not None and s["final"]["eval_loss"] < s["initial"]["eval_loss"]]
    return max(improved) if improved else None


def _metric_text(metrics: dict[str, float] | None) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in sorted((metrics or {}).items())) or NA


def comparison_row(paradigm: str, summary: dict[str, Any], metrics: list[dict[str, Any]],
                   target: float | None) -> dict[str, Any]:
    """The numbers one table row shows (raw values, for compare.json too)."""
    rounds = max(int(summary.get("rounds") or 1), 1)
    comm, time = summary.get("comm", {}), summary.get("time", {})
    return {
        "paradigm": paradigm,
        "initial_eval_loss": summary["initial"]["eval_loss"], "final_eval_loss": summary["final"]["eval_loss"],
        "final_metrics": summary["final"].get("metrics"),
        "uplink_bytes": comm.get("uplink_bytes", 0), "downlink_bytes": comm.get("downlink_bytes", 0),
        "uplink_per_round": comm.get("uplink_bytes", 0) / rounds,
        "downlink_per_round": comm.get("downlink_bytes", 0) / rounds,
        "bytes_to_target": None if target is None else bytes_to_target(metrics, target),
        "client_flops": summary["compute"]["client_flops"], "server_flops": summary["compute"]["server_flops"],
        "client_peak_bytes": summary.get("memory", {}).get("client_peak_bytes"),
        "wall_s": time.get("wall_s"), "simulated_s": time.get("simulated_s"),
    }


def _table(rows: list[dict[str, Any]]) -> list[str]:
    header = ["paradigm", "eval loss (before → after)", "task metric", "up / round", "down / round", "total bytes",
              "bytes to target", "client FLOPs", "server FLOPs", "client peak mem", "wall", "simulated"]
    body = [[r["paradigm"], f"{fmt_num(r['initial_eval_loss'])} → {fmt_num(r['final_eval_loss'])}",
             _metric_text(r["final_metrics"]), format_bytes(r["uplink_per_round"]),
             format_bytes(r["downlink_per_round"]), format_bytes(r["uplink_bytes"] + r["downlink_bytes"]),
             "not reached" if r["bytes_to_target"] is None else format_bytes(r["bytes_to_target"]),
             format_flops(r["client_flops"]), format_flops(r["server_flops"]), format_bytes(r["client_peak_bytes"]),
             format_seconds(r["wall_s"]), format_seconds(r["simulated_s"])] for r in rows]
    return md_table(header, body)


def findings(rows: list[dict[str, Any]], baselines: list[str]) -> list[str]:
    """Which compared paradigm is lowest in client compute, communication and eval loss (measured, not assumed)."""
    compared = [r for r in rows if r["paradigm"] not in baselines]
    if not compared:
        return []

    def lowest(key) -> str:
        best = min(compared, key=key)
        values = ", ".join(f"{r['paradigm']} {key(r):.4g}" for r in compared)
        return f"{best['paradigm']} ({values})"

    return [f"- lowest client compute (FLOPs): {lowest(lambda r: r['client_flops'])}",
            f"- least communication (bytes): {lowest(lambda r: r['uplink_bytes'] + r['downlink_bytes'])}",
            f"- lowest final eval loss: {lowest(lambda r: r['final_eval_loss'])}"]


def _cell_title(cell: Cell) -> str:
    return ", ".join(f"{k} = {v}" for k, v in cell.items()) or "comparison"


def write_comparison(out: Path, cells: list[tuple[Cell, dict[str, Path]]], target_loss: float | None = None,
                     baselines: list[str] = ()) -> Path:
    """Write ``report.md``, ``compare.json`` and one PNG per cell into ``out``; return the report's path."""
    out = Path(out)
    lines = ["# fedtune comparison", "",
             "Same model, data, partition and seed for every paradigm; bytes are what crossed the transport "
             "(serialized), FLOPs the transformer estimate of what each side ran. Baselines: "
             f"{', '.join(baselines) or 'none'}.", ""]
    data = []
    for i, (cell, runs) in enumerate(cells):
        summaries = {p: json.loads((d / "summary.json").read_text()) for p, d in runs.items()}
        metrics = {p: read_metrics(d / "metrics.jsonl") for p, d in runs.items()}
        target = target_loss if target_loss is not None else default_target(
            [s for p, s in summaries.items() if p not in baselines])
        rows = [comparison_row(p, summaries[p], metrics[p], target) for p in runs]
        figure = f"compare-{i}.png"
        plot_comparison(metrics, out / figure, title=f"Eval loss: {_cell_title(cell)}")
        lines += [f"## {_cell_title(cell)}", "",
                  f"Target eval loss for 'bytes to target': {fmt_num(target)}"
                  f"{' (given)' if target_loss is not None else TARGET_NOTE}.",
                  "", *_table(rows), "", *findings(rows, list(baselines)), "", f"![eval loss]({figure})", "",
                  "Runs: " + ", ".join(f"`{p}`: {d.relative_to(out)}" for p, d in runs.items()), ""]
        data.append({"cell": cell, "target_loss": target, "rows": rows})
    atomic_write(out / "compare.json", json.dumps(data, indent=1).encode())
    atomic_write(out / "report.md", "\n".join(lines).encode())
    return out / "report.md"
