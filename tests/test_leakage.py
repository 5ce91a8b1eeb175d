"""The split-learning leakage probe on the tiny model, and activation noise in split training."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedtune.cli import main
from fedtune.comm.transport import Transport
from fedtune.engine.context import build_model, load_run_data
from fedtune.engine.runner import Runner
from fedtune.split.leakage import InverterSettings, activation_rms, noise_generator, noisy_activations, probe_leakage

FAST = ("federation.rounds=2", "train.local_steps=3", "eval.max_new_tokens=4")
SMALL_INVERTER = InverterSettings(steps=150, batch=256, hidden=128)


@pytest.fixture(scope="module")
def tiny_probe_inputs():
    """The tiny model with fresh LoRA (as a run builds it), 16 eval texts (victims), 120 training texts (public)."""
    from conftest import TINY

    from fedtune.config import load_config

    cfg = load_config(TINY, ["paradigm=split"])
    data = load_run_data(cfg)
    _, model = build_model(cfg, torch.device("cpu"))
    return model, data.evals["input_ids"][:16], data.train["input_ids"][:120], int(data.tokenizer.pad_token_id)


def _probe(inputs, **kwargs):
    model, victims, public, pad = inputs
    return probe_leakage(model, victims, public, pad, inverter=SMALL_INVERTER, **kwargs)


@pytest.fixture(scope="module")
def tiny_report(tiny_probe_inputs):
    return _probe(tiny_probe_inputs, cuts=(1, 3, 6), noise=(0.0, 4.0))


def _row(report, cut, noise):
    return next(r for r in report.rows if r.cut == cut and r.noise == noise)


def test_cuts_are_clipped_to_the_model(tiny_report):
    assert sorted({r.cut for r in tiny_report.rows}) == [1, 3]  # 4 blocks: a cut after 6 leaves the server none
    assert tiny_report.vocab_size == 1024 and tiny_report.num_layers == 4


def test_nearest_neighbour_reads_the_first_block_back(tiny_report):
    row = _row(tiny_report, 1, 0.0)
    assert row.chance_uniform == 1 / 1024 and row.chance_majority < 0.15
    assert row.nearest_neighbour > 0.9  # the tiny model gives 0.99
    assert row.tokens > 1000


def test_learned_inverter_beats_chance_even_where_nearest_neighbour_fades(tiny_report):
    row = _row(tiny_report, 3, 0.0)
    assert row.learned > 0.8 > 5 * row.chance_majority
    assert row.learned > row.nearest_neighbour


def test_noise_lowers_recovery(tiny_report):
    for cut in (1, 3):
        clean, noisy = _row(tiny_report, cut, 0.0), _row(tiny_report, cut, 4.0)
        assert noisy.nearest_neighbour < clean.nearest_neighbour / 4
        assert noisy.learned < clean.learned / 2


def test_probe_is_deterministic(tiny_probe_inputs):
    a, b = (_probe(tiny_probe_inputs, cuts=(2,), noise=(1.0,)) for _ in range(2))
    assert [(r.nearest_neighbour, r.learned) for r in a.rows] == [(r.nearest_neighbour, r.learned) for r in b.rows]


def test_noisy_activations_scale_with_the_rms_of_real_tokens():
    act = torch.randn(4, 10, 32) * 3
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[:, 7:] = 0
    assert noisy_activations(act, mask, 0.0, noise_generator(0, "x")) is act
    noisy = noisy_activations(act, mask, 0.5, noise_generator(0, "x"))
    assert torch.equal(noisy, noisy_activations(act, mask, 0.5, noise_generator(0, "x")))
    assert torch.equal(noisy[:, 7:], act[:, 7:])  # padding untouched
    ratio = activation_rms(noisy - act, mask) / activation_rms(act, mask)
    assert ratio == pytest.approx(0.5, rel=0.05)


@pytest.fixture
def uploaded_activations(monkeypatch):
    """The hidden states of every activation upload, as the client sent them."""
    sent = []
    real = Transport.upload

    def upload(self, message, **kwargs):
        if message.kind == "activations":
            sent.append((message.tensors["hidden"].clone(), message.tensors["attention_mask"]))
        return real(self, message, **kwargs)

    monkeypatch.setattr(Transport, "upload", upload)
    return sent


def _split_run(tmp_path, tiny_config, name, *overrides):
    summary = Runner(tiny_config("paradigm=split", "split.cut=2", *FAST, *overrides), tmp_path / name).run()
    return summary, load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")


def test_activation_noise_zero_is_bit_identical_and_noise_is_the_configured_ratio(tmp_path, tiny_config,
                                                                                   uploaded_activations):
    _, plain = _split_run(tmp_path, tiny_config, "plain")
    clean = uploaded_activations[0]
    _, zero = _split_run(tmp_path, tiny_config, "zero", "privacy.activation_noise=0")
    uploaded_activations.clear()
    summary, noised = _split_run(tmp_path, tiny_config, "noised", "privacy.activation_noise=0.5")
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert any(not torch.equal(plain[k], noised[k]) for k in plain)
    # The first upload of the first client is the same clean batch in both runs, plus the noise.
    (hidden, mask), (reference, _) = uploaded_activations[0], clean
    ratio = activation_rms(hidden - reference, mask) / activation_rms(reference, mask)
    assert ratio == pytest.approx(0.5, rel=0.05)
    assert torch.isfinite(torch.tensor(summary["final"]["eval_loss"]))


def test_resumed_noisy_run_draws_the_same_noise(tmp_path, tiny_config):
    overrides = ("paradigm=split", "split.cut=2", *FAST, "privacy.activation_noise=1.0")
    Runner(tiny_config(*overrides), tmp_path / "full").run()
    Runner(tiny_config(*overrides, "federation.rounds=1"), tmp_path / "part").run()
    Runner(tiny_config(*overrides), tmp_path / "part").run(resume=True)
    full = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    part = load_file(tmp_path / "part" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(full[k], part[k]) for k in full)


def test_probe_leakage_command_writes_its_report(tmp_path):
    from conftest import TINY

    out = tmp_path / "leakage"
    sets = [x for kv in ("paradigm=split", "split.ushape=true", "split.cut=1") for x in ("--set", kv)]
    code = main(["probe", "leakage", str(TINY), *sets, "--cuts", "1,2", "--noise", "0,1", "--samples", "4",
                 "--public", "32", "--inverter-steps", "20", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "leakage.json").read_text())
    assert [(r["cut"], r["noise"]) for r in report["rows"]] == [(1, 0.0), (1, 1.0), (2, 0.0), (2, 1.0)]
    assert report["rows"][0]["nearest_neighbour"] > 0.5 and report["victim_texts"] == 4
    assert "labels never leave the client" in (out / "leakage.md").read_text()
