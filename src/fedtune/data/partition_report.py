"""What a partition looks like: per-client sizes, token lengths, label and length-class mixes (``partition.json``),
as a plain-text table and as ``partition.png``."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from fedtune.data.partition import OTHER, TOP_LABELS, length_classes

def _entropy(counts: Counter) -> float:
    total = sum(counts.values())
    return float(-sum(c / total * math.log(c / total) for c in counts.values() if c)) if total else 0.0


#: Characters of a label shown in the partition table and plot (the whole label stays in partition.json).
LABEL_WIDTH = 24


def short_label(text: Any, width: int = LABEL_WIDTH) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis."""
    line = " ".join(str(text).split())
    return line if len(line) <= width else line[: width - 1] + "…"


def length_stats(lengths: np.ndarray) -> dict[str, float]:
    """Token lengths' min, median, 90th percentile and max (empty: zeros)."""
    if len(lengths) == 0:
        return {"min": 0, "median": 0.0, "p90": 0.0, "max": 0}
    return {"min": int(lengths.min()), "median": float(np.median(lengths)),
            "p90": round(float(np.percentile(lengths, 90)), 1), "max": int(lengths.max())}


def partition_summary(
    train: datasets.Dataset, parts: list[list[int]], label_column: str | None, num_length_classes: int = 4
) -> dict[str, Any]:
    """Per-client sizes, token lengths (mean, min / median / p90 / max), top labels (with share and entropy) and
    length-class mix."""
    labels = [str(v) for v in list(train[label_column])] if label_column and label_column in train.column_names else None
    lengths = np.asarray(list(train["length"])) if "length" in train.column_names else None
    classes, edges = length_classes(lengths, num_length_classes) if lengths is not None else (None, [])
    clients = []
    for client, rows in enumerate(parts):
        entry: dict[str, Any] = {"client": client, "num_samples": len(rows), "mean_length": None}
        if lengths is not None:
            entry["mean_length"] = round(float(lengths[rows].mean()), 2) if rows else 0.0
            entry["length"] = length_stats(lengths[rows])
            entry["length_classes"] = np.bincount(classes[rows], minlength=num_length_classes).tolist()
        if labels is not None:
            counts = Counter(labels[i] for i in rows)
            top = counts.most_common(TOP_LABELS)
            hist = dict(top)
            rest = len(rows) - sum(hist.values())
            if rest:
                hist[OTHER] = rest
            entry["labels"] = hist
            entry["top_label"] = top[0][0] if top else None
            entry["top_label_share"] = round(top[0][1] / len(rows), 4) if top else 0.0
            entry["label_entropy"] = round(_entropy(counts), 4)
        clients.append(entry)
    return {
        "label_column": label_column if labels is not None else None,
        "num_clients": len(parts),
        "num_samples": int(sum(len(p) for p in parts)),
        "length_class_edges": edges,
        "length": length_stats(lengths[[i for p in parts for i in p]]) if lengths is not None else None,
        "clients": clients,
    }


def format_partition_table(summary: dict[str, Any]) -> str:
    """A plain-text table: client, samples, token lengths, top label and its share (labels cut to one short line);
    then what the token window did to the training rows, where the summary has it."""
    label = summary.get("label_column")
    header = (f"{'client':>6}  {'samples':>7}  {'mean len':>8}  {'median / p90 / max':>18}  "
              + (f"top {short_label(label)} (share)" if label else "length classes"))
    lines = [header, "-" * len(header)]
    for c in summary["clients"]:
        mean = "-" if c.get("mean_length") is None else f"{c['mean_length']:.1f}"
        spread = _spread(c.get("length"))
        if label:
            extra = (f"{short_label(c['top_label'])} ({c['top_label_share']:.0%})" if c.get("top_label") is not None
                     else "-")
        else:
            extra = " ".join(map(str, c.get("length_classes", []))) or "-"
        lines.append(f"{c['client']:>6}  {c['num_samples']:>7}  {mean:>8}  {spread:>18}  {extra}")
    if summary.get("length"):
        lines.append(f"{'all':>6}  {summary['num_samples']:>7}  {'':>8}  {_spread(summary['length']):>18}")
    window = truncation_line(summary.get("truncation"))
    if window:
        lines.append(window)
    return "\n".join(lines)


def _spread(stats: dict[str, float] | None) -> str:
    return "-" if not stats else f"{stats['median']:g} / {stats['p90']:g} / {stats['max']}"


def truncation_line(t: dict[str, int] | None) -> str:
    """``'128-token window: 33 of 480 training rows cut, ...'`` ('' without the counts)."""
    if not t:
        return ""
    return (f"{t['max_length']}-token window: {t['truncated']} of {t['rows']} training rows cut, "
            f"{t['dropped_no_room']} dropped (the prompt fills the window), {t['dropped_empty']} dropped (empty "
            "response)")


def plot_partition(summary: dict[str, Any], path: Path) -> None:
    """PNG with samples per client (bar) and the stacked label (or length-class) mix per client."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    clients = summary["clients"]
    x = np.arange(len(clients))
    fig = Figure(figsize=(max(8.0, 0.5 * len(clients) + 7), 4), layout="constrained")
    FigureCanvasAgg(fig)  # Agg canvas for this figure only; the global pyplot backend is untouched
    ax1, ax2 = fig.subplots(1, 2)
    ax1.bar(x, [c["num_samples"] for c in clients], color="tab:blue")
    ax1.set(title="Samples per client", xlabel="client", ylabel="samples", xticks=x)

    use_labels = summary.get("label_column") and all("labels" in c for c in clients)
    if use_labels:
        mixes = [c["labels"] for c in clients]
        legend_title = short_label(summary["label_column"])
        title = f"{legend_title} mix per client"
    else:
        mixes = [{f"class {k}": v for k, v in enumerate(c.get("length_classes", []))} for c in clients]
        title, legend_title = "length-class mix per client", "length class"
    totals: Counter = Counter()
    for mix in mixes:
        totals.update(mix)
    keys = [k for k, _ in totals.most_common() if k != OTHER] + ([OTHER] if OTHER in totals else [])
    colors = colormaps["tab20"]
    bottom = np.zeros(len(clients))
    for i, key in enumerate(keys):
        share = np.array([mix.get(key, 0) / max(1, sum(mix.values())) for mix in mixes])
        ax2.bar(x, share, bottom=bottom, label=short_label(key), color="lightgrey" if key == OTHER else colors(i % 20))
        bottom += share
    ax2.set(title=title, xlabel="client", ylabel="share", xticks=x, ylim=(0, 1))
    if keys:
        ax2.legend(title=legend_title, fontsize="x-small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
