"""Transformer FLOPs estimate that counts frozen and trainable (LoRA) weights apart, per block.

Only matmul-like weights (parameters with 2+ dimensions) count; norms and biases (1-D) are excluded as negligible,
and embedding lookups cost nothing. Per-block counts let split learning charge a slice of blocks to each side.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class ModelCost:
    """Parameter counts driving the FLOPs estimate (LoRA A/B weights count as trainable)."""

    n_layers: int
    d_model: int
    embed_params: int  # input embedding table (lookup: no FLOPs)
    head_params: int  # LM head matmul weights, counted even when tied to the embeddings
    block_frozen: list[int]  # per block: frozen matmul weights
    block_trainable: list[int]  # per block: trainable matmul weights (LoRA A and B)
    final_norm: int  # params of the final norm (informational, no FLOPs counted)
    head_trainable: bool = False  # whether the LM head weight itself is trained
    attn_dims: list[int] | None = None  # per block: width of attention scores/values (default d_model; less if heads are pruned)


def _matmul_params(module: nn.Module) -> tuple[int, int]:
    frozen = trainable = 0
    for p in module.parameters():
        if p.dim() >= 2:
            if p.requires_grad:
                trainable += p.numel()
            else:
                frozen += p.numel()
    return frozen, trainable


def _blocks(model: nn.Module, n_layers: int) -> tuple[nn.Module, nn.ModuleList]:
    for parent in model.modules():
        for child in parent.children():
            if isinstance(child, nn.ModuleList) and len(child) == n_layers:
                return parent, child
    raise ValueError(f"no list of {n_layers} transformer blocks found in {type(model).__name__}")


def model_cost(model: nn.Module) -> ModelCost:
    """Count a (PEFT-wrapped or plain) causal LM: blocks found as the first ModuleList of num_hidden_layers."""
    config = model.config
    n_layers = config.num_hidden_layers
    parent, blocks = _blocks(model, n_layers)
    per_block = [_matmul_params(block) for block in blocks]
    head = model.get_output_embeddings().weight
    norms = [m for m in parent.children() if "norm" in type(m).__name__.lower()]
    return ModelCost(
        n_layers=n_layers,
        d_model=config.hidden_size,
        embed_params=model.get_input_embeddings().weight.numel(),
        head_params=head.numel(),
        block_frozen=[f for f, _ in per_block],
        block_trainable=[t for _, t in per_block],
        final_norm=sum(p.numel() for m in norms for p in m.parameters()),
        head_trainable=head.requires_grad,
    )


def _select(cost: ModelCost, blocks: range | None) -> range:
    return range(cost.n_layers) if blocks is None else blocks


def _attn_width(cost: ModelCost, block: int) -> int:
    return cost.d_model if cost.attn_dims is None else cost.attn_dims[block]


def forward_flops(cost: ModelCost, tokens: int, seq_len: int, blocks: range | None = None, head: bool = True) -> int:
    """Forward FLOPs over ``blocks`` (default all) and the LM head.

    Per token: ``2 * W`` for every matmul weight W (frozen and LoRA) plus attention scores and weighted values,
    ``2 * 2 * seq_len * d_model`` per block (``d_model`` -> ``attn_dims[i]`` when heads are pruned); the head adds
    ``2 * head_params``.
    """
    per_token = sum(2 * (cost.block_frozen[i] + cost.block_trainable[i]) + 4 * seq_len * _attn_width(cost, i)
                    for i in _select(cost, blocks))
    if head:
        per_token += 2 * cost.head_params
    return per_token * tokens


def train_flops(cost: ModelCost, tokens: int, seq_len: int, blocks: range | None = None, head: bool = True) -> int:
    """Forward + backward FLOPs of a training step over ``blocks`` and the head.

    backward = input gradients ``2 * W`` per token for every weight, frozen included (the gradient must flow through
    it), + attention backward (``2x`` its forward: gradients w.r.t. both operands) + weight gradients ``2 * W`` per
    token only for trainable weights. So with F frozen and T trainable weights: ``train = 2(F+T) + 2(F+T) + 2T``
    per token, ``= 3 * forward`` for full fine-tuning and about ``2 * forward`` for LoRA.
    """
    selected = _select(cost, blocks)
    fwd = forward_flops(cost, tokens, seq_len, blocks, head)
    attention = sum(4 * seq_len * _attn_width(cost, i) for i in selected) * tokens
    weights_grad = sum(2 * cost.block_trainable[i] for i in selected) * tokens
    if head and cost.head_trainable:
        weights_grad += 2 * cost.head_params * tokens
    inputs_grad = fwd - attention + 2 * attention
    return fwd + inputs_grad + weights_grad
