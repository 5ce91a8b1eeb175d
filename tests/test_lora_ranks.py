"""Heterogeneous LoRA ranks: rank slicing in the global scale, a client's rank trained inside the shared model's
rank-R modules, the four aggregations (exact ones against the weighted mean of the clients' updates), HetLoRA's
self-pruning, config checks and runs end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import crash_and_resume
from models_helpers import tiny
from peft import PeftModel
from safetensors.torch import load_file

from fedtune.config import LoraConfig
from fedtune.core.errors import ConfigError
from fedtune.engine.runner import Runner
from fedtune.federated.ranks import (
    RANK_AGGREGATIONS,
    client_rank,
    from_global,
    into_container,
    out_of_container,
    scale,
    self_pruned_rank,
    to_global,
)
from fedtune.federated.strategies import ClientUpdate
from fedtune.models.lora import adapter_state, attach_lora, load_adapter_state

A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"
R, OUT, IN, ALPHA = 4, 6, 5, 16.0


def _adapter(rank: int, seed: int, a: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A: (a[:rank] if a is not None else torch.randn(rank, IN, generator=g)),
            B: torch.randn(OUT, rank, generator=g), "bias": torch.randn(3, generator=g)}


def _delta(state, rank):
    return scale(ALPHA, rank) * state[B].double() @ state[A].double()


def _uploads(ranks, shared_a=None):
    return [(ClientUpdate(c, n, _adapter(r, seed=c, a=shared_a), 1.0), r)
            for c, (n, r) in enumerate(zip([10, 30, 60], ranks))]


def _target(uploads):
    total = sum(u.num_samples for u, _ in uploads)
    return sum(_delta(u.tensors, r) * (u.num_samples / total) for u, r in uploads)


def test_a_clients_slice_is_the_leading_part_of_the_global_update_and_maps_back():
    g = _adapter(R, seed=9)
    client = from_global(g, 2, R)
    assert client[A].shape == (2, IN) and client[B].shape == (OUT, 2)
    lead = scale(ALPHA, R) * g[B][:, :2].double() @ g[A][:2].double()
    torch.testing.assert_close(_delta(client, 2), lead)
    back = to_global(client, 2, R)
    assert back[A].shape == (R, IN)
    torch.testing.assert_close(_delta(back, R), lead)
    torch.testing.assert_close(out_of_container(into_container(client, R), 2)[B], client[B])


def test_a_rank_inside_the_rank_R_modules_trains_like_a_genuine_adapter_of_that_rank():
    """Same logits and the same gradients as a PEFT model built at rank 2, with the same factors."""
    small = attach_lora(tiny()[0], LoraConfig(r=2, alpha=ALPHA, dropout=0.0), seed=1)
    big = attach_lora(tiny()[0], LoraConfig(r=8, alpha=ALPHA, dropout=0.0), seed=2)
    state = {k: torch.randn_like(v) * 0.1 for k, v in adapter_state(small).items()}
    load_adapter_state(small, state)
    load_adapter_state(big, into_container(state, 8))
    ids = torch.randint(0, 100, (2, 7))
    loss_small = small(input_ids=ids, labels=ids).loss
    with client_rank(big, 2):
        loss_big = big(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_big, loss_small)
    loss_small.backward()
    loss_big.backward()
    grads_small = {n: p.grad for n, p in small.named_parameters() if p.requires_grad}
    for name, p in big.named_parameters():
        if p.requires_grad:
            want = grads_small[name]
            got = p.grad[:2] if "lora_A" in name else p.grad[:, :2]
            torch.testing.assert_close(got, want)
            rest = p.grad[2:] if "lora_A" in name else p.grad[:, 2:]
            assert torch.count_nonzero(rest) == 0  # the unused components never move
    plain = big(input_ids=ids, labels=ids).loss  # the scale is back to rank 8's
    assert not torch.allclose(plain, loss_small)


@pytest.mark.parametrize("name", ["flexlora", "flora"])
def test_exact_aggregations_give_the_weighted_mean_of_the_clients_updates(name):
    shared = torch.randn(R, IN, generator=torch.Generator().manual_seed(5))
    uploads = _uploads([R, R, R], shared_a=shared)  # one A: the mean has rank <= R
    out = RANK_AGGREGATIONS.get(name)(_adapter(R, seed=9), uploads, R, ALPHA)
    torch.testing.assert_close(_delta(out, R), _target(uploads), rtol=1e-5, atol=1e-6)


def test_with_different_ranks_flora_and_flexlora_give_the_best_rank_R_approximation_of_the_exact_sum():
    uploads = _uploads([1, 2, 4])
    target = _target(uploads)
    u, s, vh = torch.linalg.svd(target)
    best = (u[:, :R] * s[:R]) @ vh[:R]
    for name in ("flexlora", "flora"):
        out = RANK_AGGREGATIONS.get(name)(_adapter(R, seed=9), uploads, R, ALPHA)
        torch.testing.assert_close(_delta(out, R), best, rtol=1e-5, atol=1e-6)
    padded = RANK_AGGREGATIONS.get("zero_pad")(_adapter(R, seed=9), uploads, R, ALPHA)
    assert float(torch.linalg.norm(_delta(padded, R) - target)) > 1.5 * float(torch.linalg.norm(best - target))


def test_zero_pad_with_equal_ranks_is_fedavg_and_hetlora_averages_a_component_over_its_holders():
    uploads = _uploads([R, R, R])
    out = RANK_AGGREGATIONS.get("zero_pad")(_adapter(R, seed=9), uploads, R, ALPHA)
    torch.testing.assert_close(out[A], sum(u.tensors[A] * u.num_samples for u, _ in uploads) / 100)
    uploads = _uploads([1, 1, 3])
    glob = _adapter(R, seed=9)
    het = RANK_AGGREGATIONS.get("hetlora")(glob, uploads, R, ALPHA)
    third = to_global(uploads[2][0].tensors, 3, R)
    torch.testing.assert_close(het[A][1:3], third[A][1:3])  # only client 2 holds components 1 and 2
    torch.testing.assert_close(het[B][:, 1:3], third[B][:, 1:3])
    torch.testing.assert_close(het[A][3], glob[A][3])  # nobody holds component 3: it keeps its global value


def test_self_pruning_drops_trailing_components_that_carry_almost_nothing():
    state = _adapter(4, seed=3)
    state[B][:, 3] *= 1e-3
    assert self_pruned_rank(state, 4, 0.01) == 3
    assert self_pruned_rank(state, 4, 0.0) == 4


FAST = ("federation.rounds=2", "train.local_steps=2", "eval.max_new_tokens=4", "data.max_train_samples=96",
        "partition.min_samples=4", "eval.metric=none")


@pytest.mark.parametrize("name", ["zero_pad", "hetlora", "flexlora", "flora"])
def test_clients_of_ranks_2_4_8_train_and_the_global_adapter_loads_with_peft(tmp_path, tiny_config, name):
    cfg = tiny_config(*FAST, "lora.ranks=[2, 4, 8]", f"lora.rank_aggregation='{name}'")
    summary = Runner(cfg, tmp_path / name).run()
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]
    clients = {c["id"]: c for c in summary["clients"]}
    assert [clients[i]["lora_rank"] for i in range(3)] == [2, 4, 8]
    assert clients[0]["uplink_bytes"] < clients[1]["uplink_bytes"] < clients[2]["uplink_bytes"]
    assert clients[0]["downlink_bytes"] < clients[2]["downlink_bytes"]
    from fedtune.models.loading import load_model

    base, _ = load_model(cfg.model, torch.device("cpu"))
    peft = PeftModel.from_pretrained(base, tmp_path / name / "adapter")
    saved = load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
    assert all(t.shape[0] == 8 for k, t in saved.items() if "lora_A" in k)
    assert peft.peft_config["default"].r == 8


def test_profile_ranks_follow_the_device_profiles_and_bad_ranks_are_refused(tiny_config):
    from fedtune.federated.ranks import client_ranks

    cfg = tiny_config("devices.profiles=['phone', 'laptop', 'workstation']",
                      "lora.profile_ranks={phone=2, laptop=4}")
    assert client_ranks(cfg) == [2, 4, 8]
    with pytest.raises(ConfigError, match="outside 1..8"):
        tiny_config("lora.ranks=[2, 16, 8]")
    with pytest.raises(ConfigError, match="lora.ranks has 2 entries"):
        tiny_config("lora.ranks=[2, 4]")
    with pytest.raises(ConfigError, match="unknown device toaster"):
        tiny_config("devices.profiles=['phone']", "lora.profile_ranks={toaster=2}")
    with pytest.raises(ConfigError, match="do not apply to them"):
        tiny_config("lora.ranks=[2, 4, 8]", "federation.strategy='fedadam'")
    with pytest.raises(ConfigError, match="valid choices: flexlora, flora, hetlora, zero_pad"):
        tiny_config("lora.rank_aggregation='mean'")
    # A simulated network that does not prune by choice (rho_max defaults > 0 under every planner) is no pruning.
    tiny_config("lora.ranks=[2, 4, 8]", "network.planner='equal'")
    with pytest.raises(ConfigError, match="cannot also be pruned"):
        tiny_config("lora.ranks=[2, 4, 8]", "network.planner='jcpba'")
    with pytest.raises(ConfigError, match="cannot also be pruned"):
        tiny_config("lora.ranks=[2, 4, 8]", "pruning.rates=[0.5]")


def test_resume_keeps_the_self_pruned_ranks(tmp_path, tiny_config, monkeypatch):
    from fedtune.paradigms.fedllm import FedLLM

    args = (*FAST, "federation.rounds=3", "lora.ranks=[2, 4, 8]", "lora.rank_aggregation='hetlora'",
            "lora.self_prune_share=0.2")
    full = Runner(tiny_config(*args), tmp_path / "full").run()
    resumed = crash_and_resume(monkeypatch, FedLLM, lambda: Runner(tiny_config(*args), tmp_path / "crashed"))
    assert resumed["final"] == full["final"] and resumed["clients"] == full["clients"]
    assert any(c["lora_rank_final"] < c["lora_rank"] for c in full["clients"])  # someone pruned
