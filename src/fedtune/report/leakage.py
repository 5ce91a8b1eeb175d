"""The split-learning leakage probe's outputs (:mod:`fedtune.split.leakage`): a rich table, leakage.md, leakage.json."""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.config import RunConfig
from fedtune.split.leakage import LeakageReport, LeakageRow

HEADERS = ("cut", "noise", "nearest %", "learned %", "chance %", "majority %", "tokens")


def percent(rate: float) -> str:
    """A rate as a percentage: one decimal, or one significant digit below 0.1 % (chance of a large vocabulary)."""
    return f"{100 * rate:.1f}" if rate >= 0.001 else f"{100 * rate:.1g}"


def row_cells(row: LeakageRow) -> list[str]:
    return [str(row.cut), f"{row.noise:g}", percent(row.nearest_neighbour), percent(row.learned),
            percent(row.chance_uniform), percent(row.chance_majority), str(row.tokens)]


def setting_notes(cfg: RunConfig, victims: int, public: int) -> list[str]:
    """What the probe read and what else reaches the server in this configuration."""
    notes = [f"Victim texts: the first {victims} rows of the eval split (held out; the clients' private data "
             f"stand-in). Inverter training texts: the first {public} rows of the training split (public; a different "
             "split, so disjoint rows).",
             "Attacker: the server, knowing the public base model but not the client's trained LoRA."]
    if cfg.split.ushape:
        notes.append("U-shape (split.ushape): the labels never leave the client (the message audit "
                     "tests/test_split_protocol.py::test_ushape_sends_neither_token_ids_nor_labels); the activations "
                     "are all the server receives of the text.")
    else:
        notes.append("Standard split: the labels (the response's token ids, the prompt masked) travel with the "
                     "activations (tests/test_split_protocol.py::test_standard_split_sends_no_token_ids), so the "
                     "response is not private from the server; use split.ushape to keep it on the client.")
    return notes


def leakage_markdown(report: LeakageReport, title: str = "Split-learning leakage: token recovery") -> str:
    lines = [f"# {title}", "",
             "Share of the victims' real tokens the server reads back from the activations it receives: nearest = "
             "the token whose isolated activation is most cosine-similar, learned = an MLP inverter trained on public "
             "text; chance = 1 / vocabulary, majority = always guessing the victims' most common token.", "",
             f"Vocabulary {report.vocab_size} tokens, {report.num_layers} blocks; {report.victim_texts} victim texts, "
             f"inverter trained on {report.public_texts} public texts ({report.public_tokens} tokens); "
             f"{report.seconds:.1f} s.", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(row_cells(row)) + " |" for row in report.rows]
    return "\n".join([*lines, "", *[f"- {note}" for note in report.notes], ""])


def print_leakage(report: LeakageReport, console) -> None:
    from rich.table import Table

    table = Table(title="Split-learning leakage: token recovery from the cut-layer activations")
    for header in HEADERS:
        table.add_column(header, justify="right")
    for row in report.rows:
        table.add_row(*row_cells(row))
    console.print(table)
    for note in report.notes:
        console.print(f"- {note}", highlight=False, soft_wrap=True)


def write_leakage(report: LeakageReport, out: Path) -> tuple[Path, Path]:
    """OUT/leakage.json and OUT/leakage.md."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "leakage.json", out / "leakage.md"
    json_path.write_text(json.dumps(report.as_dict(), indent=2))
    md_path.write_text(leakage_markdown(report))
    return json_path, md_path
