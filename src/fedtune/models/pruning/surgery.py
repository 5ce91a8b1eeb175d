"""Model surgery: the really smaller model a :class:`~fedtune.models.pruning.importance.PruneMask` describes, its
measured cost, and :class:`Pruner`, which caches masks and costs for one run's base model.

The hidden (residual) size, embeddings, norms and LM head are never pruned; their tensors are *shared* with the base
model, not copied, so a pruned client costs only its smaller block weights.

``transformers.pytorch_utils.prune_linear_layer`` exists, but it slices one dimension, allocates a float32
``nn.Linear`` (a bf16 base would silently change dtype), and its Conv1D twin and the models' ``prune_heads`` are gone
in transformers 5; so the few lines that slice a weight are here, for ``nn.Linear`` and ``Conv1D`` alike.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from torch import nn

from fedtune.core.errors import FedtuneError
from fedtune.models.flops import ModelCost, model_cost
from fedtune.models.pruning.importance import (
    CALIBRATED_METHODS,
    FeatureStats,
    ModuleMask,
    PruneMask,
    activation_stats,
    compute_mask,
)
from fedtune.models.pruning.layout import PEFT_PREFIX, base_layer, block_list, plain_model

if TYPE_CHECKING:
    from peft import PeftModel

def _plain_name(name: str) -> str:
    """PEFT parameter/buffer name -> the plain HF name (``base_model.model.`` and ``.base_layer`` removed)."""
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def _sliced_layer(layer: nn.Module, mm: ModuleMask) -> nn.Module:
    """A new ``nn.Linear`` / ``Conv1D`` holding the kept rows and columns of ``layer`` (same dtype and device)."""
    from transformers.pytorch_utils import Conv1D

    conv = isinstance(layer, Conv1D)
    weight = layer.weight.detach()
    out_dim, in_dim = (1, 0) if conv else (0, 1)
    if mm.keep_out is not None:
        weight = weight.index_select(out_dim, mm.keep_out.to(weight.device))
    if mm.keep_in is not None:
        weight = weight.index_select(in_dim, mm.keep_in.to(weight.device))
    bias = layer.bias.detach() if layer.bias is not None else None
    if bias is not None and mm.keep_out is not None:
        bias = bias.index_select(0, mm.keep_out.to(bias.device))
    if mm.bias_shift is not None:
        shift = mm.bias_shift.to(device=weight.device, dtype=weight.dtype)
        bias = shift if bias is None else bias + shift
    n_out, n_in = weight.shape[out_dim], weight.shape[in_dim]
    with torch.device("meta"):
        new = Conv1D(n_out, n_in) if conv else nn.Linear(n_in, n_out, bias=bias is not None)
    new.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return new


def build_pruned_model(model: nn.Module, mask: PruneMask) -> nn.Module:
    """A plain HF model (no LoRA) that is ``model`` pruned by ``mask``: a real, smaller model.

    ``model`` may be PEFT-wrapped (its frozen base weights are used, LoRA ignored). The skeleton is built on the meta
    device (no allocation); unpruned parameters and buffers are the base model's own tensors (shared, frozen) and
    pruned modules get new, sliced weights. The config is a copy with the kept sizes where it can express them
    (``intermediate_size`` / ``n_inner``; for Llama-style ``num_attention_heads``, ``num_key_value_heads`` and an
    explicit ``head_dim``); a GPT-2 attention module gets its kept head count on ``num_heads`` / ``split_size``.
    A model on the ``meta`` device (shapes only) gives a pruned model on it, for measuring sizes and FLOPs.
    """
    plain = plain_model(model)
    tensors = {_plain_name(n): p for n, p in plain.named_parameters(remove_duplicate=False) if ".lora_" not in n}
    buffers = {_plain_name(n): b for n, b in plain.named_buffers(remove_duplicate=False) if ".lora_" not in n}
    config = copy.deepcopy(plain.config)
    with torch.device("meta"):
        pruned = type(plain)(config)
    pruned.generation_config = copy.deepcopy(plain.generation_config)
    for name, _ in list(pruned.named_parameters(remove_duplicate=False)):
        owner, attr = name.rsplit(".", 1)
        if owner in mask.modules:
            continue
        if name not in tensors:
            raise FedtuneError(f"pruning: base model has no parameter {name}")
        pruned.get_submodule(owner)._parameters[attr] = tensors[name]
    for name, _ in list(pruned.named_buffers(remove_duplicate=False)):
        owner, attr = name.rsplit(".", 1)
        if name not in buffers:
            raise FedtuneError(f"pruning: base model has no buffer {name}")
        pruned.get_submodule(owner)._buffers[attr] = buffers[name]
    for name in sorted(mask.modules):
        parent, child = name.rsplit(".", 1)
        source = base_layer(plain.get_submodule(name))
        setattr(pruned.get_submodule(parent), child, _sliced_layer(source, mask.modules[name]))
    _, blocks = block_list(pruned)
    for block, bm in zip(blocks, mask.blocks, strict=True):
        attn = getattr(block, "attn", None)
        if bm.heads is not None and attn is not None and hasattr(attn, "split_size"):  # GPT-2
            attn.num_heads = bm.kept_heads
            attn.split_size = bm.kept_heads * bm.head_dim
    _update_config(pruned.config, mask)
    weightless = all(p.device.type == "meta" for p in plain.parameters())  # a shapes-only skeleton stays so
    leftover = [n for n, p in pruned.named_parameters() if p.device.type == "meta"]
    if leftover and not weightless:
        raise FedtuneError(f"pruning: parameters left unassigned: {', '.join(leftover[:3])}")
    return pruned.eval()


def _update_config(config, mask: PruneMask) -> None:
    sizes = {(b.kept_intermediate, b.kept_heads, b.kept_kv_heads, b.head_dim) for b in mask.blocks}
    if len(sizes) != 1:
        return  # blocks differ: the per-block sizes live in the mask
    inter, heads, kv, head_dim = sizes.pop()
    if hasattr(config, "intermediate_size"):
        config.intermediate_size = inter
    if getattr(config, "model_type", "") == "gpt2":
        config.n_inner = inter  # heads: GPT-2 derives head_dim from n_embd / n_head, so n_head stays
        return
    if hasattr(config, "num_key_value_heads"):
        config.head_dim = head_dim
        config.num_attention_heads = heads
        config.num_key_value_heads = kv


def attach_like(pruned: nn.Module, peft_model: "PeftModel") -> "PeftModel":
    """Wrap ``pruned`` with the same LoRA configuration as ``peft_model`` (targets, ranks, fan_in_fan_out).

    The LoRA init is random but irrelevant (the client loads the sliced global adapter); it runs in a forked RNG so the
    global RNG state is untouched.
    """
    import warnings

    from peft import get_peft_model

    cfg = copy.deepcopy(peft_model.peft_config[peft_model.active_adapter])
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(pruned, cfg)


def attention_dims(mask: PruneMask) -> list[int]:
    """Per block, the width of the attention scores/values (kept query heads x head_dim), for the FLOPs estimate."""
    return [b.kept_heads * b.head_dim for b in mask.blocks]


def pruned_cost(pruned: nn.Module, mask: PruneMask) -> ModelCost:
    """The FLOPs cost of the pruned model, measured from its modules, with its narrower attention per block."""
    return replace(model_cost(pruned), attn_dims=attention_dims(mask))


class Pruner:
    """Masks (cached per rate), pruned LoRA models and their measured costs, for one run's base model.

    ``model`` is the run's PEFT model (``ctx.model``); its frozen base weights are what is pruned.
    """

    def __init__(self, model: "PeftModel", *, method: str = "magnitude", targets: str = "both", seed: int = 0,
                 calibration: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None,
                 compensate: bool = False) -> None:
        """``calibration``: returns the calibration batches, for methods that score by activations and for
        ``compensate`` (measured once, the first time a mask is needed)."""
        if (method in CALIBRATED_METHODS or compensate) and calibration is None:
            raise FedtuneError(f"pruning method {method!r}{' with compensation' if compensate else ''} needs "
                               "calibration samples")
        self.model = model
        self.method, self.targets, self.seed, self.compensate = method, targets, seed, compensate
        self.calibration = calibration
        self._activations: list[dict[str, FeatureStats]] | None = None
        self._masks: dict[float, PruneMask] = {}
        self._costs: dict[float, ModelCost] = {}

    def activations(self) -> list[dict[str, FeatureStats]] | None:
        if (self.method in CALIBRATED_METHODS or self.compensate) and self._activations is None:
            self._activations = activation_stats(self.model, self.calibration())
        return self._activations

    def mask(self, rate: float) -> PruneMask:
        rate = float(rate)
        if rate not in self._masks:
            self._masks[rate] = compute_mask(self.model, rate, method=self.method, targets=self.targets,
                                             seed=self.seed, activations=self.activations() if rate > 0 else None,
                                             compensate=self.compensate and rate > 0)
        return self._masks[rate]

    def adopt(self, mask: PruneMask) -> None:
        """Use ``mask`` for its rate instead of computing one: a deployed client gets it from the server, whose
        calibration samples it does not hold."""
        self._masks[float(mask.rate)] = mask

    def build(self, rate: float) -> "PeftModel":
        """A fresh pruned copy with LoRA attached like the run's model (shares the base's unpruned tensors)."""
        mask = self.mask(rate)
        peft = attach_like(build_pruned_model(self.model, mask), self.model)
        self._costs.setdefault(float(rate), pruned_cost(peft, mask))
        return peft

    def cost(self, rate: float) -> ModelCost:
        """The FLOPs cost model of the pruned LoRA model at ``rate``, measured (builds one once if needed)."""
        rate = float(rate)
        if rate not in self._costs:
            self.build(rate)  # measures the cost; the model is not kept
        return self._costs[rate]
