"""``metrics.jsonl``: one JSON line per round, appended and flushed as each round ends."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

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
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate(self, last_round: int) -> list[dict[str, Any]]:
        """Keep only rounds <= ``last_round`` (rounds a resumed run will redo are dropped)."""
        kept = [r for r in self.read() if r["round"] <= last_round]
        atomic_write(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())
        return kept
