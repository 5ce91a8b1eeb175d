"""``fedtune partition``: each client's training data as its own local file, partitioned exactly as a run would.

For laboratory federations (issue 19's deployment): every client organisation gets ``client-K.jsonl``, which
fedtune reads back with ``data.dataset = "local"`` (prompt/response records and their metadata columns); the
server keeps ``eval.jsonl``; a paradigm with a public set (KD) gets ``public.jsonl``, which every client reads. ``partition.json`` is the same summary a run writes.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.config import RunConfig
from fedtune.core.files import atomic_write
from fedtune.engine.client_copy import ROW_COLUMN
from fedtune.engine.context import load_run_data
from fedtune.engine.metrics_log import json_safe


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows).encode()


def write_partition_files(cfg: RunConfig, out: Path) -> list[Path]:
    """Write ``client-K.jsonl`` per client, ``eval.jsonl``, ``public.jsonl`` (KD) and ``partition.json`` into
    ``out``; returns the client files. Rows the paradigm reserves (KD's public set) belong to no client and are left out."""
    data = load_run_data(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # The tokenized split (rows without response tokens dropped), so the partitions' indices are its rows.
    train = data.train.remove_columns([c for c in ("input_ids", "labels", "length") if c in data.train.column_names])
    # Each row's id in the run (a laboratory's deployed clients then name their samples as the simulation does).
    train = train.add_column(ROW_COLUMN, list(range(len(train))))
    files = []
    for cid, rows in enumerate(data.partitions):
        path = out / f"client-{cid}.jsonl"
        atomic_write(path, _jsonl(train[i] for i in rows))
        files.append(path)
    if data.reserved:  # KD's public set: every client reads it (node config public-path)
        atomic_write(out / "public.jsonl", _jsonl(train[i] for i in data.reserved))
    atomic_write(out / "eval.jsonl", _jsonl(data.splits.eval))
    atomic_write(out / "partition.json", json.dumps(json_safe(data.partition_info), indent=1).encode())
    return files
