"""What the planner plans for: a client's unpruned round (FLOPs, adapter bytes each way) and training memory.

The plan is made before the round, so it works from a nominal workload: every local step a full batch at
``data.max_length`` tokens (an upper bound on the padded batches training really runs), the LoRA adapter
up and down (FedLLM's messages), and a training-memory estimate. When the paradigm prunes its clients, how
compute and adapter bytes shrink with the pruning rate is measured too (:func:`pruning_cuts`). Realised
seconds are computed afterwards from the measured FLOPs and ledger bytes (:mod:`fedtune.network.simtime`).

``fedtune plan`` builds the same numbers without loading weights: its context's model is instantiated on PyTorch's
``meta`` device from its configuration, so only shapes exist (:func:`fedtune.engine.context.build_context`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedtune.federated.sampling import local_steps
from fedtune.models.flops import ModelCost, train_flops

#: Bytes saved for backward per token, layer and hidden unit in 16-bit activations (Korthikanti et al. 2022,
#: "Reducing Activation Recomputation in Large Transformer Models": 34 s b h per layer, flash attention).
ACTIVATION_BYTES_PER_UNIT_16BIT = 34


@dataclass(frozen=True)
class Workload:
    """One client's unpruned round: FLOPs per client id, adapter bytes up and down, training memory."""

    flops: np.ndarray  # indexed by client id
    up_bytes: int
    down_bytes: int
    memory_bytes: int
    compute_cut: float = 1.0  # a client pruned at rate rho keeps 1 - compute_cut * rho of its FLOPs
    bytes_cut: float = 1.0  # ... and 1 - bytes_cut * rho of its adapter bytes


#: Rates, as fractions of ``network.rho_max``, at which :func:`pruning_cuts` measures pruned models.
CUT_GRID = (0.25, 0.5, 0.75, 1.0)


def training_memory_bytes(model: torch.nn.Module, cfg) -> int:
    """Weights + LoRA gradients and AdamW moments + activations saved for backward (34 s b h per layer, 16-bit)."""
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    elem = params[0].element_size() if params else 4
    config = model.config
    layers, hidden = config.num_hidden_layers, config.hidden_size
    activations = (ACTIVATION_BYTES_PER_UNIT_16BIT * cfg.train.batch_size * cfg.data.max_length * hidden * layers
                   * elem // 2)
    return int(weights + 3 * trainable + activations)


def adapter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the trainable (LoRA) tensors: the payload of an adapter message (its small header aside)."""
    return int(sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad))


def pruning_cuts(cfg, skeleton: torch.nn.Module) -> tuple[float, float]:
    """(compute_cut, bytes_cut): the slopes of the kept training FLOPs and adapter bytes against the pruning rate,
    measured on pruned copies of the run's model (``skeleton``, on the ``meta`` device: kept sizes depend only
    on the rate, not on which units an importance score keeps) at rates ``CUT_GRID x network.rho_max``, and
    fitted through (0, 1) by least squares. With LoRA on every projection, pruning half the MLP channels and KV
    groups of SmolLM2 keeps about 0.64 of the FLOPs and 0.72 of the adapter (MLP channels only: 0.72 and 0.77)."""
    from fedtune.models.flops import model_cost
    from fedtune.models.pruning import attach_like, build_pruned_model, compute_mask, pruned_cost

    seq = cfg.data.max_length
    tokens = cfg.train.batch_size * seq
    full_flops = train_flops(model_cost(skeleton), tokens=tokens, seq_len=seq)
    full_bytes = adapter_bytes(skeleton)
    rates, flops_cut, bytes_cut = [], [], []
    for fraction in CUT_GRID:
        rate = fraction * cfg.network.rho_max
        mask = compute_mask(skeleton, rate, method="random", targets=cfg.pruning.targets, seed=cfg.seed)
        pruned = attach_like(build_pruned_model(skeleton, mask), skeleton)
        rates.append(rate)
        flops_cut.append(1 - train_flops(pruned_cost(pruned, mask), tokens=tokens, seq_len=seq) / full_flops)
        bytes_cut.append(1 - adapter_bytes(pruned) / full_bytes)
    x = np.array(rates)
    return (float(np.clip(x @ np.array(flops_cut) / (x @ x), 0.0, 1.0)),
            float(np.clip(x @ np.array(bytes_cut) / (x @ x), 0.0, 1.0)))


def round_workload(cfg, model: torch.nn.Module, cost: ModelCost, client_sizes: list[int],
                   skeleton: torch.nn.Module | None = None) -> Workload:
    """The nominal unpruned round of every client (``client_sizes`` matter only with ``train.local_epochs``). With a
    ``skeleton`` (the run's model on the meta device; given when the paradigm prunes its clients' models and
    ``network.rho_max`` > 0) the measured :func:`pruning_cuts` too."""
    n = cfg.federation.num_clients
    seq = cfg.data.max_length
    per_step = train_flops(cost, tokens=cfg.train.batch_size * seq, seq_len=seq)
    flops = np.array([local_steps(cfg, client_sizes[k]) * per_step for k in range(n)], float)
    payload = adapter_bytes(model)
    cuts = pruning_cuts(cfg, skeleton) if skeleton is not None else (1.0, 1.0)
    return Workload(flops, payload, payload, training_memory_bytes(model, cfg), *cuts)
