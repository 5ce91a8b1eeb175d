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
    assert abs(len(s.eval) - round(total * 0.1)) <= 10  # whole inputs (tech support repeats one 100+ times)
    assert not set(s.eval["prompt"]) & set(s.train["prompt"])
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


def test_a_repeated_input_is_held_out_whole(tmp_path):
    """Rows sharing a prompt (several references of one input) land on one side of the held-out split."""
    records = [{"prompt": f"input {i}", "response": f"reference {j} of {i}"}
               for i in range(30) for j in range(1 + i % 4)]
    path = _write_jsonl(tmp_path / "refs.jsonl", records)
    s = load_splits(DataConfig(dataset="local", path=str(path), eval_fraction=0.2, max_eval_samples=None), seed=3)
    assert not set(s.eval["prompt"]) & set(s.train["prompt"])
    assert len(s.train) + len(s.eval) == len(records)
    assert abs(len(s.eval) - 0.2 * len(records)) <= 2  # whole inputs of up to 4 rows: within half of one
    by_prompt = {p: sum(1 for r in records if r["prompt"] == p) for p in set(s.eval["prompt"])}
    assert all(list(s.eval["prompt"]).count(p) == n for p, n in by_prompt.items())  # with all its references


def test_plain_text_rows_hold_out_one_by_one(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", RECORDS["text"])
    s = load_splits(DataConfig(dataset="local", path=str(path), eval_fraction=0.25, max_eval_samples=None), seed=0)
    assert (len(s.train), len(s.eval)) == (15, 5)  # empty prompts are not one input


def test_one_input_cannot_be_split(tmp_path):
    path = _write_jsonl(tmp_path / "one.jsonl", [{"prompt": "same", "response": f"r{i}"} for i in range(5)])
    with pytest.raises(DataError, match="2 distinct prompts.*data.eval_path"):
        load_splits(DataConfig(dataset="local", path=str(path)), seed=0)


def test_local_eval_file(tmp_path, caplog):
    train = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(12)])
    held = _write_jsonl(tmp_path / "test.jsonl", [{"prompt": p, "response": "x"} for p in ("q1", "new", "new")])
    s = load_splits(DataConfig(dataset="local", path=str(train), eval_path=str(held), max_eval_samples=2), seed=0)
    assert len(s.train) == 12 and len(s.eval) == 2  # nothing held out of the training file; the eval file capped
    assert list(s.eval_source["prompt"]) == ["q1", "new", "new"]  # the whole file: every reference
    assert "1 of 3 eval rows share their prompt with a training row" in caplog.text
    with pytest.raises(Exception, match="data.eval_path is for data.dataset = 'local'"):
        DataConfig(dataset="e2e", eval_path=str(held))


def test_e2e_metric_prompts_get_every_reference_of_the_test_file():
    """max_eval_samples keeps ~1 row per input; the references come from the whole test file."""
    from fedtune.data.references import reference_sets

    s = load_splits(DataConfig(dataset="e2e", max_eval_samples=200), seed=0)
    capped = reference_sets(s.eval["prompt"], zip(s.eval["prompt"], s.eval["response"]), 16)
    full = reference_sets(s.eval["prompt"], zip(s.eval_source["prompt"], s.eval_source["response"]), 16)
    assert [p for p, _ in full] == [p for p, _ in capped]
    assert sum(len(r) for _, r in capped) < 2 * 16
    assert sum(len(r) for _, r in full) > 5 * 16  # E2E's test file: 4693 references of 630 inputs
    source = {p: [] for p, _ in full}
    for p, r in zip(s.eval_source["prompt"], s.eval_source["response"]):
        if p in source:
            source[p].append(r)
    assert dict(full) == source


def test_a_partition_column_may_be_named_by_its_source_field(tmp_path, tiny_config):
    """partition.column = the source field mapped to the prompt is accepted; a column the data lacks is reported
    before the tokenizer or the model loads, with the valid names."""
    from fedtune.engine.context import load_run_data

    path = _write_jsonl(tmp_path / "d.jsonl", [{"context": f"topic {i % 6}", "answer": f"text {i}"} for i in range(40)])
    data = [f"data.dataset='local'", f"data.path='{path}'", "data.format='prompt_response'",
            "data.prompt_field='context'", "data.response_field='answer'", "partition.method='natural_id'",
            "federation.num_clients=3", "partition.min_samples=2"]
    run = load_run_data(tiny_config(*data, "partition.column='context'"))
    assert run.partition_info["label_column"] == "prompt"
    owners = {}
    for client, rows in enumerate(run.partitions):
        for i in rows:
            owners.setdefault(run.train["prompt"][i], set()).add(client)
    assert len(owners) > 3 and all(len(clients) == 1 for clients in owners.values())  # one value, one client
    with pytest.raises(DataError, match=r"partition.column 'topic' is not a column of the data; valid: prompt, "
                                        r"response"):
        load_run_data(tiny_config(*data, "partition.column='topic'"))
