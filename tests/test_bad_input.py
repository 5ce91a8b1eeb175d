"""Bad input gets one clear error naming the key or the file (exit 2 from the CLI), never a traceback, never
silent acceptance."""

from __future__ import annotations

import pytest
from conftest import TINY

from fedtune.cli import main
from fedtune.comm.split_interfaces import SPLIT_INTERFACES
from fedtune.config import load_config
from fedtune.core.errors import ConfigError
from fedtune.network.devices import PRESETS
from fedtune.split.cut import Cut, CutError


def _run(capsys, tmp_path, *args: str, config=TINY) -> str:
    """``fedtune run CONFIG --set ARGS...``: must exit 2 with no traceback; returns what it printed to stderr."""
    sets = [part for arg in args for part in ("--set", arg)]
    code = main(["run", str(config), *sets, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "error:" in err, err
    return err


def _config_error(*overrides: str, config=TINY) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(config, list(overrides))
    return str(err.value)


# 1. a config file that is not UTF-8


def test_config_file_not_utf8_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(TINY.read_bytes() + b'\nname = "caf\xe9"\n')
    offset = len(TINY.read_bytes()) + len(b'\nname = "caf')
    message = _config_error(config=bad)
    assert str(bad) in message and f"is not UTF-8 text (byte 0xe9 at offset {offset})" in message
    err = _run(capsys, tmp_path, config=bad)
    assert str(bad) in err and "not UTF-8" in err
    assert not (tmp_path / "run").exists(), "no work before the config is read"


# 2. a local data file that is not UTF-8


def _write_bad_data(path):
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        prompts = pa.array([b"caf\xe9", b"tea"], type=pa.binary()).view(pa.string())  # bytes that are not UTF-8
        pq.write_table(pa.table({"prompt": prompts, "response": ["ok", "fine"]}), path)
    elif path.suffix == ".csv":
        path.write_bytes(b"prompt,response\ntea,fine\ncaf\xe9,ok\n")
    else:
        path.write_bytes(b'{"prompt": "tea", "response": "fine"}\n{"prompt": "caf\xe9", "response": "ok"}\n')


@pytest.mark.parametrize("name, line", [("bad.jsonl", 2), ("bad.csv", 3), ("bad.parquet", None)])
def test_local_data_file_not_utf8_is_a_data_error(tmp_path, capsys, name, line):
    from fedtune.core.errors import DataError
    from fedtune.data.sources import load_splits

    path = tmp_path / name
    _write_bad_data(path)
    if line is None:  # parquet: a binary file whose string column holds a value that is not UTF-8
        expected = "a text value is not UTF-8 (byte 0xe9 at offset 3 of b'caf\\xe9')"
    else:
        expected = f"is not UTF-8 text (byte 0xe9 at offset {path.read_bytes().index(0xE9)}, line {line})"
    cfg = load_config(TINY, ["data.dataset=local", f"data.path='{path}'"])
    with pytest.raises(DataError) as err:
        load_splits(cfg.data, cfg.seed)
    assert str(path) in str(err.value) and expected in str(err.value), str(err.value)
    err = _run(capsys, tmp_path, "data.dataset=local", f"data.path='{path}'", "federation.rounds=1")
    assert str(path) in err and expected in err, err


# 3. every float of every table is finite


@pytest.mark.parametrize("override, key", [
    ("train.lr=inf", "train.lr"),
    ("train.lr=nan", "train.lr"),
    ("network.bandwidth_hz=-inf", "network.bandwidth_hz"),
    ("federation.server_betas=[0.9, nan]", "federation.server_betas"),
    ("network.distances_m=[inf]", "network.distances_m"),
    ("compression.theta_high=inf", "compression.theta_high"),  # a controller's own key ([compression], Settings)
    ("train.max_grad_norm=inf", "train.max_grad_norm"),  # optional floats too
])
def test_non_finite_floats_are_refused(tmp_path, capsys, override, key):
    message = _config_error(override)
    assert f"{key}: Input should be a finite number" in message, message
    assert key in _run(capsys, tmp_path, override)
    assert not (tmp_path / "run").exists()


def test_shipped_configs_have_finite_floats():
    for path in sorted(TINY.parent.glob("*.toml")):
        load_config(path)


# 4. similarity thresholds lie in [0, 1]


@pytest.mark.parametrize("override, key", [
    ("compression.theta=2", "compression.theta"),
    ("compression.theta=-0.1", "compression.theta"),
    ("compression.thresholds={activations=1.5}", "compression.thresholds.activations"),
    ("compression.thresholds={gradients=-1}", "compression.thresholds.gradients"),
    ("compression.theta_low=1.1", "compression.theta_low"),
    ("compression.theta_high=2", "compression.theta_high"),
    ("compression.theta_min=-0.5", "compression.theta_min"),
    ("compression.theta_max=1.5", "compression.theta_max"),
    ("compression.theta_end=2", "compression.theta_end"),
])
def test_thresholds_outside_0_1_are_refused(tmp_path, capsys, override, key):
    message = _config_error(override)
    assert f"{key}: Input should be" in message and ("less than or equal to 1" in message
                                                     or "greater than or equal to 0" in message), message
    assert key in _run(capsys, tmp_path, override)


def test_thresholds_at_the_ends_of_0_1_are_accepted():
    cfg = load_config(TINY, ["compression.theta=1", "compression.thresholds={activations=0, gradients=1}",
                             "compression.theta_low=0", "compression.theta_max=1", "compression.theta_end=0"])
    assert cfg.compression.thresholds == {"activations": 0.0, "gradients": 1.0}


# 5. per-interface thresholds name interfaces


def test_thresholds_for_an_unknown_interface_are_refused(tmp_path, capsys):
    message = _config_error("compression.thresholds={activation=0.9}")
    assert f"compression.thresholds: unknown interface 'activation'; valid: {', '.join(SPLIT_INTERFACES)}" in message
    err = _run(capsys, tmp_path, "compression.thresholds={activation=0.9}")
    assert "compression.thresholds" in err and "'activation'" in err


# 6. unknown keys inside dict-of-table fields


@pytest.mark.parametrize("overrides, table, valid", [
    (["kd.models.small.foo=1"], "kd.models.small", "source, path, dtype, cache_dir, tiny"),
    (["kd.models.small.tiny.depth=2"], "kd.models.small.tiny", "arch, hidden_size, num_layers"),
    (["devices.custom.x.flops_per_s=1e12", "devices.custom.x.memory_gb=2", "devices.custom.x.foo=1"],
     "devices.custom.x", "flops_per_s, memory_gb, tx_power_w"),
])
def test_unknown_keys_in_dict_tables_list_the_valid_keys(tmp_path, capsys, overrides, table, valid):
    bad_key = overrides[-1].split("=")[0]
    message = _config_error(*overrides)
    assert f"unknown key '{bad_key}'; valid keys in [{table}]: {valid}" in message, message
    assert "?" not in message
    assert f"unknown key '{bad_key}'; valid keys in" in _run(capsys, tmp_path, *overrides)


# 7. device profiles: known names, and one or one per client, at config time


def test_unknown_device_profile_is_a_config_error(tmp_path, capsys):
    message = _config_error("devices.profiles=['phone', 'toaster', 'laptop']")
    assert f"devices.profiles: unknown device 'toaster'; valid: {', '.join(sorted(PRESETS))}" in message, message
    with_custom = _config_error("devices.profiles=['toaster']", "devices.custom.mine.flops_per_s=1e12",
                                "devices.custom.mine.memory_gb=2")
    assert "valid: jetson, laptop, mine, phone, workstation" in with_custom
    err = _run(capsys, tmp_path, "devices.profiles=['toaster']")
    assert "devices.profiles" in err and "'toaster'" in err
    assert not (tmp_path / "run").exists(), "refused before any work"
    load_config(TINY, ["devices.profiles=['mine']", "devices.custom.mine.flops_per_s=1e12",
                       "devices.custom.mine.memory_gb=2"])  # a custom device is a valid name


@pytest.mark.parametrize("profiles, n", [("['phone', 'laptop']", 2), ("['phone', 'laptop', 'phone', 'jetson']", 4)])
def test_device_profiles_count_is_a_config_error(tmp_path, capsys, profiles, n):
    message = _config_error(f"devices.profiles={profiles}")
    assert f"devices.profiles has {n} entries; give one, or one per client (3)" in message, message
    assert f"devices.profiles has {n} entries" in _run(capsys, tmp_path, f"devices.profiles={profiles}")
    assert not (tmp_path / "run").exists()
    for ok in ("[]", "['phone']", "['phone', 'laptop', 'jetson']"):
        load_config(TINY, [f"devices.profiles={ok}"])


# 8. impossible split cuts of a tiny model, at config time


@pytest.mark.parametrize("overrides, key, cut", [
    (["split.cut=4"], "split.cut", Cut(4)),
    (["split.cut=7"], "split.cut", Cut(7)),
    (["split.cuts=[1, 4, 2]"], "split.cuts", Cut(4)),
    (["split.ushape=true", "split.cut=3"], "split.cut with split.tail", Cut(3, 1)),
    (["split.ushape=true", "split.tail=2", "split.cut=2"], "split.cut with split.tail", Cut(2, 2)),
    (["split.ushape=true", "split.tail=2", "split.cuts=[1, 2, 1]"], "split.cuts with split.tail", Cut(2, 2)),
])
def test_impossible_cut_of_a_tiny_model_is_a_config_error(tmp_path, capsys, overrides, key, cut):
    with pytest.raises(CutError) as expected:
        cut.check(4)  # configs/tiny.toml: model.tiny.num_layers = 4
    message = _config_error("paradigm=split", *overrides)
    assert f"{key}: {expected.value}" in message, message
    err = _run(capsys, tmp_path, "paradigm=split", *overrides)
    assert key in err and str(expected.value) in err
    assert not (tmp_path / "run").exists(), "refused before the model is built"


def test_possible_cuts_and_other_models_are_left_to_run_time():
    load_config(TINY, ["paradigm=split", "split.cut=3"])
    load_config(TINY, ["paradigm=split", "split.ushape=true", "split.cut=2"])
    load_config(TINY, ["paradigm=split", "model.tiny.num_layers=8", "split.cut=7"])
    load_config(TINY, ["split.cut=9"])  # the split table is the split paradigm's to check
    load_config(TINY, ["paradigm=split", "model.source=smollm2", "split.cut=20"])  # layer count known once loaded
    load_config(TINY, ["paradigm=split", "split.cut=9", "split.cut_policy=profiles", "devices.profiles=['phone']"])


# 9. sizes known only once the data and the model are read: an error, never a silent clamp


@pytest.mark.parametrize("override, message", [
    ("eval.sample_index=100000", "eval.sample_index (100000) is beyond the eval split's 48 samples; allowed: 0..47"),
    ("data.max_length=100000", "data.max_length (100000) exceeds the model's 1024 positions; allowed: 8..1024"),
])
def test_sizes_beyond_the_data_or_the_model_are_refused(tmp_path, capsys, override, message):
    err = " ".join(_run(capsys, tmp_path, override).split())
    assert message in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# 10. a diverged model is never reported as a result


def test_a_non_finite_evaluation_stops_the_run_instead_of_being_reported(tmp_path, capsys):
    """lr 1e30 with the update guard off poisons the global adapter: the run stops at that round's checkpoint with an
    error, and writes no summary that would report a number."""
    err = " ".join(_run(capsys, tmp_path, "train.lr=1e30", "train.local_steps=1", "train.max_grad_norm=none",
                        "train.max_update_ratio=none", "eval.metric=none").split())
    assert "round 1: the evaluated model's eval loss is nan (the model diverged)" in err
    assert "stopped at the checkpoint of round 1" in err
    assert not (tmp_path / "run" / "summary.json").exists()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "round-000001"
