"""Where a decoder's transformer blocks and their prunable modules are, and how their weights are laid out.

Shared by the scores and masks (:mod:`.importance`), the model surgery (:mod:`.surgery`) and the adapter mapping
(:mod:`.adapters`): PEFT wrappers are looked through, so a plain HF model and a PEFT-wrapped one read the same.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from fedtune.core.errors import FedtuneError

PEFT_PREFIX = "base_model.model."


def base_layer(module: nn.Module) -> nn.Module:
    """The wrapped layer of a PEFT LoRA module (or the module itself)."""
    get = getattr(module, "get_base_layer", None)
    return get() if get is not None else module


def plain_model(model: nn.Module) -> nn.Module:
    """The HF model inside a PeftModel (its LoRA wrappers included), or ``model``."""
    get = getattr(model, "get_base_model", None)
    return get() if get is not None else model


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(module path, list) of the ``num_hidden_layers`` transformer blocks of a plain HF model."""
    n_layers = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return name, module
    raise FedtuneError(f"pruning: no list of {n_layers} transformer blocks found in {type(model).__name__}")


@dataclass
class Layout:
    """Where one block's prunable modules are (names relative to the block) and how its weights are laid out."""

    kind: str  # "llama" (nn.Linear q/k/v/o, gate/up/down) or "gpt2" (Conv1D c_attn/c_proj, c_fc/c_proj)
    mlp_in: list[str]  # modules whose OUTPUT features are the MLP channels
    mlp_out: str  # module whose INPUT features are the MLP channels
    attn_qkv: list[str]
    attn_out: str


LLAMA = Layout("llama", ["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj",
               ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "self_attn.o_proj")
LLAMA_NO_GATE = replace(LLAMA, mlp_in=["mlp.up_proj"])  # e.g. non-gated MLPs with up/down names
GPT2 = Layout("gpt2", ["mlp.c_fc"], "mlp.c_proj", ["attn.c_attn"], "attn.c_proj")


def block_layout(block: nn.Module) -> Layout:
    """The :class:`Layout` a block matches (Llama-style first, then GPT-2)."""
    names = {name for name, _ in block.named_modules()}
    for layout in (LLAMA, LLAMA_NO_GATE, GPT2):
        if all(m in names for m in (*layout.mlp_in, layout.mlp_out, *layout.attn_qkv, layout.attn_out)):
            return layout
    raise FedtuneError(
        f"pruning supports Llama/Qwen2/Mistral-style blocks (q/k/v/o_proj, gate/up/down_proj) and GPT-2 style "
        f"blocks (attn.c_attn/c_proj, mlp.c_fc/c_proj); {type(block).__name__} has neither"
    )


def weight_of(block: nn.Module, name: str) -> tuple[torch.Tensor, bool]:
    """(weight as (out, in), is_conv1d) of a block submodule (through a PEFT wrapper)."""
    from transformers.pytorch_utils import Conv1D

    layer = base_layer(block.get_submodule(name))
    if isinstance(layer, Conv1D):
        return layer.weight.detach().t(), True
    if isinstance(layer, nn.Linear):
        return layer.weight.detach(), False
    raise FedtuneError(f"pruning: {name} is a {type(layer).__name__}, expected nn.Linear or Conv1D")


def head_shape(model: nn.Module, block: nn.Module, layout: Layout) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of a block, from the config, checked against its weights."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if layout.kind == "gpt2":
        q_out = weight_of(block, layout.attn_qkv[0])[0].shape[0] // 3
    else:
        q_out = weight_of(block, layout.attn_qkv[0])[0].shape[0]
    if q_out != heads * head_dim:
        raise FedtuneError(f"pruning: attention output {q_out} != heads {heads} x head_dim {head_dim}")
    return heads, kv, head_dim
