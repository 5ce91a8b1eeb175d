"""FedLLM's server optimizers (FedAvgM, FedAdagrad, FedYogi), exact LoRA aggregation of the products B·A, and each
client's optimizer state kept across rounds: their rules, checkpointed state, runs end to end and exact resume."""

from __future__ import annotations

import pytest
import torch
from conftest import crash_and_resume
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

from fedtune.config import FederationConfig
from fedtune.core.errors import ConfigError
from fedtune.engine.compare import Sweep
from fedtune.engine.runner import Runner
from fedtune.federated.strategies import (
    EXTRA,
    STRATEGIES,
    ClientUpdate,
    GradientCorrection,
    refactorize,
)
from fedtune.models.loading import load_model

A, B = "layers.0.q_proj.lora_A.weight", "layers.0.q_proj.lora_B.weight"
RANK, OUT, IN = 2, 6, 5


def _updates(shared_a: bool = False, seed: int = 0) -> list[ClientUpdate]:
    """Three clients' adapters of one LoRA module (rank 2) plus a plain tensor, weights 10 / 30 / 60."""
    g = torch.Generator().manual_seed(seed)
    a0 = torch.randn(RANK, IN, generator=g)
    out = []
    for c, n in enumerate([10, 30, 60]):
        a = a0 if shared_a else torch.randn(RANK, IN, generator=g)
        out.append(ClientUpdate(c, n, {A: a, B: torch.randn(OUT, RANK, generator=g), "bias": torch.randn(3, generator=g)},
                                1.0))
    return out


def _product(state):
    return state[B].double() @ state[A].double()


def _mean_product(updates):
    total = sum(u.num_samples for u in updates)
    return sum(_product(u.tensors) * (u.num_samples / total) for u in updates)


def _aggregate(name: str, glob, updates, **cfg):
    return STRATEGIES.get(name)(FederationConfig(strategy=name, **cfg)).aggregate(glob, updates)


def _zero_global(updates):
    return {k: torch.zeros_like(v) for k, v in updates[0].tensors.items()}


def test_product_aggregation_is_the_weighted_mean_of_the_clients_updates_when_it_fits_the_rank():
    updates = _updates(shared_a=True)  # sum of B_k A with one A: rank <= 2 = the global rank
    out = _aggregate("fedavg", _zero_global(updates), updates, lora_aggregation="product")
    assert out[A].shape == (RANK, IN) and out[B].shape == (OUT, RANK)
    torch.testing.assert_close(_product(out), _mean_product(updates), rtol=1e-5, atol=1e-6)
    factors = _aggregate("fedavg", _zero_global(updates), updates)
    torch.testing.assert_close(out["bias"], factors["bias"])  # tensors that are not LoRA pairs: averaged as they are


def test_product_aggregation_is_the_best_rank_r_approximation_and_factor_averaging_is_not_the_mean():
    updates = _updates()  # independent A_k: the mean product has rank up to 6 > 2
    mean = _mean_product(updates)
    exact = _aggregate("fedavg", _zero_global(updates), updates, lora_aggregation="product")
    factors = _aggregate("fedavg", _zero_global(updates), updates)
    u, s, vh = torch.linalg.svd(mean)
    best = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]
    torch.testing.assert_close(_product(exact), best, rtol=1e-5, atol=1e-6)
    error = lambda state: float(torch.linalg.norm(_product(state) - mean))  # noqa: E731
    assert error(exact) == pytest.approx(float(s[RANK:].square().sum().sqrt()), rel=1e-5)  # Eckart–Young
    assert error(factors) > 1.5 * error(exact)


def test_refactorize_pads_a_product_smaller_than_the_rank():
    b, a = refactorize(torch.ones(3, 2), 4)
    assert b.shape == (3, 4) and a.shape == (4, 2)
    torch.testing.assert_close(b @ a, torch.ones(3, 2, dtype=torch.float64))


@pytest.mark.parametrize("space", ["factors", "product"])
def test_fedavgm_without_momentum_at_lr_1_is_fedavg(space):
    updates = _updates(shared_a=True)
    glob = {k: v * 0.5 for k, v in updates[0].tensors.items()}
    avg = _aggregate("fedavg", glob, updates, lora_aggregation=space)
    avgm = _aggregate("fedavgm", glob, updates, lora_aggregation=space, server_momentum=0.0)
    for key in avg:
        torch.testing.assert_close(avgm[key], avg[key], rtol=1e-5, atol=1e-6)


