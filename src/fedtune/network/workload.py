"""What the planner plans for: a client's unpruned round (FLOPs, adapter bytes each way) and training memory.

The plan is made before the round, so it works from a nominal workload: every local step a full batch at
``data.max_length`` tokens (an upper bound on the padded batches training really runs), the LoRA adapter
up and down (FedLLM's messages), and a training-memory estimate. When the paradigm prunes its clients, how
compute and adapter bytes shrink with the pruning rate is measured too (:func:`pruning_cuts`). Realised
seconds are computed afterwards from the measured FLOPs and ledger bytes (:mod:`fedtune.network.simtime`).

``fedtune plan`` builds the same numbers without loading weights: the model is instantiated on PyTorch's
``meta`` device from its configuration, so only shapes exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from fedtune.errors import FedtuneError
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


def round_workload(cfg, model: torch.nn.Module, cost: ModelCost, client_sizes: list[int] | None,
                   prunes: bool = False) -> Workload:
    """The nominal unpruned round of every client (``client_sizes`` matter only with ``train.local_epochs``);
    with ``prunes`` (the paradigm prunes its clients' models) and ``network.rho_max`` > 0, the measured
    :func:`pruning_cuts` too (on ``model`` if it is a meta skeleton, else on one built from the config)."""
    n = cfg.federation.num_clients
    if cfg.train.local_epochs is not None and client_sizes is None:
        raise FedtuneError("train.local_epochs needs the clients' sample counts to plan a round")
    sizes = client_sizes or [0] * n
    seq = cfg.data.max_length
    per_step = train_flops(cost, tokens=cfg.train.batch_size * seq, seq_len=seq)
    flops = np.array([local_steps(cfg, sizes[k]) * per_step for k in range(n)], float)
    payload = adapter_bytes(model)
    cuts = (1.0, 1.0)
    if prunes and cfg.network.rho_max > 0:
        weightless = all(p.device.type == "meta" for p in model.parameters())
        cuts = pruning_cuts(cfg, model if weightless else model_skeleton(cfg))
    return Workload(flops, payload, payload, training_memory_bytes(model, cfg), *cuts)


# ---------------------------------------------------------------------------------------------
# A weightless model for `fedtune plan`


def _hf_config(model_cfg):
    from transformers import AutoConfig

    from fedtune.models import loading

    if model_cfg.source == "tiny":  # token ids do not change any shape
        return loading._tiny_config(model_cfg, SimpleNamespace(eos_token_id=0, pad_token_id=0))
    if model_cfg.source == "smollm2":
        target = loading.cache_dir(model_cfg) / loading.SMOLLM2_DIR
        if not (target / "config.json").is_file():  # first use: convert (and cache) the bundled model
            model, _ = loading.MODEL_SOURCES.get("smollm2")(model_cfg)
            return model.config
        return AutoConfig.from_pretrained(target)
    try:
        return AutoConfig.from_pretrained(model_cfg.path)
    except (OSError, ValueError) as exc:
        raise FedtuneError(f"cannot read the configuration of model.path = {model_cfg.path!r}: {exc}") from None


def model_skeleton(cfg) -> torch.nn.Module:
    """The run's model with its LoRA adapters on the ``meta`` device: shapes and dtypes, no weights."""
    from transformers import AutoModelForCausalLM

    from fedtune.models.lora import attach_lora
    from fedtune.paradigms import PARADIGMS

    config = _hf_config(cfg.model)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config).to(getattr(torch, cfg.model.dtype))
    rank_pattern = PARADIGMS.get(cfg.paradigm).lora_rank_pattern(cfg, base)
    return attach_lora(base, cfg.lora, seed=cfg.seed, rank_pattern=rank_pattern)


def _tokenizer(model_cfg):
    from transformers import AutoTokenizer

    from fedtune.models import loading
    from fedtune.models.tokenizer import tiny_tokenizer

    if model_cfg.source == "tiny":
        return tiny_tokenizer(model_cfg.tiny.vocab_size, loading.cache_dir(model_cfg))
    if model_cfg.source == "smollm2":
        target = loading.cache_dir(model_cfg) / loading.SMOLLM2_DIR
        if not (target / "tokenizer.json").is_file():
            return loading.MODEL_SOURCES.get("smollm2")(model_cfg)[1]
        return AutoTokenizer.from_pretrained(target)
    return AutoTokenizer.from_pretrained(model_cfg.path)


def client_sample_counts(cfg) -> list[int]:
    """Training samples per client, partitioned exactly as a run partitions them (data loaded, no model)."""
    from fedtune.data.formatting import tokenize_examples
    from fedtune.data.partition import partition_indices
    from fedtune.data.sources import load_splits

    splits = load_splits(cfg.data, cfg.seed)
    train = tokenize_examples(splits.train, _tokenizer(cfg.model), cfg.data.max_length, cfg.data.chat_template)
    parts = partition_indices(train, cfg.partition, cfg.federation.num_clients, cfg.seed, splits.label_column)
    return [len(p) for p in parts]
