"""Server aggregation strategies, looked up by name (``[federation] strategy``).

A strategy turns the current global adapter and the clients' returned adapters into the next
global adapter. ``fedavg`` is the sample-weighted mean (McMahan et al. 2017); ``fedprox`` adds a
proximal term to the client loss (Li et al. 2020); ``fedadam`` treats the mean client change as a
pseudo-gradient for a server-side Adam step (Reddi et al. 2021).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtune.config import FederationConfig
from fedtune.core.registry import Registry

STRATEGIES: Registry[type["Strategy"]] = Registry("strategy")

TensorDict = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    """What a client returns after local training."""

    client: int
    num_samples: int
    tensors: TensorDict
    train_loss: float


def weighted_average(versions: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """The mean of the tensors weighted by their weights, accumulated in float64, in the first tensor's dtype."""
    total = float(sum(w for _, w in versions))
    acc = torch.zeros_like(versions[0][0], dtype=torch.float64)
    for tensor, weight in versions:
        acc += tensor.to(torch.float64) * (weight / total)
    return acc.to(versions[0][0].dtype)


def weighted_mean(updates: list[ClientUpdate]) -> TensorDict:
    """Per-tensor mean of the updates weighted by ``num_samples`` (accumulated in float64)."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    return {key: weighted_average([(u.tensors[key], u.num_samples) for u in updates]) for key in updates[0].tensors}


class Strategy:
    """Base strategy: FedAvg aggregation, no client regulariser, no server state."""

    def __init__(self, cfg: FederationConfig) -> None:
        self.cfg = cfg

    def aggregate(self, global_state: TensorDict, updates: list[ClientUpdate]) -> TensorDict:
        return weighted_mean(updates)

    def regularizer(self, params: list[torch.Tensor], anchors: list[torch.Tensor]) -> torch.Tensor | None:
        """Extra client loss term given trainable ``params`` and the global values ``anchors``."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@STRATEGIES.register("fedavg")
class FedAvg(Strategy):
    """Sample-weighted average of client adapters."""


@STRATEGIES.register("fedprox")
class FedProx(Strategy):
    """FedAvg aggregation; clients add ``mu/2 * ||w - w_global||^2`` to their loss."""

    def regularizer(self, params, anchors):
        mu = self.cfg.proximal_mu
        if mu == 0:
            return None
        return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))


@STRATEGIES.register("fedadam")
class FedAdam(Strategy):
    """Server Adam on the pseudo-gradient ``mean(client) - global`` (FedOpt, Reddi et al. 2021)."""

    def __init__(self, cfg: FederationConfig) -> None:
        super().__init__(cfg)
        self.m: TensorDict = {}
        self.v: TensorDict = {}

    def aggregate(self, global_state, updates):
        mean = weighted_mean(updates)
        b1, b2 = self.cfg.server_betas
        out = {}
        for key, g in global_state.items():
            delta = mean[key].float() - g.float()
            m = self.m.get(key, torch.zeros_like(delta)) * b1 + (1 - b1) * delta
            v = self.v.get(key, torch.zeros_like(delta)) * b2 + (1 - b2) * delta**2
            self.m[key], self.v[key] = m, v
            out[key] = (g.float() + self.cfg.server_lr * m / (v.sqrt() + self.cfg.server_eps)).to(g.dtype)
        return out

    def state_dict(self):
        return {"m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state):
        self.m, self.v = dict(state.get("m", {})), dict(state.get("v", {}))
