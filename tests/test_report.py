"""Tests for fedtune.report: formatting, report.md contents, plots, and error handling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedtune.core.errors import FedtuneError
from fedtune.report.plots import plot_comparison, plot_eval_loss
from fedtune.report.render import (
    format_bytes,
    format_flops,
    format_seconds,
    print_summary,
    summary_table,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
UP, DOWN = 1_572_864, 3_145_728  # LoRA adapter bytes per round (uplink per client x2, downlink broadcast)


def _metrics(rounds: int = 4, eval_every: int = 2) -> list[dict]:
    rows = []
    cum_up = cum_down = 0
    cum_wall = 0.0
    for r in range(rounds + 1):
        up, down = (0, 0) if r == 0 else (UP, DOWN)
        cum_up, cum_down = cum_up + up, cum_down + down
        wall = 0.8 if r == 0 else 12.5
        cum_wall += wall
        evaluated = r % eval_every == 0 or r == rounds
        loss = 2.8 - 0.25 * r
        rows.append(
            {
                "round": r,
                "train_loss": None if r == 0 else loss + 0.1,
                "eval_loss": loss if evaluated else None,
                "eval_ppl": math.exp(loss) if evaluated else None,
                "uplink_bytes": up,
                "downlink_bytes": down,
                "cum_uplink_bytes": cum_up,
                "cum_downlink_bytes": cum_down,
                "client_flops": 0 if r == 0 else 3_200_000_000_000,
                "server_flops": 0 if r == 0 else 1_000_000,
                "wall_s": wall,
                "cum_wall_s": cum_wall,
                "sim_s": 0.0,
                "clients": [] if r == 0 else [0, 1],
                "rejected": [{"client": 1, "reason": "nan loss"}] if r == 3 else [],
                "peak_memory_bytes": 0 if r == 0 else 2_400_000_000,
                "future_key": {"ignored": True},
            }
        )
    return rows


def _summary() -> dict:
    return {
        "paradigm": "fedllm",
        "name": "tiny-fedavg",
        "rounds": 4,
        "seed": 7,
        "initial": {"eval_loss": 2.8, "eval_ppl": math.exp(2.8)},
        "final": {"eval_loss": 1.8, "eval_ppl": math.exp(1.8), "train_loss": 1.9},
        "comm": {"uplink_bytes": 4 * UP, "downlink_bytes": 4 * DOWN, "total_bytes": 4 * (UP + DOWN)},
        "compute": {"client_flops": 12_800_000_000_000, "server_flops": 4_000_000},
        "memory": {"client_peak_bytes": 2_400_000_000},
        "time": {"wall_s": 50.8, "simulated_s": 3725.0},
        "clients": [
            {"id": 0, "num_samples": 120, "uplink_bytes": 2 * UP, "downlink_bytes": 2 * DOWN,
             "flops": 6_400_000_000_000, "peak_memory_bytes": 2_400_000_000, "rejected_updates": 0},
            {"id": 1, "num_samples": 80, "uplink_bytes": 2 * UP, "downlink_bytes": 2 * DOWN,
             "flops": 6_400_000_000_000, "peak_memory_bytes": 2_100_000_000, "rejected_updates": 1},
        ],
        "sample": {"prompt": "What is the capital of France?", "reference": "Paris.",
                   "base": "The capital | of France is", "tuned": "Paris is the capital of France."},
        "model": {"source": "builtin", "name": "tiny-gpt2", "params": 1_000_000, "trainable_params": 16_384},
    }


def _write_run(run_dir: Path, metrics: list[dict], summary: dict | None, partition: bool = True) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text('paradigm = "fedllm"\nseed = 7\nname = "tiny-fedavg"\n')
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    if partition:
        (run_dir / "partition.json").write_text(json.dumps({
            "method": "dirichlet", "label_column": "category",
            "clients": [
                {"client": 0, "num_samples": 120, "mean_length": 41.5, "labels": {"qa": 100, "chat": 20},
                 "length_classes": {"short": 80, "long": 40}},
                {"client": 1, "num_samples": 80, "mean_length": 37.25, "labels": {"chat": 80},
                 "length_classes": {"short": 60, "long": 20}},
            ],
        }))
        (run_dir / "partition.png").write_bytes(PNG_MAGIC + b"stub")
    return run_dir


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    ("n", "expected"),
    [(0, "0 B"), (999, "999 B"), (1000, "1.0 KB"), (1536, "1.5 KB"), (UP, "1.6 MB"),
     (2_400_000_000, "2.4 GB"), (None, "n/a")],
)
def test_format_bytes(n, expected):
    assert format_bytes(n) == expected


@pytest.mark.parametrize(
    ("n", "expected"),
    [(0, "0 FLOP"), (512, "512 FLOP"), (1_000_000, "1.0 MFLOP"), (3_200_000_000_000, "3.2 TFLOP"),
     (12_800_000_000_000, "12.8 TFLOP"), (2.5e15, "2.5 PFLOP")],
)
def test_format_flops(n, expected):
    assert format_flops(n) == expected


@pytest.mark.parametrize(
    ("s", "expected"), [(0.0, "0.0 s"), (12.34, "12.3 s"), (125, "2m 05s"), (3725, "1h 02m 05s"), (None, "n/a")]
)
def test_format_seconds(s, expected):
    assert format_seconds(s) == expected


def test_summary_table_rows():
    rows = dict(summary_table(_summary()))
    assert rows["Paradigm"] == "fedllm"
    assert rows["Rounds"] == "4"
    assert rows["Eval loss (before → after)"] == "2.8000 → 1.8000"
    assert rows["Perplexity (before → after)"] == f"{math.exp(2.8):.2f} → {math.exp(1.8):.2f}"
    assert rows["Uplink"] == "6.3 MB"
    assert rows["Downlink"] == "12.6 MB"
    assert rows["Total bytes"] == "18.9 MB"
    assert rows["Client FLOPs"] == "12.8 TFLOP"
    assert rows["Server FLOPs"] == "4.0 MFLOP"
    assert rows["Client peak memory"] == "2.4 GB"
    assert rows["Wall time"] == "50.8 s"
    assert rows["Simulated time"] == "1h 02m 05s"
    assert all(v == "n/a" or "n/a" in v for k, v in summary_table({}) if k != "Paradigm")


def test_write_report_full(tmp_path):
    run = _write_run(tmp_path / "run", _metrics(), _summary())
    report = write_report(run)
    assert report == run / "report.md"
    text = report.read_text(encoding="utf-8")
    assert "# fedtune run: tiny-fedavg" in text
    for fragment in ["| Paradigm | fedllm |", "2.8000 → 1.8000", "18.9 MB", "12.8 TFLOP", "2.4 GB",
                     "1h 02m 05s", "tiny-gpt2"]:
        assert fragment in text, fragment
    # per-round table: round 3 has no eval but one rejected update; round 1 has per-round bytes
    assert "| 3 | 2.1500 | n/a | n/a | 1.6 MB | 3.1 MB | 3.2 TFLOP | 12.5 | 1 |" in text
    assert "| 0 | n/a | 2.8000 |" in text
    # per-client table
    assert "| 1 | 80 | 3.1 MB | 6.3 MB | 6.4 TFLOP | 2.1 GB | 1 |" in text
    # sample answers in fenced blocks, pipes untouched inside code
    assert "```\nThe capital | of France is\n```" in text
    assert "```\nParis is the capital of France.\n```" in text
    # partition section and images
    assert "dirichlet" in text and "qa: 100, chat: 20" in text
    assert "![Data partition](partition.png)" in text
    assert "![Evaluation loss](eval_loss.png)" in text
    assert _is_png(run / "eval_loss.png")
    # rebuilding is idempotent
    assert write_report(run).read_text(encoding="utf-8") == text


def test_partial_summary_still_renders(tmp_path):
    summary = _summary()
    for key in ("sample", "clients", "model", "memory", "time"):
        summary.pop(key)
    run = _write_run(tmp_path / "run", _metrics(rounds=2), summary, partition=False)
    text = write_report(run).read_text(encoding="utf-8")
    assert "## Sample answers" not in text and "## Clients" not in text and "## Data partition" not in text
    assert "| Wall time | 25.8 s |" in text  # derived from metrics when the summary lacks it
    assert _is_png(run / "eval_loss.png")


def test_missing_summary_uses_metrics_and_config_name(tmp_path):
    run = _write_run(tmp_path / "run", _metrics(rounds=2), None, partition=False)
    text = write_report(run).read_text(encoding="utf-8")
    assert "# fedtune run: tiny-fedavg" in text
    assert "| Rounds | 2 |" in text
    assert "2.8000 → 2.3000" in text


def test_missing_metrics_error_names_path(tmp_path):
    with pytest.raises(FedtuneError, match=r"metrics\.jsonl"):
        write_report(tmp_path)


def test_corrupt_metrics_line_names_line(tmp_path):
    run = _write_run(tmp_path / "run", _metrics(rounds=2), _summary())
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:20]  # truncated write
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(FedtuneError, match="line 3"):
        write_report(run)


def test_no_eval_rounds_still_plots(tmp_path):
    metrics = [{k: v for k, v in m.items() if k not in ("eval_loss", "eval_ppl")} for m in _metrics(rounds=2)]
    plot_eval_loss(metrics, tmp_path / "empty.png")
    assert _is_png(tmp_path / "empty.png")


def test_plot_comparison_and_log_axis(tmp_path):
    small = _metrics(rounds=3, eval_every=1)
    big = [dict(m, cum_uplink_bytes=m["cum_uplink_bytes"] * 1000, cum_downlink_bytes=m["cum_downlink_bytes"] * 1000)
           for m in _metrics(rounds=3, eval_every=1)]
    without_cum = [{k: v for k, v in m.items() if not k.startswith("cum_")} for m in small]
    plot_comparison({"fedllm": small, "split": big, "kd": without_cum}, tmp_path / "cmp.png")
    assert _is_png(tmp_path / "cmp.png")


def test_print_summary(tmp_path):
    from rich.console import Console

    console = Console(record=True, width=120)
    print_summary(_summary(), console=console)
    out = console.export_text()
    assert "18.9 MB" in out and "Paris is the capital of France." in out
    print_summary({}, console=console)  # partial summary does not crash


def test_an_uncompressed_split_run_says_so_instead_of_a_zero_reduction():
    comm = {"uplink_bytes": 10, "downlink_bytes": 10, "activation_uplink_bytes": 8, "gradient_downlink_bytes": 8,
            "uplink_reduction": 0.0, "total_reduction": 0.0}
    plain = dict(summary_table({"paradigm": "split", "comm": comm}))
    assert "Uplink reduction" not in plain and plain["Compression"].startswith("none (uncompressed")
    compressed = dict(summary_table({"paradigm": "split", "comm": {**comm, "uplink_reduction": 0.5},
                                     "compression": {"activations": {}}}))
    assert compressed["Uplink reduction"] == "50.00 %" and "Compression" not in compressed
    scored = dict(summary_table({"eval": {"rows": 48, "metric_prompts": 16, "metric_references": 217}}))
    assert scored["Task metric scored on"] == "16 prompts, 217 references"