def test_fedavgm_accumulates_momentum_across_rounds():
    first, second = _updates(seed=1), _updates(seed=2)
    strategy = STRATEGIES.get("fedavgm")(FederationConfig(strategy="fedavgm", server_momentum=0.5, server_lr=0.1))
    g0 = _zero_global(first)
    g1 = strategy.aggregate(g0, first)
    g2 = strategy.aggregate(g1, second)
    mean1, mean2 = _aggregate("fedavg", {}, first), _aggregate("fedavg", {}, second)
    d1 = mean1["bias"] - g0["bias"]
    d2 = mean2["bias"] - g1["bias"]
    torch.testing.assert_close(g1["bias"], 0.1 * d1)
    torch.testing.assert_close(g2["bias"], g1["bias"] + 0.1 * (0.5 * d1 + d2))


@pytest.mark.parametrize("name, rule", [
    ("fedadagrad", lambda v, sq, b2: v + sq),
    ("fedadam", lambda v, sq, b2: b2 * v + (1 - b2) * sq),
    ("fedyogi", lambda v, sq, b2: v - (1 - b2) * sq * torch.sign(v - sq)),
])
def test_adaptive_server_optimizers_follow_their_second_moment_rule(name, rule):
    first, second = _updates(seed=1), _updates(seed=2)
    cfg = FederationConfig(strategy=name, server_lr=0.1, server_betas=(0.0, 0.9), server_eps=1e-3)
    strategy = STRATEGIES.get(name)(cfg)
    g1 = strategy.aggregate(_zero_global(first), first)
    v1 = strategy.state["v"]["bias"].clone()
    g2 = strategy.aggregate(g1, second)
    d2 = _aggregate("fedavg", {}, second)["bias"] - g1["bias"]
    v2 = rule(v1, d2**2, 0.9)
    torch.testing.assert_close(strategy.state["v"]["bias"], v2)
    torch.testing.assert_close(g2["bias"], g1["bias"] + 0.1 * d2 / (v2.sqrt() + 1e-3))  # beta1 0: m = delta


@pytest.mark.parametrize("name", ["fedavgm", "fedyogi"])
def test_server_state_round_trips_through_its_state_dict(name):
    rounds = [_updates(seed=s) for s in (1, 2, 3)]
    cfg = FederationConfig(strategy=name, lora_aggregation="product")
    straight = STRATEGIES.get(name)(cfg)
    g = _zero_global(rounds[0])
    for updates in rounds:
        g = straight.aggregate(g, updates)
    again = STRATEGIES.get(name)(cfg)
    h = again.aggregate(_zero_global(rounds[0]), rounds[0])
    restored = STRATEGIES.get(name)(cfg)
    restored.load_state_dict(again.state_dict())
    for updates in rounds[1:]:
        h = restored.aggregate(h, updates)
    for key in g:
        torch.testing.assert_close(h[key], g[key], rtol=0, atol=0)


def test_scaffold_corrects_each_gradient_by_c_minus_ci_and_keeps_the_mean_raw_gradient():
    p = torch.nn.Parameter(torch.zeros(3))
    server, own = {"w": torch.tensor([1.0, 0.0, 2.0])}, {"w": torch.tensor([0.5, 0.5, 0.5])}
    side = GradientCorrection({"w": p}, server, own)
    for raw in (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])):
        p.grad = raw.clone()
        side.before_step()
        torch.testing.assert_close(p.grad, raw + server["w"] - own["w"])
    change, new = side.finish()
    torch.testing.assert_close(new["w"], torch.tensor([2.0, 2.0, 2.0]))
    torch.testing.assert_close(change[EXTRA + "w"], new["w"] - own["w"])


