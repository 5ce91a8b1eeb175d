"""Server aggregation strategies, looked up by name (``[federation] strategy``).

A strategy turns the current global adapter and the clients' returned adapters into the next global adapter.
``fedavg`` is the sample-weighted mean (McMahan et al. 2017); ``fedprox`` adds a proximal term to the client loss
(Li et al. 2020). The server optimizers treat the mean client change as a pseudo-gradient: ``fedavgm`` takes a
momentum step (Hsu et al. 2019), ``fedadagrad``, ``fedadam`` and ``fedyogi`` adaptive steps (FedOpt, Reddi et al.
2021).

Where the mean is taken is ``federation.lora_aggregation`` (:data:`AGGREGATION_SPACES`): ``factors`` averages the
LoRA A and B matrices separately, as a FedAvg of PEFT adapters does, which is not the mean of the clients' updates
B·A; ``product`` averages each module's B·A and re-factorises the result to the global rank by truncated SVD, so
the only error left is that truncation (none when the mean's rank is at most the global rank).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from fedtune.config import FederationConfig
from fedtune.core.registry import Registry

STRATEGIES: Registry[type["Strategy"]] = Registry("strategy")
AGGREGATION_SPACES: Registry[type["FactorSpace"]] = Registry("LoRA aggregation")

TensorDict = dict[str, torch.Tensor]

#: Prefix of a message's tensors that belong to the strategy, not to the adapter (SCAFFOLD's control variates).
EXTRA = "strategy."


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


# ---------------------------------------------------------------------------------------------
# Where the mean is taken


@AGGREGATION_SPACES.register("factors")
class FactorSpace:
    """The adapter tensors as they are: A and B averaged separately."""

    def encode(self, state: TensorDict) -> TensorDict:
        return state

    def decode(self, tensors: TensorDict, like: TensorDict) -> TensorDict:
        return tensors


def lora_pairs(state: TensorDict) -> dict[str, tuple[str, str]]:
    """module prefix -> (its lora_A key, its lora_B key), for every LoRA module of an adapter state."""
    pairs = {}
    for key in state:
        if ".lora_A." in key:
            prefix, _, rest = key.partition(".lora_A.")
            b = f"{prefix}.lora_B.{rest}"
            if b in state:
                pairs[prefix] = (key, b)
    return pairs


def refactorize(product: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of ``rank`` with B·A the best rank-``rank`` approximation of ``product`` (Eckart–Young): the leading
    singular triplets, each singular value split evenly between the two factors."""
    u, s, vh = torch.linalg.svd(product.to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    b, a = u[:, :rank] * root, root[:, None] * vh[:rank]
    if rank > s.numel():  # a product smaller than the rank: the missing directions are zero
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - s.numel())], dim=1)
        a = torch.cat([a, a.new_zeros(rank - s.numel(), a.shape[1])], dim=0)
    return b, a


@AGGREGATION_SPACES.register("product")
class ProductSpace(FactorSpace):
    """Each LoRA module as its update B·A (out x in, float64); other tensors as they are."""

    PRODUCT = ".lora_product"

    def encode(self, state: TensorDict) -> TensorDict:
        pairs = lora_pairs(state)
        paired = {k for ab in pairs.values() for k in ab}
        out = {k: v for k, v in state.items() if k not in paired}
        for prefix, (a, b) in pairs.items():
            out[prefix + self.PRODUCT] = state[b].to(torch.float64) @ state[a].to(torch.float64)
        return out

    def decode(self, tensors: TensorDict, like: TensorDict) -> TensorDict:
        out = {k: v for k, v in tensors.items() if not k.endswith(self.PRODUCT)}
        for prefix, (a, b) in lora_pairs(like).items():
            new_b, new_a = refactorize(tensors[prefix + self.PRODUCT], like[a].shape[0])
            out[a], out[b] = new_a.to(like[a].dtype), new_b.to(like[b].dtype)
        return {k: out[k] for k in like}


# ---------------------------------------------------------------------------------------------
# Strategies


