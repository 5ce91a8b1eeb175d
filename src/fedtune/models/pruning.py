"""Client-specific structured pruning of a decoder-only base model, and adapters mapped between sizes.

A client with pruning rate ``rho`` trains LoRA on a *really smaller* copy of the frozen base model: in every block
it keeps the ``1 - rho`` most important MLP channels and/or attention heads (:class:`PruneMask`), so its forward and
backward FLOPs, its memory and its LoRA payload all shrink, and all three are measured on the pruned model.

What is pruned (per block, the same count in every block, chosen by each block's own scores):

- **MLP channels** (``targets`` ``mlp`` or ``both``): Llama/Qwen2/Mistral-style ``gate_proj``/``up_proj`` rows and
  ``down_proj`` columns; GPT-2 ``c_fc`` columns (+ bias) and ``mlp.c_proj`` rows (``Conv1D`` stores ``(in, out)``).
- **Attention heads** (``targets`` ``heads`` or ``both``): pruned in whole **KV groups** — a key/value head together
  with the query heads that share it (``num_attention_heads / num_key_value_heads`` of them) — so grouped-query
  attention keeps its group ratio and runs unchanged (the attention code infers head counts from tensor shapes).
  With plain multi-head attention a group is one head. A model with a single KV group (multi-query attention) keeps
  its heads. GPT-2: the q, k and v column blocks of ``c_attn`` and the rows of ``attn.c_proj``.

The hidden (residual) size, embeddings, norms and LM head are never pruned; their tensors are *shared* with the base
model, not copied, so a pruned client costs only its smaller block weights.

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

Adapters: LoRA ``A`` (r x in) indexes a module's input features, ``B`` (out x r) its output features.
:func:`slice_adapter` keeps the rows/columns a client kept (``A`` columns of ``down_proj``/``o_proj``, ``B`` rows of
``gate``/``up``/``q``/``k``/``v``; other modules' A/B are unaffected), :func:`expand_adapter` puts a pruned adapter
back at full size with a coverage mask, which :func:`fedtune.federated.masked.masked_fedavg` averages.

``transformers.pytorch_utils.prune_linear_layer`` exists, but it slices one dimension, allocates a float32
``nn.Linear`` (a bf16 base would silently change dtype), and its Conv1D twin and the models' ``prune_heads`` are gone
in transformers 5; so the few lines that slice a weight are here, for ``nn.Linear`` and ``Conv1D`` alike.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from torch import nn

from fedtune.errors import FedtuneError
from fedtune.models.flops import ModelCost, model_cost
from fedtune.registry import Registry

if TYPE_CHECKING:
    from peft import PeftModel

TARGETS = ("mlp", "heads", "both")
MAX_RATE = 0.9
PEFT_PREFIX = "base_model.model."

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
    from fedtune.engine.seeding import derive_seed

    generator = torch.Generator().manual_seed(derive_seed(seed, "pruning", layer, kind))
    return torch.rand(units[0].shape[0], generator=generator)


# ---------------------------------------------------------------------------------------------
# Masks


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


def kept_count(n: int, rate: float) -> int:
    """Units kept out of ``n`` at ``rate``: ``round(n * (1 - rate))`` (halves up), at least 1."""
    return max(1, min(n, math.floor(n * (1.0 - rate) + 0.5)))


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor | None:
    """Sorted indices of the ``keep`` highest scores (ties: lower index first); ``None`` if all are kept."""
    if keep >= len(scores):
        return None
    order = torch.sort(-scores.float().cpu(), stable=True).indices[:keep]
    return torch.sort(order).values


def _base_layer(module: nn.Module) -> nn.Module:
    """The wrapped layer of a PEFT LoRA module (or the module itself)."""
    get = getattr(module, "get_base_layer", None)
    return get() if get is not None else module


def _plain_model(model: nn.Module) -> nn.Module:
    """The HF model inside a PeftModel (its LoRA wrappers included), or ``model``."""
    get = getattr(model, "get_base_model", None)
    return get() if get is not None else model


def _block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(module path, list) of the ``num_hidden_layers`` transformer blocks of a plain HF model."""
    n_layers = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return name, module
    raise FedtuneError(f"pruning: no list of {n_layers} transformer blocks found in {type(model).__name__}")


@dataclass
class _Layout:
    """Where one block's prunable modules are (names relative to the block) and how its weights are laid out."""

    kind: str  # "llama" (nn.Linear q/k/v/o, gate/up/down) or "gpt2" (Conv1D c_attn/c_proj, c_fc/c_proj)
    mlp_in: list[str]  # modules whose OUTPUT features are the MLP channels
    mlp_out: str  # module whose INPUT features are the MLP channels
    attn_qkv: list[str]
    attn_out: str


