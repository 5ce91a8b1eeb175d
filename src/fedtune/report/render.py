"""Human-readable run reports: unit formatting, the summary table, ``report.md`` and the end-of-run console summary.

All byte sizes use base-1000 units (1 KB = 1000 B, 1 MB = 10^6 B), as do FLOP counts.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from fedtune.core.errors import FedtuneError

NA = "n/a"
_BYTE_UNITS = ("B", "KB", "MB", "GB", "TB", "PB")
_FLOP_UNITS = ("FLOP", "KFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP", "EFLOP")


def _scaled(n: float, units: tuple[str, ...]) -> str:
    value, i = float(n), 0
    while abs(value) >= 1000 and i < len(units) - 1:
        value, i = value / 1000, i + 1
    return f"{int(value)} {units[0]}" if i == 0 else f"{value:.1f} {units[i]}"


def format_bytes(n: float | None) -> str:
    """Bytes in base-1000 units with one decimal: ``512 B``, ``1.5 KB``, ``3.2 MB``, ``1.0 GB``."""
    return NA if n is None else _scaled(n, _BYTE_UNITS)


def format_flops(n: float | None) -> str:
    """FLOP counts in base-1000 units with one decimal, e.g. ``3.2 TFLOP``."""
    return NA if n is None else _scaled(n, _FLOP_UNITS)


def format_seconds(s: float | None) -> str:
    """Durations: ``12.3 s`` under a minute, ``4m 05s`` under an hour, else ``2h 03m 04s``."""
    if s is None:
        return NA
    if s < 60:
        return f"{s:.1f} s"
    total = int(round(s))
    h, rem = divmod(total, 3600)
    m, sec = divmod(rem, 60)
    return f"{m}m {sec:02d}s" if h == 0 else f"{h}h {m:02d}m {sec:02d}s"


def fmt_num(x: float | None, digits: int = 4) -> str:
    """``x`` with ``digits`` decimals, or n/a."""
    return NA if x is None else f"{x:.{digits}f}"


def _before_after(before: float | None, after: float | None, digits: int) -> str:
    return f"{fmt_num(before, digits)} → {fmt_num(after, digits)}"


def summary_table(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows for the headline numbers of a run; missing parts show as ``n/a``."""
    initial, final = summary.get("initial") or {}, summary.get("final") or {}
    comm, compute = summary.get("comm") or {}, summary.get("compute") or {}
    memory, time = summary.get("memory") or {}, summary.get("time") or {}
    total = comm.get("total_bytes")
    if total is None and comm.get("uplink_bytes") is not None and comm.get("downlink_bytes") is not None:
        total = comm["uplink_bytes"] + comm["downlink_bytes"]
    rounds = summary.get("rounds")
    return [
        ("Paradigm", str(summary.get("paradigm") or NA)),
        ("Rounds", NA if rounds is None else str(rounds)),
        ("Eval loss (before → after)", _before_after(initial.get("eval_loss"), final.get("eval_loss"), 4)),
        ("Perplexity (before → after)", _before_after(initial.get("eval_ppl"), final.get("eval_ppl"), 2)),
        *_metric_rows(initial.get("metrics") or {}, final.get("metrics") or {}),
        *_metric_scope(summary.get("eval") or {}),
        ("Uplink", format_bytes(comm.get("uplink_bytes"))),
        ("Downlink", format_bytes(comm.get("downlink_bytes"))),
        ("Total bytes", format_bytes(total)),
        ("Client FLOPs", format_flops(compute.get("client_flops"))),
        ("Server FLOPs", format_flops(compute.get("server_flops"))),
        ("Client peak memory", format_bytes(memory.get("client_peak_bytes"))),
        ("Wall time", format_seconds(time.get("wall_s"))),
        ("Simulated time", format_seconds(time.get("simulated_s"))),
    ] + _split_rows(summary) + _privacy_rows(summary)


def _metric_rows(initial: dict[str, float], final: dict[str, float]) -> list[tuple[str, str]]:
    """One row per task metric (BLEU, ROUGE-L, exact match), before → after."""
    return [(f"{name} (before → after)", _before_after(initial.get(name), final.get(name), 2))
            for name in sorted(set(initial) | set(final))]