class Strategy:
    """Base strategy: the sample-weighted mean (in the run's aggregation space), no client regulariser, no server
    state."""

    #: Whether it needs every client's whole update (not a pruned client's, nor only a secure sum of them).
    needs_whole_updates: ClassVar[bool] = False

    def __init__(self, cfg: FederationConfig) -> None:
        self.cfg = cfg
        self.space = AGGREGATION_SPACES.get(cfg.lora_aggregation)()

    def aggregate(self, global_state: TensorDict, updates: list[ClientUpdate]) -> TensorDict:
        if not updates:
            raise ValueError("cannot aggregate zero updates")
        like = global_state or updates[0].tensors
        mean = self._mean(updates)
        return self.space.decode(self.server_step(self.space.encode(global_state), mean), like)

    def _mean(self, updates: list[ClientUpdate]) -> TensorDict:
        """The weighted mean of the encoded updates, encoding one update at a time (a product is out x in)."""
        total = float(sum(u.num_samples for u in updates))
        acc: TensorDict = {}
        dtypes: dict[str, torch.dtype] = {}
        for u in updates:
            for key, tensor in self.space.encode(u.tensors).items():
                if key not in acc:
                    acc[key], dtypes[key] = torch.zeros_like(tensor, dtype=torch.float64), tensor.dtype
                acc[key] += tensor.to(torch.float64) * (u.num_samples / total)
        return {key: value.to(dtypes[key]) for key, value in acc.items()}

    def server_step(self, current: TensorDict, mean: TensorDict) -> TensorDict:
        """The next global (encoded) from the current one and the clients' mean: FedAvg takes the mean."""
        return mean

    def regularizer(self, params: list[torch.Tensor], anchors: list[torch.Tensor]) -> torch.Tensor | None:
        """Extra client loss term given trainable ``params`` and the global values ``anchors``."""
        return None

    def download_extra(self, global_state: TensorDict) -> TensorDict:
        """Tensors sent to every client besides the global adapter, keys starting with :data:`EXTRA`."""
        return {}

    def client_side(self, extra: TensorDict, own: TensorDict | None,
                    params: dict[str, torch.nn.Parameter]) -> "GradientCorrection | None":
        """The client's part of the strategy for one turn, from what the server sent besides the adapter (``extra``)
        and the client's own state from its last turn (``own``, None at first); None: nothing to do."""
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


