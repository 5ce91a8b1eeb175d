"""Dataset loaders: bundled E2E, chatterbot-corpus, local files (JSONL/CSV) and field mapping."""

from __future__ import annotations

import csv
import json

import datasets
import pytest

from fedtune.config import DataConfig
from fedtune.core.errors import ConfigError, DataError
from fedtune.data.sources import DATASETS, load_splits, parse_mr


@pytest.fixture(autouse=True)
def _hf_cache_in_tmp(tmp_path, monkeypatch):
    """Keep datasets' builder cache (used by the local loader) out of ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_registry_and_config_validation():
    assert DATASETS.names() == ["chatterbot", "e2e", "hf", "local"]
    with pytest.raises(Exception, match="valid choices"):
        DataConfig(dataset="nope")
    with pytest.raises(ConfigError, match="valid choices: chatterbot, e2e, hf, local"):
        DATASETS.get("nope")


def test_e2e_full_splits():
    s = load_splits(DataConfig(dataset="e2e", max_eval_samples=None), seed=0)
    assert (len(s.train), len(s.eval)) == (4672, 4693)
    assert s.label_column == "name"
    row = s.train[0]
    assert row["name"] == "Alimentum"
    assert row["prompt"].endswith("name : Alimentum | area : city centre | family friendly : no")
    assert row["response"] == "There is a place in the city centre , Alimentum , that is not family - friendly ."
    assert len(set(s.train["name"])) == 20


def test_caps_are_seeded_and_deterministic():
    cfg = DataConfig(dataset="e2e", max_train_samples=100, max_eval_samples=30)
    a, b, c = (load_splits(cfg, seed) for seed in (1, 1, 2))
    assert (len(a.train), len(a.eval)) == (100, 30)
    assert a.train.to_dict() == b.train.to_dict() and a.eval.to_dict() == b.eval.to_dict()
    assert a.train.to_dict() != c.train.to_dict()


def test_parse_mr():
    assert parse_mr("name : The Mill | eatType : pub | priceRange : £20-25") == {
        "name": "The Mill", "eatType": "pub", "priceRange": "£20-25"
    }


def test_chatterbot():
    s = load_splits(DataConfig(dataset="chatterbot", max_eval_samples=None, eval_fraction=0.1), seed=0)
    total = len(s.train) + len(s.eval)
    assert 1900 <= total <= 2100
    assert len(s.eval) == round(total * 0.1)
    assert s.label_column == "topic"
    assert {"prompt", "response", "topic"} <= set(s.train.column_names)
    assert {"AI", "tech support", "trivia"} <= set(s.train["topic"])
    assert all(isinstance(p, str) and p for p in s.train["prompt"])
    # seeded holdout: same seed -> same split, disjoint from train
    again = load_splits(DataConfig(dataset="chatterbot", max_eval_samples=None), seed=0)
    assert again.eval.to_dict() == s.eval.to_dict()
    assert not set(zip(s.eval["prompt"], s.eval["response"])) <= set(zip(s.train["prompt"], s.train["response"]))


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _write_csv(path, records):
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


RECORDS = {
    "prompt_response": [{"prompt": f"q{i}", "response": f"a{i}", "user": f"u{i % 3}"} for i in range(20)],
    "instruction": [{"instruction": f"do {i}", "input": "ctx" if i % 2 else "", "output": f"done {i}"} for i in range(20)],
    "text": [{"text": f"line {i}"} for i in range(20)],
}


@pytest.mark.parametrize("writer,suffix", [(_write_jsonl, ".jsonl"), (_write_csv, ".csv")])
@pytest.mark.parametrize("fmt", ["prompt_response", "instruction", "text"])
@pytest.mark.parametrize("explicit", [True, False])
def test_local_formats(tmp_path, writer, suffix, fmt, explicit):
    path = writer(tmp_path / f"data{suffix}", RECORDS[fmt])
    cfg = DataConfig(dataset="local", path=str(path), format=fmt if explicit else "auto",
                     eval_fraction=0.25, max_eval_samples=None)
    s = load_splits(cfg, seed=0)
    assert (len(s.train), len(s.eval)) == (15, 5)
    assert s.label_column is None
    rows = sorted(s.train.to_list() + s.eval.to_list(), key=lambda r: int(r["response"].split()[-1].lstrip("a")))
    if fmt == "prompt_response":
        assert rows[1] == {"prompt": "q1", "response": "a1", "user": "u1"}
    elif fmt == "instruction":
        assert rows[0]["prompt"] == "do 0" and rows[1]["prompt"] == "do 1\n\nctx"
        assert rows[1]["response"] == "done 1" and set(rows[0]) == {"prompt", "response"}
    else:
        assert rows[3] == {"prompt": "", "response": "line 3"}


def test_local_custom_fields(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}", "answer": i} for i in range(10)])
    s = load_splits(DataConfig(dataset="local", path=str(path), format="prompt_response",
                               prompt_field="question", response_field="answer"), seed=0)
    assert set(s.train["response"]) <= {str(i) for i in range(10)}


@pytest.mark.parametrize("writer,suffix", [(_write_jsonl, ".jsonl"), (_write_csv, ".csv")])
def test_local_missing_field(tmp_path, writer, suffix):
    path = writer(tmp_path / f"d{suffix}", [{"question": "q", "answer": "a"}] * 4)
    with pytest.raises(DataError, match=r"'response'.*question, answer"):
        load_splits(DataConfig(dataset="local", path=str(path), format="prompt_response",
                               response_field="response", prompt_field="question"), seed=0)
    with pytest.raises(DataError, match="cannot detect the data format.*question, answer"):
        load_splits(DataConfig(dataset="local", path=str(path)), seed=0)


def test_local_bad_path_and_type(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_splits(DataConfig(dataset="local", path=str(tmp_path / "missing.jsonl")), seed=0)
    bad = tmp_path / "d.txt"
    bad.write_text("x")
    with pytest.raises(DataError, match="unsupported"):
        load_splits(DataConfig(dataset="local", path=str(bad)), seed=0)


def test_hf_local_dir_with_splits(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", RECORDS["text"])
    _write_jsonl(folder / "test.jsonl", RECORDS["text"][:4])
    s = load_splits(DataConfig(dataset="hf", path=str(folder), eval_split="test"), seed=0)
    assert (len(s.train), len(s.eval)) == (20, 4)
    with pytest.raises(DataError, match="no split 'validation'; available splits: "):
        load_splits(DataConfig(dataset="hf", path=str(folder), eval_split="validation"), seed=0)


def test_hf_failure_is_data_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="cannot load Hugging Face dataset"):
        load_splits(DataConfig(dataset="hf", path=str(empty)), seed=0)
