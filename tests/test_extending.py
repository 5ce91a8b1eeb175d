"""The README's "Extending fedtune" examples are real: the bf16 codec and the linear threshold controller (a new
setting of its own), each one module plus one registry line, usable from the config like the built-in ones."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune.cli import main
from fedtune.compression.codecs import CODECS
from fedtune.compression.controllers import SessionObservation, make_controller
from fedtune.compression.schedule import LinearSettings
from fedtune.core.errors import ConfigError
from fedtune.engine.runner import Runner

SPLIT = ("paradigm=split", "split.cut=2", "train.local_steps=3", "federation.rounds=2", "eval.metric=none")


def test_bf16_codec_halves_float32_and_keeps_its_range():
    codec = CODECS.get("bf16")()
    rows = torch.randn(12, 64) * 1e5  # beyond fp16's 65504
    wire = codec.encode(rows)
    assert wire["values"].dtype == torch.bfloat16 and wire["values"].element_size() * 2 == rows.element_size()
    back = codec.roundtrip(rows)
    assert torch.isfinite(back).all() and torch.allclose(back, rows, rtol=1e-2)
    assert not torch.isfinite(CODECS.get("fp16")().roundtrip(rows)).all()


def test_linear_controller_moves_from_theta_to_theta_end():
    ctrl = make_controller("linear", 0.999, seed=0, settings=LinearSettings(theta_end=0.9))
    assert ctrl.start_session() == 0.999
    ctrl.end_session(SessionObservation(1.0, 1.0, 10, 10, progress=0.5))
    assert ctrl.start_session() == pytest.approx(0.9495)
    resumed = make_controller("linear", 0.999, seed=0, settings=LinearSettings(theta_end=0.9))
    resumed.load_state_dict(ctrl.state_dict())
    resumed.end_session(SessionObservation(1.0, 1.0, 10, 10, progress=1.0))
    assert resumed.theta == pytest.approx(0.9)


def test_the_new_choices_are_config_choices(tiny_config, capsys):
    cfg = tiny_config(*SPLIT, "compression.codec=bf16", "compression.controller=linear",
                      "compression.method=splitcom", "compression.theta_end=0.5")
    assert cfg.compression.controller_settings() == LinearSettings(theta_end=0.5)
    with pytest.raises(ConfigError, match=r"unknown codec 'int3'; valid choices: bf16, fp16, int2, int4, int8, none"):
        tiny_config(*SPLIT, "compression.codec=int3")
    assert main(["config"]) == 0
    assert "compression.theta_end = 0.99\n    Linear schedule" in capsys.readouterr().out


def test_a_split_run_with_both(tmp_path, tiny_config):
    base = Runner(tiny_config(*SPLIT), tmp_path / "plain").run()
    cfg = tiny_config(*SPLIT, "compression.codec=bf16", "compression.method=splitcom",
                      "compression.controller=linear", "compression.theta=0.9999", "compression.theta_end=0.5",
                      "data.max_train_samples=72")
    summary = Runner(cfg, tmp_path / "both").run()
    activations = summary["compression"]["activations"]
    assert activations["codec"] == "bf16"
    thetas = [t[2] for t in activations["threshold_trajectory"]]
    assert thetas[0] == 0.9999 and thetas == sorted(thetas, reverse=True) and thetas[-1] < 0.9
    assert summary["comm"]["activation_uplink_bytes"] < 0.6 * base["comm"]["activation_uplink_bytes"]
    record = json.loads((tmp_path / "both" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["thresholds"]["activations"]
