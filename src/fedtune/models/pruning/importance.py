"""Importance scores, calibration statistics and the structured pruning mask (:class:`PruneMask`) of a base model.

What is pruned (per block, the same count in every block, chosen by each block's own scores):

- **MLP channels** (``targets`` ``mlp`` or ``both``): Llama/Qwen2/Mistral-style ``gate_proj``/``up_proj`` rows and
  ``down_proj`` columns; GPT-2 ``c_fc`` columns (+ bias) and ``mlp.c_proj`` rows (``Conv1D`` stores ``(in, out)``).
- **Attention heads** (``targets`` ``heads`` or ``both``): pruned in whole **KV groups** — a key/value head together
  with the query heads that share it (``num_attention_heads / num_key_value_heads`` of them) — so grouped-query
  attention keeps its group ratio and runs unchanged (the attention code infers head counts from tensor shapes).
  With plain multi-head attention a group is one head. A model with a single KV group (multi-query attention) keeps
  its heads. GPT-2: the q, k and v column blocks of ``c_attn`` and the rows of ``attn.c_proj``.

The importance score is a registry (:data:`PRUNING_METHODS`): ``activation`` (Wanda-style: per input feature of
``down_proj`` / ``o_proj``, the L1 norm of its weight column times the L2 norm of that feature's activations on a
small calibration set, summed over the unit's features), ``magnitude`` (the L2 norm of every weight that reads or
writes a channel / KV group), ``fluctuation`` (FLAP-style: per input feature, its activation variance times the
squared L2 norm of its weight column) and ``random`` (seeded baseline). With ``compensate``, each pruned output
projection gets a bias equal to the pruned features' mean contribution on the calibration set (FLAP's baseline
compensation): what is lost is then only each feature's fluctuation around its mean, which ``fluctuation`` ranks.
On SmolLM2-135M, weight magnitude alone is a poor guide: dropping 5 % of MLP channels by magnitude raises the eval
loss from 3.21 to 8.49 (random: 3.30), while the activation score keeps it at 3.20 (30 %: 3.42; 50 %: 4.32, and
3.98 compensated). Masks (biases included) are a function of (base weights, rate, method, targets, seed,
calibration samples) and are recomputed rather than stored; activations are measured with the adapters disabled,
so they depend on the frozen base only.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields, replace
from typing import Callable

import torch
from torch import nn

from fedtune.core.errors import FedtuneError
from fedtune.core.registry import Registry
from fedtune.core.seeding import derive_seed
from fedtune.models.pruning.layout import Layout, block_layout, block_list, head_shape, plain_model, weight_of

TARGETS = ("mlp", "heads", "both")
MAX_RATE = 0.9

#: ``scorer(units, *, seed, layer, kind, activations) -> scores``: ``units`` are weight views shaped ``(n_units, -1)``
#: (one per tensor touching the unit; the last is the output projection's input columns, ``(n_units, F * d)``);
#: ``activations`` holds the calibration statistics of the unit's F input features of that projection, shaped
#: ``(n_units, F)`` (:class:`FeatureStats`; None without calibration); higher score = more important. ``kind`` is
#: ``"mlp"`` or ``"heads"``.
Scorer = Callable[..., torch.Tensor]
PRUNING_METHODS: Registry[Scorer] = Registry("pruning method")
#: Methods that need activation statistics (a calibration pass) before they can score.
CALIBRATED_METHODS = {"activation", "fluctuation"}


@dataclass(frozen=True)
class FeatureStats:
    """Per input feature of an output projection, over the unpadded calibration tokens: the sum of squares and the
    sum of its values, and the token count."""

    sum_sq: torch.Tensor
    total: torch.Tensor
    count: int

    @property
    def norm(self) -> torch.Tensor:
        """L2 norm over the tokens."""
        return self.sum_sq.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        """Variance over the tokens (population)."""
        return (self.sum_sq / max(self.count, 1) - self.mean.pow(2)).clamp_min(0.0)

    def reshape(self, *shape: int) -> "FeatureStats":
        return FeatureStats(self.sum_sq.reshape(*shape), self.total.reshape(*shape), self.count)


def _needs(method: str, activations: FeatureStats | None) -> FeatureStats:
    if activations is None:
        raise FedtuneError(f"pruning method {method!r} needs calibration activations (Pruner(calibration=...))")
    return activations


@PRUNING_METHODS.register("activation")
def activation_score(units: list[torch.Tensor], *, seed: int, layer: int, kind: str,
                     activations: FeatureStats | None = None) -> torch.Tensor:
    """Wanda-style: sum over the unit's features f of ``||W_out[:, f]||_1 * ||X_f||_2``."""
    norm = _needs("activation", activations).norm
    n, features = norm.shape
    column_l1 = units[-1].detach().float().reshape(n, features, -1).abs().sum(dim=-1)
    return (column_l1 * norm.float()).sum(dim=1)


