"""End-to-end tiny runs: outputs, falling eval loss, loadable adapter, report, centralized, NaN handling."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedtune.cli import main
from fedtune.comm.messages import Message, encode
from fedtune.core.errors import CheckpointError, FedtuneError
from fedtune.engine.runner import Runner
from fedtune.models.loading import load_model, resolve_device


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import TINY

    from fedtune.config import load_config

    out = tmp_path_factory.mktemp("run") / "tiny"
    cfg = load_config(TINY, ["runtime.plots=true"])  # tiny.toml leaves plots off for the rest of the suite
    summary = Runner(cfg, out).run()
    return cfg, out, summary


def test_run_directory_has_every_output(tiny_run):
    _, out, _ = tiny_run
    for name in ("config.toml", "metrics.jsonl", "summary.json", "report.md", "eval_loss.png",
                 "partition.json", "partition.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "checkpoints/latest"):
        assert (out / name).exists(), name


def test_summary_keys_and_eval_loss_falls(tiny_run):
    cfg, out, summary = tiny_run
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("paradigm", "rounds"):
        assert key in on_disk
    for section, key in [("final", "eval_loss"), ("final", "eval_ppl"), ("initial", "eval_loss"),
                         ("comm", "uplink_bytes"), ("comm", "downlink_bytes"), ("compute", "client_flops"),
                         ("compute", "server_flops"), ("time", "wall_s")]:
        assert key in on_disk[section], (section, key)
    assert on_disk["paradigm"] == "fedllm" and on_disk["rounds"] == cfg.federation.rounds
    assert on_disk["final"]["eval_loss"] < on_disk["initial"]["eval_loss"] - 0.1
    assert on_disk["comm"]["uplink_bytes"] > 0 and on_disk["compute"]["client_flops"] > 0
    assert on_disk["sample"]["base"] is not None and on_disk["sample"]["tuned"] is not None
    for when in ("initial", "final"):  # e2e gets BLEU and ROUGE-L by generation
        assert set(on_disk[when]["metrics"]) == {"bleu", "rougeL"}
        assert all(0.0 <= v <= 100.0 for v in on_disk[when]["metrics"].values())


def test_metrics_lines_and_bytes_match_adapter_messages(tiny_run):
    cfg, out, summary = tiny_run
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == list(range(cfg.federation.rounds + 1))
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    # each round every client downloads and uploads one adapter: bytes are the serialized message sizes
    one_adapter = sum(t.numel() * t.element_size() for t in adapter.values())
    for rec in lines[1:]:
        assert rec["uplink_bytes"] > cfg.federation.num_clients * one_adapter
        assert rec["uplink_bytes"] < cfg.federation.num_clients * (one_adapter + 20_000)
        assert rec["downlink_bytes"] > cfg.federation.num_clients * one_adapter
        for key in ("train_loss", "eval_loss", "client_flops", "wall_s", "sim_s"):
            assert key in rec
    assert lines[-1]["cum_uplink_bytes"] == summary["comm"]["uplink_bytes"]


def test_final_adapter_loads_with_peft_and_matches_eval(tiny_run):
    cfg, out, summary = tiny_run
    base, tokenizer = load_model(cfg.model, resolve_device("cpu"))
    model = PeftModel.from_pretrained(base, out / "adapter")
    trained = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert trained and any(v.abs().sum() > 0 for v in trained.values())


def test_report_command_rebuilds_report(tiny_run, capsys):
    _, out, _ = tiny_run
    (out / "report.md").unlink()
    (out / "partition.png").unlink()
    assert main(["report", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "eval_loss.png" in text and "partition.png" in text
    assert (out / "partition.png").stat().st_size > 1000  # redrawn from partition.json
    assert "Task metric scored on" in text and "Length median / p90 / max" in text


def test_the_model_card_says_what_the_adapter_is_and_its_loading_lines_work(tmp_path, tiny_config):
    """A run on a base saved to disk (the tiny model, as `pretrained`): the card names base, data and results, and
    its Python block loads the adapter onto that base with PEFT."""
    import re

    base, tokenizer = load_model(tiny_config().model, resolve_device("cpu"))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    cfg = tiny_config("model.source='pretrained'", f"model.path='{tmp_path / 'base'}'", "federation.rounds=1")
    summary = Runner(cfg, tmp_path / "run").run()
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert f"base_model: {tmp_path / 'base'}" in card and "paradigm `fedllm`" in card
    assert f"{summary['final']['eval_loss']:.4f}" in card and "e2e:" in card
    namespace: dict = {}
    exec(re.search(r"```python\n(.*?)```", card, re.S).group(1), namespace)  # the card's own loading lines
    loaded = {k: v for k, v in namespace["model"].state_dict().items() if "lora_B" in k}
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert loaded and sum(v.abs().sum() for v in loaded.values()) == pytest.approx(
        sum(v.abs().sum() for k, v in saved.items() if "lora_B" in k))


def test_rerun_into_same_directory_is_refused(tiny_run):
    cfg, out, _ = tiny_run
    with pytest.raises(FedtuneError, match="already holds a run"):
        Runner(cfg, out).run()


def test_resume_with_a_changed_training_key_is_refused(tiny_run):
    cfg, out, _ = tiny_run
    changed = cfg.model_copy(update={"seed": cfg.seed + 1})
    with pytest.raises(CheckpointError, match="differing keys: seed"):
        Runner(changed, out).run(resume=True)


def test_centralized_reference_runs_on_same_samples(tmp_path, tiny_config):
    cfg = tiny_config("paradigm=centralized", "federation.rounds=2")
    summary = Runner(cfg, tmp_path / "c").run()
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]
    assert summary["compute"]["client_flops"] == 0 and summary["compute"]["server_flops"] > 0
    # pooling the data costs its real serialized size, once
    lines = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["uplink_bytes"] > 0 and lines[2]["uplink_bytes"] == 0
    # runtime.plots = false (tiny.toml): no PNG is drawn and the report links none
    assert not list((tmp_path / "c").glob("*.png"))
    assert ".png" not in (tmp_path / "c" / "report.md").read_text()


def test_diverging_updates_are_rejected_and_reported(tmp_path, tiny_config):
    cfg = tiny_config("train.lr=1e30", "train.max_grad_norm=1e30", "federation.rounds=1", "lora.dropout=0.0")
    summary = Runner(cfg, tmp_path / "nan").run()
    lines = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    rejected = lines[1]["rejected"]
    assert rejected and all("non-finite" in r["reason"] for r in rejected)
    assert summary["rejected_updates"] == len(rejected)
    if len(rejected) == cfg.federation.num_clients:  # nothing aggregated: the global adapter is unchanged
        assert summary["final"]["eval_loss"] == pytest.approx(summary["initial"]["eval_loss"], rel=1e-6)


def test_one_poisoned_client_is_left_out_of_the_aggregate(tmp_path, tiny_config, monkeypatch):
    """Client 1 returns NaN weights; the aggregate must equal FedAvg over clients 0 and 2 only."""
    import fedtune.paradigms.fedllm as fedllm

    real = fedllm.adapter_state
    calls = {"n": 0}

    def poisoned(model):
        state = real(model)
        calls["n"] += 1
        if calls["n"] == 3:  # 1: initial global; 2: client 0; 3: client 1
            state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
        return state

    monkeypatch.setattr(fedllm, "adapter_state", poisoned)
    cfg = tiny_config("federation.rounds=1")
    summary = Runner(cfg, tmp_path / "p").run()
    lines = [json.loads(x) for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["rejected"] == [{"client": 1, "reason": "non-finite adapter weights"}]
    assert summary["final"]["eval_loss"] is not None and summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]
    # the failure report crossed the transport too, at its serialized size
    fail = Message("client_failure", meta={"reason": "non-finite adapter weights"})
    assert summary["clients"][1]["uplink_bytes"] == len(encode(fail))


def test_every_long_phase_is_labelled(tmp_path, tiny_config):
    """With progress on, loading, round 0's evaluation, the final generations and the report each say what runs."""
    import io

    from rich.console import Console

    text = io.StringIO()
    cfg = tiny_config("runtime.progress=true", "federation.rounds=1")
    Runner(cfg, tmp_path / "run", console=Console(file=text, width=200)).run()
    out = text.getvalue()
    for label in ("data: loading e2e:", "data: tokenizing, partitioning over 3 clients:",
                  "loading the model (tiny, weights)",
                  "round 0: the base model's eval loss on", "task metric: generating",
                  "final: the sample answer (base and tuned)", "report.md:"):
        assert label in out, label
