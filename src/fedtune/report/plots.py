"""Evaluation-loss plots: loss vs round and loss vs cumulative communication, for one run or several.

Figures are built with :class:`matplotlib.figure.Figure` directly, so no GUI backend is needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

_MB = 1e6  # plots use base-1000 megabytes, matching fedtune.report.render.format_bytes


def cumulative_bytes(metrics: list[dict[str, Any]]) -> list[int]:
    """Uplink + downlink bytes up to and including each round (per-round sums when ``cum_*`` keys are absent)."""
    out: list[int] = []
    up = down = 0
    for row in metrics:
        up = row["cum_uplink_bytes"] if row.get("cum_uplink_bytes") is not None else up + (row.get("uplink_bytes") or 0)
        down = (
            row["cum_downlink_bytes"]
            if row.get("cum_downlink_bytes") is not None
            else down + (row.get("downlink_bytes") or 0)
        )
        out.append(int(up) + int(down))
    return out


def _eval_points(metrics: list[dict[str, Any]]) -> tuple[list[int], list[float], list[float]]:
    """(rounds, cumulative MB, eval losses) for the rounds that have an eval loss."""
    rounds, mbytes, losses = [], [], []
    for row, cum in zip(metrics, cumulative_bytes(metrics)):
        if row.get("eval_loss") is None:
            continue
        rounds.append(int(row.get("round", len(rounds))))
        mbytes.append(cum / _MB)
        losses.append(float(row["eval_loss"]))
    return rounds, mbytes, losses


def _draw(runs: dict[str, list[dict[str, Any]]], path: Path, title: str, legend: bool) -> None:
    """Draw the two panels for every run and save a PNG to ``path``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_round, ax_bytes = fig.subplots(1, 2)
    all_mb: list[float] = []
    for label, metrics in runs.items():
        rounds, mbytes, losses = _eval_points(metrics)
        all_mb.extend(mbytes)
        ax_round.plot(rounds, losses, marker="o", markersize=3, label=label)
        ax_bytes.plot(mbytes, losses, marker="o", markersize=3, label=label)
    positive = [x for x in all_mb if x > 0]
    if positive and max(positive) / min(positive) > 100:  # spans more than two decades
        if len(positive) < len(all_mb):  # keep the zero-byte initial evaluation visible
            ax_bytes.set_xscale("symlog", linthresh=10 ** math.floor(math.log10(min(positive))))
        else:
            ax_bytes.set_xscale("log")
    if not all_mb:
        for ax in (ax_round, ax_bytes):
            ax.text(0.5, 0.5, "no evaluation results", ha="center", va="center", transform=ax.transAxes)
    ax_round.set_xlabel("Round")
    ax_bytes.set_xlabel("Cumulative communication, uplink + downlink (MB, 1 MB = 10^6 B)")
    for ax in (ax_round, ax_bytes):
        ax.set_ylabel("Eval loss")
        ax.grid(True, alpha=0.3)
        if legend and all_mb:
            ax.legend()
    ax_round.set_title("Eval loss vs round")
    ax_bytes.set_title("Eval loss vs communication")
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")


def plot_eval_loss(metrics: list[dict[str, Any]], path: Path, title: str = "Evaluation loss") -> None:
    """Write one PNG: eval loss vs round and vs cumulative bytes; rounds without an eval loss are skipped."""
    _draw({"eval loss": metrics}, path, title, legend=False)


def plot_comparison(runs: dict[str, list[dict[str, Any]]], path: Path, title: str = "Evaluation loss") -> None:
    """Write one PNG with the same two panels as :func:`plot_eval_loss`, one line per run label."""
    _draw(runs, path, title, legend=True)
