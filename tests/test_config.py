"""Config loading, overrides and the clear errors bad input gets."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import TINY

from fedtune.cli import main
from fedtune.config import RunConfig, describe_fields, load_config
from fedtune.core.errors import ConfigError


def test_tiny_config_loads_and_overrides_apply():
    cfg = load_config(TINY, ["federation.rounds=7", "paradigm=centralized", "lora.target_modules=['q_proj']",
                             "train.lr=0.5", "data.dataset=chatterbot"])
    assert cfg.federation.rounds == 7
    assert cfg.paradigm == "centralized"
    assert cfg.lora.target_modules == ["q_proj"]
    assert cfg.train.lr == 0.5
    assert cfg.data.dataset == "chatterbot"


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(TINY, ["federation.clients_per_round=2"])
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.foo=1", ["unknown key 'model.foo'", "valid keys in [model]", "source", "tiny"]),
        ("bogus=1", ["unknown key 'bogus'", "valid keys in the top level", "paradigm"]),
        ("model.tiny.depth=3", ["unknown key 'model.tiny.depth'", "num_layers"]),
        ("train.lr=fast", ["train.lr", "valid number", "'fast'"]),
        ("train.lr=-1", ["train.lr", "greater than 0"]),
        ("federation.clients_per_round=9", ["clients_per_round (9) exceeds", "num_clients (3)", "1..3"]),
        ("paradigm=fedsgd", ["paradigm", "unknown paradigm 'fedsgd'", "centralized", "fedllm"]),
        ("federation.strategy=avg", ["unknown strategy 'avg'", "fedadam", "fedavg", "fedprox"]),
        ("partition.method=random", ["unknown partitioner 'random'", "length_dirichlet", "natural_id"]),
        ("data.dataset=imagenet", ["unknown dataset 'imagenet'", "chatterbot", "e2e"]),
        ("model.source=hub", ["unknown model source 'hub'", "pretrained", "smollm2", "tiny"]),
        ("model.tiny.arch=mamba", ["model.tiny.arch", "'llama', 'gpt2' or 'qwen2'"]),
        ("model.tiny.num_heads=5", ["num_heads (5) must divide hidden_size (64)"]),
        ("model.source=pretrained", ["model.path is required"]),
        ("train=3", ["train"]),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    for text in expected:
        assert text in str(err.value), (text, str(err.value))


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([], ["set runtime.backend = 'flower'", "'inprocess'"]),
        (["runtime.backend='flower'", "pruning.rates=[0.5]"], ["pruned adapters", "pruning.rates = []"]),
        (["runtime.backend='flower'", "network.planner='equal'"], ["stragglers", "network.planner = 'none'"]),
        (["runtime.backend='flower'", "federation.clients_per_round=1"], ["at least 2 clients per round"]),
        (["runtime.backend='flower'", "deploy.secagg_quantization_range=2147483648"], ["overflows", "2^32"]),
        (["paradigm=kd"], ["deploy.secure_aggregation applies to paradigm 'fedllm'"]),
    ],
)
def test_secure_aggregation_refuses_what_a_secure_sum_cannot_do(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["deploy.secure_aggregation=true", *overrides])
    for text in expected:
        assert text in str(err.value), (text, str(err.value))
    load_config(TINY, ["deploy.secure_aggregation=true", "runtime.backend='flower'"])  # what it needs


def test_deploy_init_writes_a_secure_app_and_refuses_what_cannot_deploy(tmp_path, capsys):
    """`fedtune deploy init` checks the config as it will run (on Flower), before writing anything."""
    import tomllib

    app = tmp_path / "app"
    assert main(["deploy", "init", str(TINY), "--set", "deploy.secure_aggregation=true", "--out", str(app)]) == 0
    written = tomllib.loads((app / "fedtune_app" / "fedtune.toml").read_text())
    assert written["deploy"]["secure_aggregation"] is True and written["runtime"]["backend"] == "flower"
    assert (app / "pyproject.toml").is_file()
    refused = tmp_path / "refused"
    assert main(["deploy", "init", str(TINY), "--set", "deploy.secure_aggregation=true", "--set",
                 "pruning.rates=[0.5]", "--out", str(refused)]) == 2
    assert "pruned adapters" in capsys.readouterr().err and not refused.exists()
    assert main(["deploy", "init", str(TINY), "--set", "paradigm=split", "--out", str(refused)]) == 2
    assert "--certificates" in capsys.readouterr().err and not refused.exists()
    assert main(["deploy", "init", str(TINY), "--set", "paradigm=split", "--set", "split.adaptive=true",
                 "--out", str(refused)]) == 2
    assert "split.adaptive" in capsys.readouterr().err and not refused.exists()


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TINY, ["federation.rounds"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nsource=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_several_errors_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["train.lr=-1", "eval.every=0", "lora.nope=1"])
    text = str(err.value)
    assert "train.lr" in text and "eval.every" in text and "lora.nope" in text


def test_every_field_has_help_text():
    rows = describe_fields()
    assert len(rows) > 40
    missing = [key for key, _, help_text in rows if not help_text and not key.endswith(("tiny",))]
    assert not missing, missing


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    code = main(["run", str(TINY), "--set", "federation.clients_per_round=99", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert "clients_per_round (99) exceeds" in err
    assert "Traceback" not in err
    assert not (tmp_path / "r").exists(), "no work (not even the run directory) before validation"


def test_cli_entry_point_exits_2_on_bad_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedtune", "run", str(TINY), "--set", "train.bogus=1",
                           "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown key 'train.bogus'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_defaults_are_valid():
    assert RunConfig().paradigm == "fedllm"