def _metric_scope(ev: dict[str, Any]) -> list[tuple[str, str]]:
    """What the task metric was scored on (prompts and all their references), where the summary says."""
    if not ev.get("metric_prompts"):
        return []
    return [("Task metric scored on", f"{ev['metric_prompts']} prompts, {ev['metric_references']} references")]


def _split_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """Extra rows for split runs (exchange bytes, cut layers) and compressed runs (reductions)."""
    comm, rows = summary.get("comm") or {}, []
    if "activation_uplink_bytes" in comm:
        rows += [("Activations up", format_bytes(comm.get("activation_uplink_bytes"))),
                 ("Gradients down", format_bytes(comm.get("gradient_downlink_bytes")))]
        cuts = [c.get("cut_layer") for c in summary.get("clients") or [] if c.get("cut_layer")]
        if cuts:
            rows.append(("Cut layers (start → end)", " ".join(f"{h[0]}→{h[-1]}" for h in cuts)))
    if "uplink_reduction" in comm and not comm["uplink_reduction"] and not summary.get("compression"):
        rows.append(("Compression", "none (uncompressed: [compression] method and codecs off)"))
    elif "uplink_reduction" in comm:
        rows += [("Uplink reduction", f"{100 * comm['uplink_reduction']:.2f} %"),
                 ("Total reduction", f"{100 * comm['total_reduction']:.2f} %")]
    return rows


def _g(value: float | None) -> str:
    """A DP parameter as the report shows it (summary.json stores an infinite one as null)."""
    return "inf" if value is None or value == float("inf") else f"{value:.3g}"


def _privacy_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The privacy guarantee a run gives (client-level DP, sample-level DP-SGD), and an early stop for it."""
    rows = []
    dp = summary.get("privacy") or {}
    if dp.get("client_dp"):
        eps = "infinite (no noise: no guarantee)" if _g(dp["epsilon"]) == "inf" else _g(dp["epsilon"])
        rows.append(("Client-level DP", f"{dp['client_dp']}: epsilon {eps} at delta {dp['delta']:g} (noise "
                     f"multiplier {_g(dp['noise_multiplier'])}, clip {_g(dp['clip_norm_final'])}"
                     f"{', adaptive' if dp.get('adaptive_clip') else ''}; {dp['accountant']})"))
    if dp.get("sample_dp"):
        s = dp["sample_dp"]
        rows.append(("Sample-level DP-SGD", f"epsilon {_g(s['epsilon'])} at delta {s['delta']:g} (noise multiplier "
                     f"{_g(s['noise_multiplier'])}, clip {_g(s['clip_norm'])}; {s['accountant']})"))
    stopped = summary.get("stopped")
    if stopped:
        rows.append(("Stopped early", f"before round {stopped['before_round']}: {stopped['reason']}"))
    return rows


# --- reading a run directory -------------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Parse ``metrics.jsonl``; a missing file or a corrupt line raises :class:`FedtuneError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FedtuneError(f"metrics file not found: {path} (is this a fedtune run directory?)")
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FedtuneError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise FedtuneError(f"{path}: line {lineno} is not a JSON object")
        rows.append(row)
    return rows


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FedtuneError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise FedtuneError(f"{path} does not hold a JSON object")
    return data


def _run_name(run_dir: Path, summary: dict[str, Any]) -> str:
    if summary.get("name"):
        return str(summary["name"])
    config = run_dir / "config.toml"
    if config.is_file():
        try:
            name = tomllib.loads(config.read_text(encoding="utf-8")).get("name")
        except tomllib.TOMLDecodeError:
            name = None
        if name:
            return str(name)
    return run_dir.resolve().name


def _fill_from_metrics(summary: dict[str, Any], metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Fill summary parts a partial run did not write (e.g. it stopped early) from the per-round metrics."""
    if not metrics:
        return summary
    s = dict(summary)
    evals = [m for m in metrics if m.get("eval_loss") is not None]
    last = metrics[-1]
    s.setdefault("rounds", max(int(m.get("round", 0)) for m in metrics))
    if evals:
        s.setdefault("initial", {"eval_loss": evals[0]["eval_loss"], "eval_ppl": evals[0].get("eval_ppl")})
        train = [m["train_loss"] for m in metrics if m.get("train_loss") is not None]
        final = {"eval_loss": evals[-1]["eval_loss"], "eval_ppl": evals[-1].get("eval_ppl")}
        s.setdefault("final", {**final, "train_loss": train[-1] if train else None})
    up = last.get("cum_uplink_bytes") or sum(m.get("uplink_bytes") or 0 for m in metrics)
    down = last.get("cum_downlink_bytes") or sum(m.get("downlink_bytes") or 0 for m in metrics)
    s.setdefault("comm", {"uplink_bytes": up, "downlink_bytes": down, "total_bytes": up + down})
    s.setdefault(
        "compute",
        {k: sum(m.get(k) or 0 for m in metrics) for k in ("client_flops", "server_flops")},
    )
    peaks = [m["peak_memory_bytes"] for m in metrics if m.get("peak_memory_bytes") is not None]
    if peaks:
        s.setdefault("memory", {"client_peak_bytes": max(peaks)})
    wall = last.get("cum_wall_s") or sum(m.get("wall_s") or 0.0 for m in metrics)
    s.setdefault("time", {"wall_s": wall, "simulated_s": sum(m.get("sim_s") or 0.0 for m in metrics)})
    return s