@PRUNING_METHODS.register("fluctuation")
def fluctuation_score(units: list[torch.Tensor], *, seed: int, layer: int, kind: str,
                      activations: FeatureStats | None = None) -> torch.Tensor:
    """FLAP-style (An et al., 2024): sum over the unit's features f of ``Var(X_f) * ||W_out[:, f]||_2^2``, the
    output error left once a pruned feature's mean is put back as a bias (``compensate``)."""
    var = _needs("fluctuation", activations).var
    n, features = var.shape
    column_sq = units[-1].detach().float().reshape(n, features, -1).pow(2).sum(dim=-1)
    return (column_sq * var.float()).sum(dim=1)


@PRUNING_METHODS.register("magnitude")
def magnitude_score(units: list[torch.Tensor], *, seed: int, layer: int, kind: str,
                    activations: FeatureStats | None = None) -> torch.Tensor:
    """L2 norm over every weight of the unit (all the tensors that read or write it), in float32."""
    return torch.stack([u.detach().float().pow(2).sum(dim=1) for u in units]).sum(dim=0).sqrt()


@PRUNING_METHODS.register("random")
def random_score(units: list[torch.Tensor], *, seed: int, layer: int, kind: str,
                 activations: FeatureStats | None = None) -> torch.Tensor:
    """Seeded random scores (a uniform-pruning baseline): the same for a given (seed, layer, kind)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "pruning", layer, kind))
    return torch.rand(units[0].shape[0], generator=generator)


@dataclass(frozen=True)
class ModuleMask:
    """Kept input / output features of one matmul module (``None`` = all of that side kept)."""

    in_features: int
    out_features: int
    keep_in: torch.Tensor | None = None
    keep_out: torch.Tensor | None = None
    bias_shift: torch.Tensor | None = None  # (out_features,): the pruned inputs' mean contribution, added as a bias


@dataclass(frozen=True)
class BlockMask:
    """What one block keeps: sorted indices of MLP channels, query heads and KV heads (``None`` = all)."""

    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_channels: torch.Tensor | None = None
    heads: torch.Tensor | None = None
    kv_heads: torch.Tensor | None = None

    @property
    def kept_intermediate(self) -> int:
        return self.intermediate_size if self.mlp_channels is None else len(self.mlp_channels)

    @property
    def kept_heads(self) -> int:
        return self.num_heads if self.heads is None else len(self.heads)

    @property
    def kept_kv_heads(self) -> int:
        return self.num_kv_heads if self.kv_heads is None else len(self.kv_heads)


@dataclass(frozen=True)
class PruneMask:
    """A client's structured pruning: per block what it keeps, and per module (plain HF module path, e.g.
    ``model.layers.0.mlp.down_proj``) which input/output features survive."""

    rate: float
    method: str
    targets: str
    blocks: list[BlockMask]
    modules: dict[str, ModuleMask] = field(default_factory=dict)

    @property
    def is_full(self) -> bool:
        """Whether nothing is pruned (rate 0, or too few units to drop any)."""
        return not self.modules

    def to_json(self) -> dict:
        """The mask as plain JSON values (index lists, compensation biases as exact float32 values): what a deployed
        server sends a pruned client with its turn, so the client builds the model the server planned."""
        return {"rate": self.rate, "method": self.method, "targets": self.targets,
                "blocks": [_fields_json(b) for b in self.blocks],
                "modules": {name: _fields_json(m) for name, m in self.modules.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "PruneMask":
        """Inverse of :meth:`to_json` (the same tensors, dtypes included)."""
        return cls(float(data["rate"]), data["method"], data["targets"],
                   [_fields_from_json(BlockMask, b) for b in data["blocks"]],
                   {name: _fields_from_json(ModuleMask, m) for name, m in data["modules"].items()})


def _fields_json(item) -> dict:
    """A mask dataclass's fields as JSON: tensors as ``{"dtype", "values"}``."""
    def value(v):
        return {"dtype": str(v.dtype).removeprefix("torch."), "values": v.tolist()} if isinstance(v, torch.Tensor) else v
    return {f.name: value(getattr(item, f.name)) for f in fields(item)}


