"""The update-norm guard (``train.max_update_ratio``): a finite but huge update (lr = 1e30) is rejected like a
non-finite one in every paradigm, so the evaluated model stays the initial one; healthy runs are bit-for-bit the
same with the guard on and off; the bound must be positive."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedtune.core.errors import ConfigError
from fedtune.engine.runner import Runner
from fedtune.training.steps import update_norm_failure, update_ratio

FAST = ("federation.rounds=2", "eval.metric=none")
KD = ("paradigm=kd", "kd.public_samples=16", "kd.distill_steps=1")
SPLIT = ("paradigm=split", "split.cut=2")
PARADIGMS = {
    "fedllm": (),
    "fedllm-pruned": ("pruning.rates=[0.5, 0.0, 0.3]",),
    "kd": KD,
    "local": ("paradigm=local",),
    "split": SPLIT,
    "split-ushape": (*SPLIT, "split.ushape=true", "split.server_adapter=per_client"),
}


def _metrics(run_dir) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in row.items() if k not in ("wall_s", "cum_wall_s")} for row in rows]


def _diverging(tiny_config, sets):
    cfg = tiny_config(*sets, *FAST, "train.lr=1e30", "train.local_steps=1")
    cfg.train.max_grad_norm = None  # no clipping to hide the step (TOML has no null: set it here)
    return cfg


def test_update_ratio_is_the_relative_norm_over_all_tensors():
    start = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[0.0], [4.0]])}  # ||start|| = 5
    new = {"a": torch.tensor([3.0, 3.0]), "b": torch.tensor([[0.0], [8.0]])}  # ||new - start|| = 5
    assert update_ratio(new, start) == 1.0
    assert update_ratio(start, start) == 0.0
    zero = {"a": torch.zeros(2)}
    assert update_ratio(zero, zero) == 0.0 and update_ratio({"a": torch.ones(2)}, zero) == math.inf
    # float64 norms: float32 values near 1e30 square past float32's range but not float64's
    huge = {"a": torch.tensor([3.0, 1e30]), "b": torch.tensor([[0.0], [4.0]])}
    assert update_ratio(huge, start) == pytest.approx(1e30 / 5, rel=1e-6)
    assert update_norm_failure(new, start, 1.0) is None and update_norm_failure(huge, start, None) is None
    reason = update_norm_failure(huge, start, 100.0)
    assert reason == "update norm 2e+29 x its starting weights' (train.max_update_ratio = 100)"


@pytest.mark.parametrize("name", list(PARADIGMS))
def test_huge_finite_updates_are_rejected_and_the_model_is_kept(tmp_path, tiny_config, name):
    cfg = _diverging(tiny_config, PARADIGMS[name])
    summary = Runner(cfg, tmp_path / name).run()
    lines = _metrics(tmp_path / name)
    n = cfg.federation.num_clients
    for line in lines[1:]:
        assert sorted(r["client"] for r in line["rejected"]) == list(range(n))
        assert all(r["reason"].startswith("update norm ") and "train.max_update_ratio = 100" in r["reason"]
                   for r in line["rejected"]), line["rejected"]
        assert line["eval_loss"] == lines[0]["eval_loss"]
    assert summary["rejected_updates"] == n * cfg.federation.rounds
    assert math.isfinite(summary["final"]["eval_loss"])
    assert summary["final"]["eval_loss"] == summary["initial"]["eval_loss"]


def test_split_server_body_that_moved_too_far_rejects_the_session(tmp_path, tiny_config, monkeypatch):
    """With the client's own check out of the way, the server's body blocks still catch the session."""
    import fedtune.split.session as session

    monkeypatch.setattr(session, "update_norm_failure", lambda *args: None)
    cfg = _diverging(tiny_config, (*SPLIT, "split.server_adapter=per_client"))
    summary = Runner(cfg, tmp_path / "body").run()
    lines = _metrics(tmp_path / "body")
    reasons = [r["reason"] for line in lines[1:] for r in line["rejected"]]
    assert len(reasons) == cfg.federation.num_clients * cfg.federation.rounds
    assert all(r.startswith("server body: update norm ") for r in reasons), reasons
    assert summary["final"]["eval_loss"] == summary["initial"]["eval_loss"]


@pytest.mark.parametrize("name", ["fedllm", "kd", "split"])
def test_healthy_runs_are_unchanged_by_the_guard(tmp_path, tiny_config, name):
    sets = (*PARADIGMS[name], *FAST, *(("kd.server_model=true",) if name == "kd" else ()))
    guarded = tiny_config(*sets)
    assert guarded.train.max_update_ratio == 100
    unguarded = tiny_config(*sets)
    unguarded.train.max_update_ratio = None
    Runner(guarded, tmp_path / "on").run()
    Runner(unguarded, tmp_path / "off").run()
    on, off = _metrics(tmp_path / "on"), _metrics(tmp_path / "off")
    assert all(not row["rejected"] for row in on)
    assert on == off
    assert (tmp_path / "on" / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "off" / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("value", ["0", "-1", "-0.5"])
def test_the_bound_must_be_positive(tiny_config, value):
    with pytest.raises(ConfigError, match="train.max_update_ratio"):
        tiny_config(f"train.max_update_ratio={value}")
    cfg = tiny_config("train.max_update_ratio=5")
    with pytest.raises(ValueError):
        cfg.train.max_update_ratio = float(value)
