"""Partitioners: determinism, coverage, skew, natural ids, length classes, min_samples, reporting."""

from __future__ import annotations

import warnings

import json
import math
from collections import Counter

import datasets
import numpy as np
import pytest

from fedtune.config import PartitionConfig
from fedtune.core.errors import PartitionError
from fedtune.data.partition import PARTITIONERS, LengthDirichletPartitioner, length_classes, partition_indices
from fedtune.data.partition_report import format_partition_table, partition_summary, plot_partition, short_label

METHODS = ["iid", "dirichlet", "natural_id", "length_dirichlet"]


@pytest.fixture(scope="module")
def train() -> datasets.Dataset:
    rng = np.random.default_rng(123)
    n = 600
    names = [f"r{int(v)}" for v in rng.zipf(1.6, size=n) % 10]
    return datasets.Dataset.from_dict({
        "prompt": [f"p{i}" for i in range(n)],
        "response": [f"a{i}" for i in range(n)],
        "name": names,
        "length": rng.integers(10, 300, size=n).tolist(),
    })


def _parts(train, method, seed=0, clients=4, **kw):
    return partition_indices(train, PartitionConfig(method=method, **kw), clients, seed, "name")


def _entropy(values) -> float:
    counts = Counter(values)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def test_registry():
    assert PARTITIONERS.names() == sorted(METHODS)
    with pytest.raises(Exception, match="valid choices"):
        PartitionConfig(method="nope")


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_disjoint_covering(train, method):
    a, b, c = _parts(train, method, seed=1), _parts(train, method, seed=1), _parts(train, method, seed=2)
    assert a == b
    assert a != c
    assert len(a) == 4
    flat = [i for part in a for i in part]
    assert sorted(flat) == list(range(len(train)))  # disjoint and covering
    assert all(part == sorted(part) for part in a)
    assert all(isinstance(i, int) for i in flat)


def test_iid_is_balanced(train):
    assert [len(p) for p in _parts(train, "iid", clients=7)] in ([86] * 5 + [85] * 2, [86] * 6 + [84])


def test_dirichlet_small_alpha_is_more_skewed(train):
    names = train["name"]

    def mean_entropy(alpha):
        vals = []
        for seed in range(3):
            parts = _parts(train, "dirichlet", seed=seed, alpha=alpha, min_samples=1)
            vals += [_entropy([names[i] for i in p]) for p in parts]
        return float(np.mean(vals))

    assert mean_entropy(0.1) < mean_entropy(100.0) - 0.3


def test_natural_id_keeps_each_value_on_one_client(train):
    names = list(train["name"])
    distinct = len(set(names))
    for clients in (3, distinct):
        parts = _parts(train, "natural_id", clients=clients, min_samples=1)
        owner: dict[str, set[int]] = {}
        for client, part in enumerate(parts):
            for i in part:
                owner.setdefault(names[i], set()).add(client)
        assert all(len(c) == 1 for c in owner.values())
        assert len(owner) == distinct
    one_each = _parts(train, "natural_id", clients=distinct, min_samples=1)
    assert all(len({names[i] for i in p}) == 1 for p in one_each)


def test_natural_id_too_many_clients(train):
    distinct = len(set(train["name"]))
    with pytest.raises(PartitionError, match=f"only {distinct} distinct values"):
        _parts(train, "natural_id", clients=distinct + 1)


def test_length_classes_follow_quantiles():
    classes, edges = length_classes(list(range(100)), 4)
    assert len(edges) == 3
    assert np.bincount(classes).tolist() == [25, 25, 25, 25]
    assert all(np.diff(classes) >= 0)


def test_length_dirichlet_classes_correlate_with_length(train):
    part = LengthDirichletPartitioner(num_partitions=4, alpha=0.1, num_classes=4, seed=0)
    part.dataset = train
    loaded = [part.load_partition(i) for i in range(4)]
    lengths = np.concatenate([np.asarray(p["length"]) for p in loaded])
    classes = np.concatenate([np.asarray(p["length_class"]) for p in loaded])
    assert np.corrcoef(lengths, classes)[0, 1] > 0.9
    order = np.argsort(lengths, kind="stable")
    assert all(np.diff(classes[order]) >= 0)  # monotone in length

    def mean_class_entropy(method, alpha):
        parts = partition_indices(train, PartitionConfig(method=method, alpha=alpha, min_samples=1), 4, 0, None)
        summary = partition_summary(train, parts, None)
        return np.mean([_entropy([k for k, n in enumerate(c["length_classes"]) for _ in range(n)])
                        for c in summary["clients"]])

    assert mean_class_entropy("length_dirichlet", 0.1) < mean_class_entropy("iid", 1.0) - 0.3