# --- markdown ----------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[Any]], align: str = "") -> list[str]:
    """Markdown table lines; ``align`` holds one ``l``/``r`` per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def _fenced(text: Any) -> list[str]:
    """A fenced code block longer than any backtick run inside ``text``."""
    text = "" if text is None else str(text)
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return [fence, text, fence]


def _rounds_section(metrics: list[dict[str, Any]]) -> list[str]:
    rows = [
        [
            m.get("round", NA),
            fmt_num(m.get("train_loss")),
            fmt_num(m.get("eval_loss")),
            fmt_num(m.get("eval_ppl"), 2),
            format_bytes(m.get("uplink_bytes")),
            format_bytes(m.get("downlink_bytes")),
            format_flops(m.get("client_flops")),
            fmt_num(m.get("wall_s"), 1),
            sum(not r.get("retried") for r in m.get("rejected") or []),  # a retried lost turn's update arrived
        ]
        for m in metrics
    ]
    header = ["Round", "Train loss", "Eval loss", "PPL", "Up", "Down", "Client FLOPs", "Wall s", "Rejected"]
    return ["## Rounds", "", *md_table(header, rows), ""]


def _clients_section(clients: list[dict[str, Any]]) -> list[str]:
    if not clients:
        return []
    rows = [
        [
            c.get("id", NA),
            c.get("num_samples", NA),
            format_bytes(c.get("uplink_bytes")),
            format_bytes(c.get("downlink_bytes")),
            format_flops(c.get("flops")),
            format_bytes(c.get("peak_memory_bytes")),
            c.get("rejected_updates", 0),
        ]
        for c in clients
    ]
    header = ["Client", "Samples", "Uplink", "Downlink", "FLOPs", "Peak memory", "Rejected updates"]
    return ["## Clients", "", *md_table(header, rows), ""]


def _sample_section(sample: dict[str, Any]) -> list[str]:
    if not sample:
        return []
    lines = ["## Sample answers", ""]
    for key, title in (("prompt", "Prompt"), ("reference", "Reference"), ("base", "Base model"), ("tuned", "Tuned model")):
        if key in sample:
            lines += [f"**{title}**", "", *_fenced(sample[key]), ""]
    return lines


def _partition_section(run_dir: Path) -> list[str]:
    from fedtune.data.partition_report import short_label, truncation_line

    part = _read_json(run_dir / "partition.json")
    has_png = (run_dir / "partition.png").is_file()
    if not part and not has_png:
        return []
    lines = ["## Data partition", ""]
    if part:
        lines += [f"Method: `{part.get('method', NA)}`; label column: `{part.get('label_column') or 'none'}`.", ""]
        rows = []
        for c in part.get("clients") or []:
            labels = c.get("labels") or {}
            top = sorted(labels.items(), key=lambda kv: -kv[1])[:5]
            label_text = ", ".join(f"{short_label(k)}: {v}" for k, v in top) + (" …" if len(labels) > 5 else "")
            mix = c.get("length_classes") or {}
            mix = dict(enumerate(mix)) if isinstance(mix, list) else mix
            classes = ", ".join(f"{k}: {v}" for k, v in mix.items())
            rows.append([c.get("client", NA), c.get("num_samples", NA), fmt_num(c.get("mean_length"), 1),
                         _length_spread(c.get("length")), label_text or "—", classes or "—"])
        if rows:
            header = ["Client", "Samples", "Mean length", "Length median / p90 / max", "Labels", "Length classes"]
            lines += [*md_table(header, rows, "lrrrll"), ""]
        window = truncation_line(part.get("truncation"))
        if window:
            lines += [window + ".", ""]
    if has_png:
        lines += ["![Data partition](partition.png)", ""]
    return lines


def _length_spread(stats: dict[str, Any] | None) -> str:
    return "—" if not stats else f"{stats['median']:g} / {stats['p90']:g} / {stats['max']}"


def write_report(run_dir: Path, plots: bool = True, redraw_partition: bool = True) -> Path:
    """(Re)build ``report.md`` and (with ``plots``) ``eval_loss.png`` and ``partition.png`` in ``run_dir`` from its
    metrics, summary and partition.json (``redraw_partition`` false: only a missing partition.png); return the
    report path."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    raw_summary = _read_json(run_dir / "summary.json")
    summary = _fill_from_metrics(raw_summary, metrics)
    name = _run_name(run_dir, summary)
    if plots:
        from fedtune.report.plots import plot_eval_loss

        plot_eval_loss(metrics, run_dir / "eval_loss.png", title=f"{name}: evaluation loss")
        partition = _read_json(run_dir / "partition.json")
        if partition.get("clients") and (redraw_partition or not (run_dir / "partition.png").is_file()):
            from fedtune.data.partition_report import plot_partition

            plot_partition(partition, run_dir / "partition.png")

    lines = [f"# fedtune run: {name}", ""]
    if not raw_summary:
        lines += ["_No `summary.json` found (partial run?); totals are derived from `metrics.jsonl`._", ""]
    model = summary.get("model") or {}
    if model:
        params, trainable = model.get("params"), model.get("trainable_params")
        detail = f"Model: `{model.get('name', NA)}` ({model.get('source', NA)})"
        if params:
            detail += f", {params:,} parameters"
            if trainable is not None:
                detail += f", {trainable:,} trainable ({100 * trainable / params:.2f}%)"
        lines += [detail + ".", ""]
    lines += ["## Summary", "", *md_table(["Metric", "Value"], [list(r) for r in summary_table(summary)], "lr"), ""]
    lines += ["Sizes use base-1000 units (1 MB = 10^6 bytes).", ""]
    lines += ["## Evaluation loss", ""]
    if (run_dir / "eval_loss.png").is_file():
        lines += ["![Evaluation loss](eval_loss.png)", ""]
    lines += _rounds_section(metrics)
    lines += _clients_section(summary.get("clients") or [])
    lines += _sample_section(summary.get("sample") or {})
    lines += _partition_section(run_dir)
    report = run_dir / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return report


def print_summary(summary: dict[str, Any], console: Any = None) -> None:
    """Print the summary table and the sample answers (base vs tuned) with rich, for the end of a run."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    table = Table(title=f"fedtune run: {summary.get('name') or NA}", show_header=True)
    table.add_column("Metric", style="bold")
    table.add_column("Value", justify="right")
    for label, value in summary_table(summary):
        table.add_row(label, value)
    console.print(table)
    sample = summary.get("sample") or {}
    for key, title in (("prompt", "Prompt"), ("base", "Base model"), ("tuned", "Tuned model")):
        if sample.get(key) is not None:
            console.print(Panel(Text(str(sample[key])), title=title, expand=False))
