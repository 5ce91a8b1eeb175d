"""``fedtune partition``: each client's rows of a run, as its own local data file that fedtune reads back."""

from __future__ import annotations

import json

from conftest import TINY

from fedtune.cli import main
from fedtune.config import load_config
from fedtune.data.sources import load_splits
from fedtune.engine.context import load_run_data


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_client_files_hold_each_clients_rows_and_read_back(tmp_path, capsys):
    sets = ["paradigm=kd", "kd.public_samples=16"]  # the public set belongs to no client
    assert main(["partition", str(TINY), *(x for s in sets for x in ("--set", s)), "--out", str(tmp_path)]) == 0
    cfg = load_config(TINY, sets)
    data = load_run_data(cfg)
    train = data.train.remove_columns(["input_ids", "labels", "length"])  # the tokenized split's rows, raw columns
    for cid, rows in enumerate(data.partitions):  # each row with its id in the run
        assert _lines(tmp_path / f"client-{cid}.jsonl") == [{**train[i], "fedtune_row": i} for i in rows]
    assert _lines(tmp_path / "public.jsonl") == [{**train[i], "fedtune_row": i} for i in data.reserved]
    assert sum(len(p) for p in data.partitions) == len(train) - 16
    assert _lines(tmp_path / "eval.jsonl") == list(data.splits.eval)
    assert json.loads((tmp_path / "partition.json").read_text())["reserved_rows"] == 16
    local = load_config(TINY, ["data.dataset=local", f"data.path={tmp_path / 'client-1.jsonl'}",
                               "data.max_eval_samples=none"])
    splits = load_splits(local.data, local.seed)  # the client's own file through the local-file loader
    assert len(splits.train) + len(splits.eval) == len(data.partitions[1])
    assert {r["response"] for r in (*splits.train, *splits.eval)} == {train[i]["response"] for i in data.partitions[1]}
    assert "wrote 3 client files" in capsys.readouterr().err