LLAMA = _Layout("llama", ["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj",
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "self_attn.o_proj")
LLAMA_NO_GATE = replace(LLAMA, mlp_in=["mlp.up_proj"])  # e.g. non-gated MLPs with up/down names
GPT2 = _Layout("gpt2", ["mlp.c_fc"], "mlp.c_proj", ["attn.c_attn"], "attn.c_proj")


def _layout(block: nn.Module) -> _Layout:
    names = {name for name, _ in block.named_modules()}
    for layout in (LLAMA, LLAMA_NO_GATE, GPT2):
        if all(m in names for m in (*layout.mlp_in, layout.mlp_out, *layout.attn_qkv, layout.attn_out)):
            return layout
    raise FedtuneError(
        f"pruning supports Llama/Qwen2/Mistral-style blocks (q/k/v/o_proj, gate/up/down_proj) and GPT-2 style "
        f"blocks (attn.c_attn/c_proj, mlp.c_fc/c_proj); {type(block).__name__} has neither"
    )


def _weight(block: nn.Module, name: str) -> tuple[torch.Tensor, bool]:
    """(weight as (out, in), is_conv1d) of a block submodule (through a PEFT wrapper)."""
    from transformers.pytorch_utils import Conv1D

    layer = _base_layer(block.get_submodule(name))
    if isinstance(layer, Conv1D):
        return layer.weight.detach().t(), True
    if isinstance(layer, nn.Linear):
        return layer.weight.detach(), False
    raise FedtuneError(f"pruning: {name} is a {type(layer).__name__}, expected nn.Linear or Conv1D")


def _head_shape(model: nn.Module, block: nn.Module, layout: _Layout) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of a block, from the config, checked against its weights."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if layout.kind == "gpt2":
        q_out = _weight(block, layout.attn_qkv[0])[0].shape[0] // 3
    else:
        q_out = _weight(block, layout.attn_qkv[0])[0].shape[0]
    if q_out != heads * head_dim:
        raise FedtuneError(f"pruning: attention output {q_out} != heads {heads} x head_dim {head_dim}")
    return heads, kv, head_dim


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
    plain = _plain_model(model)
    prefix, blocks = _block_list(plain)
    out_blocks: list[BlockMask] = []
    modules: dict[str, ModuleMask] = {}
    for i, block in enumerate(blocks):
        layout = _layout(block)
        heads, kv, head_dim = _head_shape(plain, block, layout)
        base = f"{prefix}.{i}."
        weights = {name: _weight(block, name)[0] for name in (*layout.mlp_in, layout.mlp_out,
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


def _add_bias_shifts(masks: dict[str, ModuleMask], base: str, weights: dict, layout: _Layout,
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


def _module_masks(base: str, weights: dict, layout: _Layout, bm: BlockMask) -> dict[str, ModuleMask]:
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
    plain = _plain_model(model)
    _, blocks = _block_list(plain)
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
        layout = _layout(block)
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


# ---------------------------------------------------------------------------------------------
# The pruned model


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
    plain = _plain_model(model)
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
        source = _base_layer(plain.get_submodule(name))
        setattr(pruned.get_submodule(parent), child, _sliced_layer(source, mask.modules[name]))
    _, blocks = _block_list(pruned)
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


# ---------------------------------------------------------------------------------------------
# Adapters: full <-> pruned


def _module_of(key: str) -> tuple[str, str]:
    """Adapter key -> (plain module path, 'A' | 'B' | other param name)."""
    for part, kind in ((".lora_A.", "A"), (".lora_B.", "B")):
        if part in key:
            return key.split(part)[0].removeprefix(PEFT_PREFIX), kind
    owner, attr = key.rsplit(".", 1)
    return owner.removeprefix(PEFT_PREFIX), attr


def _select(key: str, shape: torch.Size, mask: PruneMask) -> tuple[int, torch.Tensor] | None:
    """(dim, kept indices) of an adapter tensor, or None when the tensor is not pruned."""
    module, kind = _module_of(key)
    mm = mask.modules.get(module)
    if mm is None:
        return None
    if kind == "A" and len(shape) == 2:
        return (1, mm.keep_in) if mm.keep_in is not None else None
    if kind == "B" and len(shape) in (1, 2):  # weight (out, r) or bias (out,)
        return (0, mm.keep_out) if mm.keep_out is not None else None
    raise FedtuneError(f"pruning: cannot map adapter tensor {key} {tuple(shape)} of a pruned module "
                       "(only LoRA A/B weights are supported)")


def slice_adapter(full_state: dict[str, torch.Tensor], mask: PruneMask) -> dict[str, torch.Tensor]:
    """The client's adapter on its pruned model: kept columns of A (pruned inputs), kept rows of B (pruned outputs)."""
    out = {}
    for key, t in full_state.items():
        sel = _select(key, t.shape, mask)
        out[key] = t if sel is None else t.index_select(sel[0], sel[1].to(t.device)).contiguous()
    return out


def expand_adapter(pruned_state: dict[str, torch.Tensor], mask: PruneMask,
                   full_shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A pruned adapter at full size (zeros where the client had no coordinate) and its coverage masks (bool,
    True where the client kept the coordinate). Keys must match ``full_shapes``."""
    if set(pruned_state) != set(full_shapes):
        missing, extra = sorted(set(full_shapes) - set(pruned_state)), sorted(set(pruned_state) - set(full_shapes))
        raise FedtuneError(f"pruned adapter keys do not match the global adapter: missing {missing[:3]}, "
                           f"unexpected {extra[:3]}")
    tensors, coverage = {}, {}
    for key, t in pruned_state.items():
        shape = tuple(full_shapes[key])
        sel = _select(key, torch.Size(shape), mask)
        if sel is None:
            if tuple(t.shape) != shape:
                raise FedtuneError(f"adapter tensor {key}: shape {tuple(t.shape)} != {shape}")
            tensors[key], coverage[key] = t, torch.ones(shape, dtype=torch.bool)
            continue
        dim, index = sel
        index = index.to(t.device)
        full = torch.zeros(shape, dtype=t.dtype, device=t.device)
        full.index_copy_(dim, index, t)
        cov = torch.zeros(shape, dtype=torch.bool, device=t.device)
        cov.index_fill_(dim, index, True)
        tensors[key], coverage[key] = full, cov
    return tensors, coverage


# ---------------------------------------------------------------------------------------------
# Per-run helper


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Raw tensor bytes of an adapter state (the message adds a small header)."""
    return sum(t.numel() * t.element_size() for t in state.values())


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
