"""Checkpoints: atomic, verified, pruned; corrupt or missing ones are clear errors."""

from __future__ import annotations

import pytest
import torch

from fedtune.core.errors import CheckpointError
from fedtune.engine.checkpoint import Checkpointer


def test_save_load_round_trip_and_keep(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    for rnd in (1, 2, 3):
        ck.save(rnd, {"w": torch.full((3,), float(rnd)), "n": rnd}, {"fingerprint": "x"})
    state, meta = ck.load_latest()
    assert meta["round"] == 3 and state["n"] == 3 and torch.equal(state["w"], torch.full((3,), 3.0))
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("round-*")) == ["round-000002", "round-000003"]


def test_corrupt_state_is_an_error_not_a_restart(tmp_path):
    ck = Checkpointer(tmp_path)
    path = ck.save(1, {"w": torch.zeros(100)}, {})
    data = bytearray((path / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "state.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        ck.load_latest()


def test_missing_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Checkpointer(tmp_path).load_latest()


def test_unfinished_write_leaves_previous_checkpoint(tmp_path):
    ck = Checkpointer(tmp_path)
    ck.save(1, {"n": 1}, {})
    # a crash mid-write leaves only a temporary directory behind
    (tmp_path / "checkpoints" / ".tmp-round-000002-123").mkdir()
    (tmp_path / "checkpoints" / ".tmp-round-000002-123" / "state.pt").write_bytes(b"partial")
    state, meta = ck.load_latest()
    assert meta["round"] == 1 and state["n"] == 1
