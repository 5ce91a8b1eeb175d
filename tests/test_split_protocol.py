"""Split-FedLLM end to end on the tiny model: privacy of what the server receives, byte accounting,
per-block aggregation, adaptive cuts, cut-layer rank and resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedtune.comm.messages import encode
from fedtune.comm.transport import Transport
from fedtune.core.errors import ConfigError
from fedtune.engine.runner import Runner
from fedtune.split.adaptive import adapt_cuts
from fedtune.split.aggregation import aggregate_blocks

FAST = ("federation.rounds=2", "train.local_steps=3", "eval.max_new_tokens=4")


@pytest.fixture
def server_inbox(monkeypatch):
    """Every message the server receives (client uploads), as decoded on the server side."""
    received = []
    real = Transport.upload

    def upload(self, message, *, round, client, **kwargs):
        out = real(self, message, round=round, client=client, **kwargs)
        received.append((out, len(encode(message))))
        return out

    monkeypatch.setattr(Transport, "upload", upload)
    return received


def _run(tmp_path, tiny_config, *overrides, name="run"):
    cfg = tiny_config("paradigm=split", *FAST, *overrides)
    return cfg, Runner(cfg, tmp_path / name).run()


def _token_ids(cfg):
    from fedtune.data.formatting import tokenize_examples
    from fedtune.data.sources import load_splits
    from fedtune.models.loading import load_model

    _, tokenizer = load_model(cfg.model, torch.device("cpu"))
    train = tokenize_examples(load_splits(cfg.data, cfg.seed).train, tokenizer, cfg.data.max_length, True)
    return train["input_ids"]


def test_standard_split_sends_no_token_ids(tmp_path, tiny_config, server_inbox):
    cfg, summary = _run(tmp_path, tiny_config, "split.cut=2")
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]
    kinds = {m.kind for m, _ in server_inbox}
    assert kinds == {"activations", "client_adapter"}
    for message, _ in server_inbox:
        if message.kind == "activations":
            assert set(message.tensors) == {"hidden", "attention_mask", "labels"}
            assert message.tensors["hidden"].is_floating_point() and message.tensors["attention_mask"].dtype == torch.bool
            # labels are the only integers: positions of the prompt are masked, so the prompt's ids never leave
            labels = message.tensors["labels"]
            ids_with_prompt_masked = (labels == -100).sum(dim=1)
            assert (ids_with_prompt_masked > 0).all()
        else:
            assert all(t.is_floating_point() for t in message.tensors.values())
    prompts = {tuple(ids[:8]) for ids in _token_ids(cfg)}
    for message, _ in server_inbox:
        for tensor in message.tensors.values():
            if not tensor.is_floating_point() and tensor.dtype != torch.bool:
                for row in tensor.tolist():
                    assert tuple(row[:8]) not in prompts


def test_ushape_sends_neither_token_ids_nor_labels(tmp_path, tiny_config, server_inbox):
    _, summary = _run(tmp_path, tiny_config, "split.cut=1", "split.ushape=true", "split.tail=1")
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]
    assert {m.kind for m, _ in server_inbox} == {"activations", "tail_gradients", "client_adapter"}
    for message, _ in server_inbox:
        for name, tensor in message.tensors.items():
            assert tensor.is_floating_point() or (name == "attention_mask" and tensor.dtype == torch.bool), (message.kind, name)
    assert summary["comm"]["body_output_downlink_bytes"] > 0 and summary["comm"]["tail_gradient_uplink_bytes"] > 0


def test_activation_bytes_are_the_serialized_uploads(tmp_path, tiny_config, server_inbox):
    cfg, summary = _run(tmp_path, tiny_config, "split.cut=2")
    sent = sum(n for m, n in server_inbox if m.kind == "activations")
    assert summary["comm"]["activation_uplink_bytes"] == sent
    steps = cfg.federation.rounds * cfg.federation.num_clients * cfg.train.local_steps
    floats = sum(m.tensors["hidden"].numel() for m, _ in server_inbox if m.kind == "activations")
    assert floats >= steps * cfg.train.batch_size * cfg.model.tiny.hidden_size
    assert sent > floats * 4  # fp32 hidden states plus mask and labels
    assert summary["comm"]["gradient_downlink_bytes"] > floats * 4
    for client in summary["clients"]:
        assert client["cut_layer"] == [2] * (cfg.federation.rounds + 1)


def test_client_compute_and_memory_count_only_client_blocks(tmp_path, tiny_config):
    _, low = _run(tmp_path, tiny_config, "split.cut=1", name="k1")
    _, high = _run(tmp_path, tiny_config, "split.cut=3", name="k3")
    assert low["compute"]["client_flops"] < high["compute"]["client_flops"]
    assert low["compute"]["server_flops"] > high["compute"]["server_flops"]
    assert low["memory"]["client_peak_bytes"] < high["memory"]["client_peak_bytes"]


def test_per_client_static_cuts_and_v1_server_adapters(tmp_path, tiny_config):
    _, summary = _run(tmp_path, tiny_config, "split.cuts=[1, 2, 3]", "split.server_adapter='per_client'")
    assert [c["cut_layer"][0] for c in summary["clients"]] == [1, 2, 3]
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]
    flops = [c["flops"] / max(1, c["rounds_trained"]) for c in summary["clients"]]
    assert flops[0] < flops[2]


def test_adaptive_cuts_move_within_bounds(tmp_path, tiny_config):
    cfg, summary = _run(tmp_path, tiny_config, "split.adaptive=true", "split.gamma=100.0", "split.cut=2",
                        "split.max_client_blocks=[3, 2, 3]", "federation.rounds=3")
    histories = [c["cut_layer"] for c in summary["clients"]]
    assert any(len(set(h)) > 1 for h in histories), histories
    assert all(1 <= k <= 3 for h in histories for k in h)
    assert all(k <= 2 for k in histories[1])
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("cuts" in r for r in lines[1:])
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]


def test_adapt_rule():
    cuts = {0: 2, 1: 2, 2: 2}
    # client 0 scores best, client 2 worst; mean -2.0
    new = adapt_cuts(cuts, {0: -1.0, 1: -2.0, 2: -3.0}, gamma=0.5, num_layers=4, max_blocks={0: 3, 1: 3, 2: 3})
    assert new == {0: 3, 1: 2, 2: 1}
    capped = adapt_cuts(cuts, {0: -1.0, 1: -2.0, 2: -3.0}, gamma=5, num_layers=4, max_blocks={0: 2, 1: 3, 2: 3})
    assert capped == {0: 2, 1: 2, 2: 1}
    assert adapt_cuts(cuts, {0: -2.0, 1: -2.0, 2: -2.0}, gamma=1, num_layers=4, max_blocks={0: 3, 1: 3, 2: 3}) == cuts


def test_per_block_aggregation_over_holders_and_shared_server_copy():
    """Block b is client-side for clients 0 (n=10) and 1 (n=30), server-side for client 2 (n=60)."""
    key_block = {"b.A": 0, "c.A": 1}
    state = {"b.A": torch.zeros(2), "c.A": torch.zeros(2)}
    weights = {0: 10.0, 1: 30.0, 2: 60.0}
    clients = {0: {"b.A": torch.tensor([1.0, 1.0])}, 1: {"b.A": torch.tensor([3.0, 3.0])}, 2: {}}
    bodies = {0: {"c.A": torch.tensor([9.0, 9.0])}, 1: {"c.A": torch.tensor([9.0, 9.0])},
              2: {"b.A": torch.tensor([7.0, 7.0]), "c.A": torch.tensor([9.0, 9.0])}}
    shared = {"b.A": torch.tensor([5.0, 5.0]), "c.A": torch.tensor([2.0, 2.0])}
    v2 = aggregate_blocks(state, key_block, clients, bodies, weights, shared)
    torch.testing.assert_close(v2["b.A"], torch.full((2,), (10 * 1 + 30 * 3 + 60 * 5) / 100))
    torch.testing.assert_close(v2["c.A"], torch.full((2,), 2.0))  # only the server held c
    v1 = aggregate_blocks(state, key_block, clients, bodies, weights, None)  # client 2's own server copy
    torch.testing.assert_close(v1["b.A"], torch.full((2,), (10 * 1 + 30 * 3 + 60 * 7) / 100))
    torch.testing.assert_close(v1["c.A"], torch.full((2,), 9.0))


def test_cut_layer_rank_reduction_on_both_sides(tmp_path, tiny_config):
    cfg, summary = _run(tmp_path, tiny_config, "split.cut=2", "split.cut_rank=2", "split.cut_rank_side='both'",
                        name="rank")
    _, full = _run(tmp_path, tiny_config, "split.cut=2", name="full")
    adapter = load_file(tmp_path / "rank" / "adapter" / "adapter_model.safetensors")
    for key, tensor in adapter.items():
        block = int(key.split("layers.")[1].split(".")[0])
        rank = tensor.shape[0] if "lora_A" in key else tensor.shape[1]
        assert rank == (2 if block in (1, 2) else cfg.lora.r), key
    assert summary["comm"]["adapter_bytes"] < full["comm"]["adapter_bytes"]


@pytest.mark.parametrize("override, message", [
    ("split.cut=4", "server would run none"),
    ("split.cuts=[1, 4, 2]", "server would run none"),
])
def test_impossible_cuts_stop_before_training(tmp_path, tiny_config, override, message):
    with pytest.raises(ConfigError, match=message):  # the tiny model's blocks are in its config: refused at once
        tiny_config("paradigm=split", override)


def test_split_config_errors():
    from conftest import TINY

    from fedtune.config import load_config

    with pytest.raises(ConfigError, match="split.cuts has 2 entries but federation.num_clients = 3"):
        load_config(TINY, ["paradigm=split", "split.cuts=[1, 2]"])
    with pytest.raises(ConfigError, match="cut_rank needs one fixed cut"):
        load_config(TINY, ["paradigm=split", "split.cut_rank=2", "split.adaptive=true"])
    load_config(TINY, ["split.cuts=[1, 2]"])  # the split table is the split paradigm's to check


def test_split_resume_extends_to_the_same_result(tmp_path, tiny_config):
    args = ("split.adaptive=true", "split.gamma=100.0", "split.ushape=true", "split.cut=1")
    cfg_full = tiny_config("paradigm=split", *FAST, *args, "federation.rounds=3")
    Runner(cfg_full, tmp_path / "full").run()
    cfg_part = tiny_config("paradigm=split", *FAST, *args, "federation.rounds=2")
    Runner(cfg_part, tmp_path / "part").run()
    Runner(cfg_full, tmp_path / "part").run(resume=True)
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "part" / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    sa = json.loads((tmp_path / "full" / "summary.json").read_text())
    sb = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert sa["comm"] == sb["comm"] and sa["final"] == sb["final"]
    assert [c["cut_layer"] for c in sa["clients"]] == [c["cut_layer"] for c in sb["clients"]]


@pytest.mark.parametrize("ushape", [False, True])
def test_a_non_finite_client_gradient_norm_is_guarded(tmp_path, tiny_config, monkeypatch, ushape):
    """Split clients step through the same guard as every local step: inf cut-layer gradients arriving at client 1
    skip its step, end its session and reject its update, with the reason; the others train on."""
    from fedtune.comm.messages import Message

    real = Transport.download

    def corrupt(self, message, *, round, client, **kwargs):
        if message.kind == "gradients" and client == 1:
            message = Message("gradients", {**message.tensors, "grad": torch.full_like(message.tensors["grad"],
                                                                                       float("inf"))})
        return real(self, message, round=round, client=client, **kwargs)

    monkeypatch.setattr(Transport, "download", corrupt)
    extra = ("split.ushape=true",) if ushape else ()
    _, summary = _run(tmp_path, tiny_config, "split.cut=2", *extra)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for line in lines[1:]:
        assert line["rejected"] == [{"client": 1, "reason": "non-finite gradient norm at step 1"}]
    assert summary["rejected_updates"] == 2
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]


def test_every_endpoint_implements_the_split_session_protocol():
    """In-process and Ray endpoints offer exactly the protocol's calls, with its parameters."""
    import inspect

    from fedtune.runtime.ray_split import RayClient, RayServer
    from fedtune.split.protocol import ClientEndpoint, ServerEndpoint
    from fedtune.split.session import LocalClient, LocalServer

    for protocol, implementations in ((ClientEndpoint, (LocalClient, RayClient)),
                                      (ServerEndpoint, (LocalServer, RayServer))):
        calls = [n for n, f in vars(protocol).items() if inspect.isfunction(f) and not n.startswith("_")]
        assert calls
        for impl in implementations:
            for name in calls:
                want = list(inspect.signature(getattr(protocol, name)).parameters)
                assert list(inspect.signature(getattr(impl, name)).parameters) == want, (impl, name)