def test_min_samples_error(train):
    with pytest.raises(PartitionError, match=r"client 0 got 150 training samples, fewer than partition.min_samples = 151"):
        _parts(train, "iid", min_samples=151)
    with pytest.raises(PartitionError, match=r"client \d+ got \d+ .*min_samples = 140.*raise partition.alpha"):
        _parts(train, "dirichlet", alpha=0.05, min_samples=140)
    with pytest.raises(PartitionError, match="min_samples"):
        _parts(train, "length_dirichlet", alpha=0.05, min_samples=140)


def test_column_errors(train):
    with pytest.raises(PartitionError, match="needs a column.*prompt, response, name, length"):
        partition_indices(train, PartitionConfig(method="dirichlet"), 3, 0, None)
    with pytest.raises(PartitionError, match="'topic' is not in the dataset; columns: prompt, response, name, length"):
        partition_indices(train, PartitionConfig(method="natural_id", column="topic"), 3, 0, "name")
    with pytest.raises(PartitionError, match="needs the token 'length' column"):
        partition_indices(train.remove_columns("length"), PartitionConfig(method="length_dirichlet"), 3, 0, None)
    with pytest.raises(PartitionError, match="only 600 training samples"):
        partition_indices(train, PartitionConfig(method="iid"), 601, 0, None)


def test_column_override(train):
    t2 = train.add_column("group", [i % 3 for i in range(len(train))])
    parts = partition_indices(t2, PartitionConfig(method="natural_id", column="group"), 3, 0, "name")
    assert sorted(len(p) for p in parts) == [200, 200, 200]


def test_summary_table_and_plot(train, tmp_path):
    parts = _parts(train, "dirichlet", alpha=0.3, min_samples=1)
    summary = partition_summary(train, parts, "name")
    json.dumps(summary)
    assert summary["num_clients"] == 4 and summary["num_samples"] == len(train)
    for c, part in zip(summary["clients"], parts):
        assert c["num_samples"] == len(part) == sum(c["labels"].values()) == sum(c["length_classes"])
        assert 0 < c["top_label_share"] <= 1
    table = format_partition_table(summary)
    assert len(table.splitlines()) == 2 + 4 + 1 and "top name" in table  # header, rule, clients, all
    plot_partition(summary, tmp_path / "p.png")
    plot_partition(partition_summary(train, parts, None), tmp_path / "q.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "q.png").stat().st_size > 1000


def test_long_labels_stay_on_one_line_and_the_plot_fits_them(tmp_path):
    """Labels that are whole sentences are cut in the table and the plot (no constrained-layout warning); the
    length distribution and the token window's counts are in the table."""
    long = [f"Sentence {i}: a label far too long for a legend or a table cell " + "and on " * 20 for i in range(6)]
    rows = 60
    train = datasets.Dataset.from_dict({"topic": [long[i % 6] for i in range(rows)], "length": list(range(10, 70))})
    parts = [list(range(0, 30)), list(range(30, 60))]
    summary = partition_summary(train, parts, "topic")
    summary["truncation"] = {"max_length": 128, "rows": 64, "truncated": 5, "dropped_no_room": 3, "dropped_empty": 1}
    assert summary["clients"][0]["length"] == {"min": 10, "median": 24.5, "p90": 36.1, "max": 39}
    assert summary["length"]["max"] == 69
    table = format_partition_table(summary).splitlines()
    assert len(table) == 2 + 2 + 1 + 1 and all(len(line) < 120 for line in table)
    assert short_label(long[0]) in table[2] and long[0] not in table[2]
    assert table[-1] == ("128-token window: 5 of 64 training rows cut, 3 dropped (the prompt fills the window), "
                         "1 dropped (empty response)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "constrained_layout not applied" is a UserWarning
        plot_partition(summary, tmp_path / "long.png")
    assert (tmp_path / "long.png").stat().st_size > 1000
    assert short_label("a  b\nc", 24) == "a b c" and len(short_label("x" * 40)) == 24
