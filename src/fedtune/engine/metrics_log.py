"""``metrics.jsonl``: one JSON line per round, appended and flushed as each round ends."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from fedtune.core.errors import FedtuneError
from fedtune.core.files import atomic_write


def json_safe(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


class MetricsLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(json_safe(record), sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[dict[str, Any]]:
        """The rows; a partial last line (a run killed mid-write) is left out."""
        return self.parse()[0]

    def parse(self) -> tuple[list[dict[str, Any]], bool]:
        """(rows, whether a partial last line was left out); any other unreadable line is an error."""
        if not self.path.exists():
            return [], False
        lines = [line for line in self.path.read_bytes().decode("utf-8", "replace").splitlines() if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    return rows, True
                raise FedtuneError(f"{self.path} line {i + 1} is not a JSON row; the file was edited or damaged "
                                   "(a resume rewrites it from the checkpoint)") from None
            if not isinstance(row, dict) or not isinstance(row.get("round"), int):
                raise FedtuneError(f"{self.path} line {i + 1} is not a round's row")
            rows.append(row)
        return rows, False

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Replace the file by ``rows`` (atomically)."""
        atomic_write(self.path, "".join(json.dumps(json_safe(r), sort_keys=True) + "\n" for r in rows).encode())

    def truncate(self, last_round: int) -> list[dict[str, Any]]:
        """Keep only rounds <= ``last_round`` (rounds a resumed run will redo are dropped)."""
        kept = [r for r in self.read() if r["round"] <= last_round]
        self.write(kept)
        return kept