class ServerOptimizer(Strategy):
    """A server step on the pseudo-gradient ``delta = mean(client) - global``, per tensor, with its state (moments)
    kept across rounds and checkpointed."""

    #: server_lr when ``federation.server_lr`` is unset.
    default_lr: ClassVar[float] = 1e-2
    #: Names of the per-tensor state this optimizer keeps.
    moments: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: FederationConfig) -> None:
        super().__init__(cfg)
        self.lr = cfg.server_lr if cfg.server_lr is not None else self.default_lr
        self.state: dict[str, TensorDict] = {name: {} for name in self.moments}

    def server_step(self, current, mean):
        out = {}
        for key, g in current.items():
            delta = mean[key].float() - g.float()
            previous = {name: self.state[name].get(key, torch.zeros_like(delta)) for name in self.moments}
            step, new = self.step(delta, **previous)
            for name, value in new.items():
                self.state[name][key] = value
            out[key] = (g.float() + self.lr * step).to(g.dtype)
        return out

    def step(self, delta: torch.Tensor, **moments: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the step to scale by the server lr, the new moments) for one tensor."""
        raise NotImplementedError

    def state_dict(self):
        return {name: dict(values) for name, values in self.state.items()}

    def load_state_dict(self, state):
        self.state = {name: dict(state.get(name, {})) for name in self.moments}


@STRATEGIES.register("fedavgm")
class FedAvgM(ServerOptimizer):
    """Server momentum: ``m = beta * m + delta``, ``global += server_lr * m`` (server_lr 1, momentum 0 = FedAvg)."""

    default_lr = 1.0
    moments = ("m",)

    def step(self, delta, m):
        m = self.cfg.server_momentum * m + delta
        return m, {"m": m}


class AdaptiveServerOptimizer(ServerOptimizer):
    """FedOpt's adaptive steps: first moment ``m``, second moment ``v`` by :meth:`second_moment`, step
    ``m / (sqrt(v) + tau)`` (tau = ``server_eps``)."""

    moments = ("m", "v")

    def step(self, delta, m, v):
        b1, _ = self.cfg.server_betas
        m = m * b1 + (1 - b1) * delta
        v = self.second_moment(delta, v)
        return m / (v.sqrt() + self.cfg.server_eps), {"m": m, "v": v}

    def second_moment(self, delta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@STRATEGIES.register("fedadagrad")
class FedAdagrad(AdaptiveServerOptimizer):
    """``v += delta^2``."""

    def second_moment(self, delta, v):
        return v + delta**2


@STRATEGIES.register("fedadam")
class FedAdam(AdaptiveServerOptimizer):
    """``v = beta2 * v + (1 - beta2) * delta^2``."""

    def second_moment(self, delta, v):
        _, b2 = self.cfg.server_betas
        return v * b2 + (1 - b2) * delta**2


@STRATEGIES.register("fedyogi")
class FedYogi(AdaptiveServerOptimizer):
    """``v -= (1 - beta2) * delta^2 * sign(v - delta^2)``: v grows no faster than additively (Zaheer et al. 2018)."""

    def second_moment(self, delta, v):
        _, b2 = self.cfg.server_betas
        sq = delta**2
        return v - (1 - b2) * sq * torch.sign(v - sq)


class GradientCorrection:
    """SCAFFOLD's client side for one turn: each step's gradient gets ``c - c_i`` added (the server's control variate
    less the client's own), and the raw gradients seen are averaged into the client's next ``c_i``."""

    def __init__(self, params: dict[str, torch.nn.Parameter], server: TensorDict, own: TensorDict) -> None:
        self.params, self.own = params, own
        self.shift = {k: (server[k] - own[k]).to(p.device, p.dtype) for k, p in params.items()}
        self.total = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
        self.steps = 0

    def before_step(self) -> None:
        for key, p in self.params.items():
            if p.grad is not None:
                self.total[key] += p.grad.detach().float()
                p.grad += self.shift[key]
        self.steps += 1

    def finish(self) -> tuple[TensorDict, TensorDict]:
        """(what the client uploads besides its adapter: its change of ``c_i``, its new ``c_i``)."""
        new = {k: (v / max(self.steps, 1)).cpu() for k, v in self.total.items()}
        return {EXTRA + k: new[k] - self.own[k] for k in new}, new


@STRATEGIES.register("scaffold")
class Scaffold(Strategy):
    """SCAFFOLD (Karimireddy et al. 2020) on the LoRA weights: control variates ``c`` (server) and ``c_i`` (each
    client's own) correct every local gradient by ``c - c_i``, against client drift under non-IID data. ``c_i`` is
    the mean raw gradient of the client's last turn (the gradient form of the paper's option I, which also holds with
    AdamW clients); the server adds ``(1/N) * sum of the changes of c_i`` to ``c``. The adapters are averaged as with
    FedAvg. Costs one more adapter-sized tensor set each way."""

    needs_whole_updates = True

    def __init__(self, cfg: FederationConfig) -> None:
        super().__init__(cfg)
        self.control: TensorDict = {}

    def download_extra(self, global_state):
        return {EXTRA + k: self.control.get(k, torch.zeros_like(v, dtype=torch.float32))
                for k, v in global_state.items()}

    def client_side(self, extra, own, params):
        server = {k[len(EXTRA):]: v for k, v in extra.items()}
        own = own if own is not None else {k: torch.zeros_like(v) for k, v in server.items()}
        return GradientCorrection(params, server, own)

    def aggregate(self, global_state, updates):
        plain = [replace(u, tensors={k: v for k, v in u.tensors.items() if not k.startswith(EXTRA)}) for u in updates]
        new = super().aggregate(global_state, plain)
        for u in updates:
            for key, change in u.tensors.items():
                if key.startswith(EXTRA):
                    name = key[len(EXTRA):]
                    base = self.control.get(name, torch.zeros_like(change, dtype=torch.float32))
                    self.control[name] = base + change.float() / self.cfg.num_clients
        return new

    def state_dict(self):
        return {"control": dict(self.control)}

    def load_state_dict(self, state):
        self.control = dict(state.get("control", {}))


def needs_whole_updates(fed: FederationConfig) -> str:
    """What in ``[federation]`` needs every client's whole update (the settings, joined by 'and'), or ''."""
    needs = [f"federation.lora_aggregation = {fed.lora_aggregation!r}"] if fed.lora_aggregation != "factors" else []
    if STRATEGIES.get(fed.strategy).needs_whole_updates:
        needs.append(f"federation.strategy = {fed.strategy!r}")
    return " and ".join(needs)