def _fields_from_json(cls, data: dict):
    def value(v):
        return torch.tensor(v["values"], dtype=getattr(torch, v["dtype"])) if isinstance(v, dict) else v
    return cls(**{name: value(v) for name, v in data.items()})


def kept_count(n: int, rate: float) -> int:
    """Units kept out of ``n`` at ``rate``: ``round(n * (1 - rate))`` (halves up), at least 1."""
    return max(1, min(n, math.floor(n * (1.0 - rate) + 0.5)))


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor | None:
    """Sorted indices of the ``keep`` highest scores (ties: lower index first); ``None`` if all are kept."""
    if keep >= len(scores):
        return None
    order = torch.sort(-scores.float().cpu(), stable=True).indices[:keep]
    return torch.sort(order).values


def compute_mask(model: nn.Module, rate: float, *, method: str = "magnitude", targets: str = "both",
                 seed: int = 0, activations: list[dict[str, FeatureStats]] | None = None,
                 compensate: bool = False) -> PruneMask:
    """The structured pruning mask of ``model`` (plain HF or PEFT-wrapped) at ``rate`` in [0, 0.9].

    Per block: ``kept_count(units, rate)`` units with the highest ``method`` score are kept, for MLP channels
    and/or KV groups as ``targets`` says. ``activations``: per block ``{"mlp": [I], "attn": [H * head_dim]}``
    statistics of the input features of the MLP and attention output projections (:func:`activation_stats`), for
    calibrated methods and for ``compensate``: the output projection then gets a bias equal to the pruned features'
    mean contribution ``W[:, pruned] @ mean(X[pruned])`` (FLAP's baseline compensation), so on average over the
    calibration tokens the block's output is unchanged. Deterministic: the same inputs give the same mask.
    """
    if compensate and activations is None:
        raise FedtuneError("pruning compensation needs calibration activations (Pruner(calibration=...))")
    if not 0.0 <= rate <= MAX_RATE:
        raise FedtuneError(f"pruning rate must be in [0, {MAX_RATE}], got {rate}")
    if targets not in TARGETS:
        raise FedtuneError(f"pruning targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    scorer = PRUNING_METHODS.get(method)
    plain = plain_model(model)
    prefix, blocks = block_list(plain)
    out_blocks: list[BlockMask] = []
    modules: dict[str, ModuleMask] = {}
    for i, block in enumerate(blocks):
        layout = block_layout(block)
        heads, kv, head_dim = head_shape(plain, block, layout)
        base = f"{prefix}.{i}."
        weights = {name: weight_of(block, name)[0] for name in (*layout.mlp_in, layout.mlp_out,
                                                               *layout.attn_qkv, layout.attn_out)}
        intermediate = weights[layout.mlp_out].shape[1]
        channels = group_heads = group_kv = None
        acts = activations[i] if activations is not None else {}
        if rate > 0 and targets in ("mlp", "both"):
            units = [weights[n] for n in layout.mlp_in] + [weights[layout.mlp_out].t()]
            mlp_acts = acts["mlp"].reshape(intermediate, 1) if "mlp" in acts else None
            channels = _top(scorer(units, seed=seed, layer=i, kind="mlp", activations=mlp_acts),
                            kept_count(intermediate, rate))
        if rate > 0 and targets in ("heads", "both") and kv > 1:
            group_kv, group_heads = _kv_groups(weights, layout, heads, kv, head_dim, scorer, seed, i, rate,
                                               acts.get("attn"))
        bm = BlockMask(intermediate, heads, kv, head_dim, channels, group_heads, group_kv)
        out_blocks.append(bm)
        masks = _module_masks(base, weights, layout, bm)
        if compensate:
            _add_bias_shifts(masks, base, weights, layout, acts)
        modules.update(masks)
    return PruneMask(rate=rate, method=method, targets=targets, blocks=out_blocks, modules=modules)


def _add_bias_shifts(masks: dict[str, ModuleMask], base: str, weights: dict, layout: Layout,
                     acts: dict[str, FeatureStats]) -> None:
    """Give each pruned output projection of a block the mean contribution of its pruned input features."""
    for name, key in ((layout.mlp_out, "mlp"), (layout.attn_out, "attn")):
        mm = masks.get(base + name)
        if mm is None or mm.keep_in is None:
            continue
        dropped = torch.ones(mm.in_features, dtype=torch.bool)
        dropped[mm.keep_in] = False
        w = weights[name].float().cpu()  # (out, in)
        shift = w[:, dropped] @ acts[key].mean.float().reshape(-1)[dropped]
        masks[base + name] = replace(mm, bias_shift=shift)


def _kv_groups(weights, layout, heads, kv, head_dim, scorer, seed, layer, rate, attn_acts=None):
    """Kept KV heads and their query heads (sorted), scored per KV group."""
    rep = heads // kv
    if layout.kind == "gpt2":
        w = weights[layout.attn_qkv[0]]  # (3 * H * hd, d)
        d = heads * head_dim
        q, k, v = w[:d], w[d:2 * d], w[2 * d:]
    else:
        q, k, v = (weights[n] for n in layout.attn_qkv)
    o = weights[layout.attn_out].t()  # (H * hd, d): rows = the attention output features
    per_group = [q.reshape(kv, -1), k.reshape(kv, -1), v.reshape(kv, -1), o.reshape(kv, -1)]
    group_acts = attn_acts.reshape(kv, -1) if attn_acts is not None else None  # query heads are grouped by KV head
    keep = _top(scorer(per_group, seed=seed, layer=layer, kind="heads", activations=group_acts), kept_count(kv, rate))
    if keep is None:
        return None, None
    query = (keep[:, None] * rep + torch.arange(rep)[None, :]).reshape(-1)
    return keep, query


def _features(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _module_masks(base: str, weights: dict, layout: Layout, bm: BlockMask) -> dict[str, ModuleMask]:
    def shape(name):
        out, inp = weights[name].shape
        return dict(in_features=inp, out_features=out)

    masks = {}
    if bm.mlp_channels is not None:
        for name in layout.mlp_in:
            masks[base + name] = ModuleMask(**shape(name), keep_out=bm.mlp_channels)
        masks[base + layout.mlp_out] = ModuleMask(**shape(layout.mlp_out), keep_in=bm.mlp_channels)
    if bm.heads is not None:
        q_feat = _features(bm.heads, bm.head_dim)
        kv_feat = _features(bm.kv_heads, bm.head_dim)
        if layout.kind == "gpt2":
            d = bm.num_heads * bm.head_dim
            masks[base + layout.attn_qkv[0]] = ModuleMask(
                **shape(layout.attn_qkv[0]), keep_out=torch.cat([q_feat, q_feat + d, q_feat + 2 * d]))
        else:
            q_name, k_name, v_name = layout.attn_qkv
            masks[base + q_name] = ModuleMask(**shape(q_name), keep_out=q_feat)
            masks[base + k_name] = ModuleMask(**shape(k_name), keep_out=kv_feat)
            masks[base + v_name] = ModuleMask(**shape(v_name), keep_out=kv_feat)
        masks[base + layout.attn_out] = ModuleMask(**shape(layout.attn_out), keep_in=q_feat)
    return masks


@torch.no_grad()
def activation_stats(model: nn.Module, batches) -> list[dict[str, FeatureStats]]:
    """Per block, statistics over every calibration token of each input feature of the MLP output projection
    (``"mlp"``: the MLP channels) and of the attention output projection (``"attn"``: heads x head_dim).

    ``batches`` yields model inputs (``input_ids``, ``attention_mask``); padded positions are left out. A PEFT model
    runs with its adapters disabled, so the statistics depend on the frozen base weights only.
    """
    plain = plain_model(model)
    _, blocks = block_list(plain)
    sums: list[dict[str, FeatureStats]] = [{} for _ in blocks]
    current: dict[str, torch.Tensor] = {}

    def hook(i: int, key: str):
        def accumulate(module, inputs, output) -> None:
            x = inputs[0].detach().float()[current["mask"]]  # (valid tokens, features)
            new = FeatureStats(x.pow(2).sum(dim=0).cpu(), x.sum(dim=0).cpu(), x.shape[0])
            old = sums[i].get(key)
            sums[i][key] = new if old is None else FeatureStats(old.sum_sq + new.sum_sq, old.total + new.total,
                                                                old.count + new.count)
        return accumulate

    handles = []
    for i, block in enumerate(blocks):
        layout = block_layout(block)
        handles.append(block.get_submodule(layout.mlp_out).register_forward_hook(hook(i, "mlp")))
        handles.append(block.get_submodule(layout.attn_out).register_forward_hook(hook(i, "attn")))
    disable = getattr(model, "disable_adapter", None)
    was_training = model.training
    model.eval()
    try:
        with disable() if disable is not None else contextlib.nullcontext():
            for batch in batches:
                current["mask"] = batch["attention_mask"].bool()
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not sums[0]:
        raise FedtuneError("pruning calibration: no calibration batches")
    return sums