def test_scaffold_averages_the_adapters_and_adds_the_clients_control_changes_over_all_clients():
    updates = _updates()
    cfg = FederationConfig(strategy="scaffold", num_clients=5)
    strategy = STRATEGIES.get("scaffold")(cfg)
    glob = _zero_global(updates)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in strategy.download_extra(glob).values())
    changes = [{EXTRA + k: torch.full_like(v, float(c + 1)) for k, v in u.tensors.items()} for c, u in enumerate(updates)]
    with_control = [ClientUpdate(u.client, u.num_samples, {**u.tensors, **ch}, 1.0) for u, ch in zip(updates, changes)]
    out = strategy.aggregate(glob, with_control)
    mean = _aggregate("fedavg", glob, updates)
    for key in mean:
        torch.testing.assert_close(out[key], mean[key])
    torch.testing.assert_close(strategy.download_extra(glob)[EXTRA + "bias"], torch.full((3,), (1 + 2 + 3) / 5))


def test_an_unknown_aggregation_space_lists_the_choices(tiny_config):
    with pytest.raises(ConfigError, match="factors, product"):
        tiny_config("federation.lora_aggregation='svd'")


def test_settings_other_paradigms_ignore_are_refused_and_pruning_needs_factors(tiny_config):
    with pytest.raises(ConfigError, match="train.keep_optimizer_state applies to paradigm 'fedllm'"):
        tiny_config("paradigm='kd'", "train.keep_optimizer_state=true")
    with pytest.raises(ConfigError, match="lora_aggregation = 'product' needs each client's whole update"):
        tiny_config("federation.lora_aggregation='product'", "pruning.rates=[0.3]")
    with pytest.raises(ConfigError, match="strategy = 'scaffold' needs each client's whole update"):
        tiny_config("federation.strategy='scaffold'", "network.planner='jcpba'")
    # A planner that does not prune by choice leaves the whole updates to the server (memory permitting).
    assert tiny_config("federation.strategy='scaffold'", "network.planner='equal'").network.planner == "equal"


def test_a_strategy_sweep_reruns_fedllm_only():
    sweep = Sweep.parse("federation.strategy=fedavg,fedyogi")
    assert sweep.affects("fedllm") and not sweep.affects("kd") and not sweep.affects("split")
    assert Sweep.parse("train.lr=1e-3,1e-2").affects("kd")


FAST = ("federation.rounds=3", "train.local_steps=3", "eval.max_new_tokens=4", "data.max_train_samples=96",
        "partition.min_samples=4")


def _run(tmp_path, tiny_config, name, *overrides):
    return Runner(tiny_config(*FAST, *overrides), tmp_path / name).run()


@pytest.mark.parametrize("args", [
    ("federation.lora_aggregation='product'", "federation.strategy='fedavgm'", "federation.server_momentum=0.5"),
    ("federation.strategy='fedyogi'",),
    ("train.keep_optimizer_state=true",),
    ("federation.strategy='scaffold'",),
], ids=["product-fedavgm", "fedyogi", "kept-optimizer", "scaffold"])
def test_runs_learn_load_with_peft_and_differ_from_fedavg(tmp_path, tiny_config, args):
    base = _run(tmp_path, tiny_config, "fedavg")
    summary = _run(tmp_path, tiny_config, "run", *args)
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]
    assert summary["final"]["eval_loss"] != base["final"]["eval_loss"]
    ratio = summary["comm"]["uplink_bytes"] / base["comm"]["uplink_bytes"]
    assert ratio == pytest.approx(2.0 if "scaffold" in args[0] else 1.0, rel=0.01)  # SCAFFOLD: c_i's change too
    cfg = tiny_config(*FAST, *args)
    base_model, _ = load_model(cfg.model, torch.device("cpu"))
    peft = PeftModel.from_pretrained(base_model, tmp_path / "run" / "adapter")  # PEFT's own loader
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(peft)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)

@pytest.mark.parametrize("args", [
    ("train.keep_optimizer_state=true", "federation.strategy='fedyogi'", "federation.lora_aggregation='product'"),
    ("federation.strategy='scaffold'",),
], ids=["kept-fedyogi-product", "scaffold"])
def test_resume_keeps_the_clients_optimizer_and_the_server_state(tmp_path, tiny_config, monkeypatch, args):
    from fedtune.paradigms.fedllm import FedLLM

    full = _run(tmp_path, tiny_config, "full", *args)
    resumed = crash_and_resume(monkeypatch, FedLLM, lambda: Runner(tiny_config(*FAST, *args), tmp_path / "crashed"))
    assert resumed["final"] == full["final"] and resumed["comm"] == full["comm"]
