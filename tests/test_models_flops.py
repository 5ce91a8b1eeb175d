"""FLOPs estimate: hand-computed counts for tiny models, LoRA accounting and block slices."""

from __future__ import annotations

import pytest
from models_helpers import tiny

from fedtune.config import LoraConfig
from fedtune.models.flops import forward_flops, model_cost, train_flops
from fedtune.models.lora import attach_lora

D, FF, L, V, SEQ = 64, 128, 4, 512, 32
LLAMA_BLOCK = 4 * D * D + 3 * D * FF  # q,k,v,o + gate,up,down (norms and biases excluded)
LORA_BLOCK = 2 * (8 * D + D * 8)  # r=8 on q_proj and v_proj
ATTN = 4 * SEQ * D  # scores + weighted values, per token per block


@pytest.fixture(scope="module")
def costs():
    model, _ = tiny("llama")
    full = model_cost(model)  # fresh model: everything trainable
    model.requires_grad_(False)
    base = model_cost(model)
    lora = model_cost(attach_lora(model, LoraConfig(), seed=0))
    return base, lora, full


def test_model_cost_counts(costs):
    base, lora, _ = costs
    assert (base.n_layers, base.d_model, base.embed_params, base.head_params) == (L, D, V * D, V * D)
    assert base.block_frozen == [LLAMA_BLOCK] * L and base.block_trainable == [0] * L
    assert lora.block_frozen == [LLAMA_BLOCK] * L and lora.block_trainable == [LORA_BLOCK] * L
    assert base.final_norm == D and not lora.head_trainable


@pytest.mark.parametrize("arch, block", [("gpt2", D * 3 * D + D * D + 2 * D * FF), ("qwen2", LLAMA_BLOCK)])
def test_other_architectures(arch, block):
    model, _ = tiny(arch)
    cost = model_cost(attach_lora(model, LoraConfig(), seed=0))
    assert cost.block_frozen == [block] * L and cost.head_params == V * D
    assert cost.block_trainable == [2048] * L


def test_hand_computed_and_linear_in_tokens(costs):
    base, lora, _ = costs
    tokens = 100
    fwd = tokens * (L * (2 * LLAMA_BLOCK + ATTN) + 2 * V * D)
    assert forward_flops(base, tokens, SEQ) == fwd
    assert train_flops(base, tokens, SEQ) == fwd + (fwd + tokens * L * ATTN)  # nothing trainable: input grads only
    for f in (forward_flops, train_flops):
        assert f(lora, 3 * tokens, SEQ) == 3 * f(lora, tokens, SEQ)


def test_lora_adds_forward_input_and_weight_gradients(costs):
    base, lora, _ = costs
    tokens = 50
    assert forward_flops(lora, tokens, SEQ) - forward_flops(base, tokens, SEQ) == 2 * LORA_BLOCK * L * tokens
    assert train_flops(lora, tokens, SEQ) - train_flops(base, tokens, SEQ) == 6 * LORA_BLOCK * L * tokens


def test_block_slices_sum_to_whole(costs):
    _, lora, _ = costs
    for f in (forward_flops, train_flops):
        whole = f(lora, 10, SEQ)
        slices = sum(f(lora, 10, SEQ, blocks=range(i, i + 1), head=False) for i in range(L))
        assert whole == slices + f(lora, 10, SEQ, blocks=range(0), head=True)
        assert whole == f(lora, 10, SEQ, range(0, 2), head=False) + f(lora, 10, SEQ, range(2, L), head=True)


def test_full_fine_tuning_is_three_forwards(costs):
    *_, full = costs
    assert full.block_trainable == [LLAMA_BLOCK] * L and full.head_trainable
    assert train_flops(full, 7, SEQ) == 3 * forward_flops(full, 7, SEQ)
