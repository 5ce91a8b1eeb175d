"""``train.local_epochs``: whole passes over a client's data every round, the last batch smaller."""

from __future__ import annotations

from fedtune.core.progress import RunProgress
from fedtune.engine.context import build_context
from fedtune.federated.sampling import local_samples, local_steps
from fedtune.training.streams import SampleStream


def test_one_local_epoch_is_each_sample_once_per_round(tmp_path, tiny_config):
    cfg = tiny_config("train.local_epochs=1", "train.batch_size=8", "data.max_train_samples=42",
                      "partition.method='iid'", "federation.num_clients=2")
    ctx = build_context(cfg, RunProgress(False), tmp_path)
    rows = ctx.partitions[0]
    assert len(rows) % 8  # a partial last batch
    stream = SampleStream(rows, cfg.seed, 0)
    steps, samples = local_steps(cfg, len(rows)), local_samples(cfg, len(rows))
    assert (steps, samples) == (-(-len(rows) // 8), len(rows))
    for _ in range(3):
        drawn = [i for ids, _ in ctx.indexed_batches(stream, steps, samples) for i in ids]
        assert sorted(drawn) == sorted(rows)  # every sample exactly once
    assert stream.state_dict() == {"epoch": 2, "cursor": len(rows)}  # three rounds: the end of the third epoch


def test_fractional_epochs_and_fixed_steps(tiny_config):
    half = tiny_config("train.local_epochs=0.5", "train.batch_size=4")
    assert (local_samples(half, 21), local_steps(half, 21)) == (10, 3)
    fixed = tiny_config("train.local_steps=5")
    assert (local_samples(fixed, 21), local_steps(fixed, 21)) == (None, 5)
