"""Aggregation strategies: FedAvg equals the sample-weighted mean; FedAdam and FedProx behave."""

from __future__ import annotations

import pytest
import torch

from fedtune.config import FederationConfig
from fedtune.core.errors import ConfigError
from fedtune.federated.strategies import STRATEGIES, ClientUpdate


def _updates():
    g = torch.Generator().manual_seed(0)
    return [ClientUpdate(c, n, {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}, 1.0)
            for c, n in enumerate([10, 30, 60])]


def test_fedavg_equals_weighted_mean():
    updates = _updates()
    out = STRATEGIES.get("fedavg")(FederationConfig()).aggregate({}, updates)
    for key in ("a", "b"):
        expected = (10 * updates[0].tensors[key] + 30 * updates[1].tensors[key] + 60 * updates[2].tensors[key]) / 100
        torch.testing.assert_close(out[key], expected, rtol=1e-6, atol=1e-7)


def test_fedavg_of_identical_updates_is_that_update():
    u = _updates()[0]
    out = STRATEGIES.get("fedavg")(FederationConfig()).aggregate({}, [u, ClientUpdate(1, 99, u.tensors, 0.0)])
    torch.testing.assert_close(out["a"], u.tensors["a"])


def test_fedadam_moves_global_towards_mean_with_server_lr():
    updates = _updates()
    cfg = FederationConfig(strategy="fedadam", server_lr=0.1, server_betas=(0.0, 0.0), server_eps=1e-12)
    glob = {k: torch.zeros_like(v) for k, v in updates[0].tensors.items()}
    out = STRATEGIES.get("fedadam")(cfg).aggregate(glob, updates)
    mean = STRATEGIES.get("fedavg")(cfg).aggregate(glob, updates)
    # with beta1 = beta2 = 0 the step is server_lr * sign(mean - global)
    torch.testing.assert_close(out["a"], 0.1 * torch.sign(mean["a"]))


def test_fedprox_regularizer_is_half_mu_squared_distance():
    cfg = FederationConfig(strategy="fedprox", proximal_mu=0.5)
    strategy = STRATEGIES.get("fedprox")(cfg)
    p, a = [torch.tensor([1.0, 2.0])], [torch.tensor([0.0, 0.0])]
    assert float(strategy.regularizer(p, a)) == pytest.approx(0.5 * 0.5 * 5.0)
    assert STRATEGIES.get("fedavg")(cfg).regularizer(p, a) is None


def test_unknown_strategy_lists_choices():
    with pytest.raises(ConfigError, match="fedadagrad, fedadam, fedavg, fedavgm, fedprox, fedyogi, scaffold"):
        STRATEGIES.get("fednova")
