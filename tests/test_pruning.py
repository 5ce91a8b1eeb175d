"""Client-specific structured pruning: masks, the pruned model, adapter slicing, masked FedAvg, FedLLM runs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from models_helpers import ARCHS, tiny

from fedtune.config import LoraConfig
from fedtune.core.errors import ConfigError, FedtuneError
from fedtune.federated.masked import coverage_fraction, masked_fedavg
from fedtune.federated.strategies import ClientUpdate, weighted_mean
from fedtune.models.flops import forward_flops, model_cost, train_flops
from fedtune.models.lora import adapter_state, attach_lora, load_adapter_state
from fedtune.models.pruning import (
    PruneMask,
    Pruner,
    activation_stats,
    build_pruned_model,
    compute_mask,
    expand_adapter,
    kept_count,
    pruned_cost,
    slice_adapter,
    state_bytes,
)

TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def _lora(arch, **fields):
    model, _ = tiny(arch, **fields)
    peft = attach_lora(model, LoraConfig(r=4, dropout=0.0, target_modules=TARGETS[arch]), seed=0)
    with torch.no_grad():  # non-zero B so that every adapter coordinate matters
        gen = torch.Generator().manual_seed(1)
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return peft.eval()


def _gqa_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------
# The pruned model


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_model_has_the_kept_shapes_and_runs(arch):
    peft = _lora(arch)  # hidden 64, 4 heads (head_dim 16), MLP 128
    pruned = build_pruned_model(peft, compute_mask(peft, 0.5, targets="both"))
    block = pruned.get_submodule("transformer.h.0" if arch == "gpt2" else "model.layers.0")
    if arch == "gpt2":  # Conv1D weights are (in, out)
        assert tuple(block.attn.c_attn.weight.shape) == (64, 3 * 32)
        assert tuple(block.attn.c_proj.weight.shape) == (32, 64)
        assert tuple(block.mlp.c_fc.weight.shape) == (64, 64) and block.mlp.c_fc.bias.shape == (64,)
        assert tuple(block.mlp.c_proj.weight.shape) == (64, 64)
        assert block.attn.num_heads == 2 and pruned.config.n_inner == 64
    else:
        for name in ("q_proj", "k_proj", "v_proj"):
            assert tuple(getattr(block.self_attn, name).weight.shape) == (32, 64)
        assert tuple(block.self_attn.o_proj.weight.shape) == (64, 32)
        assert tuple(block.mlp.gate_proj.weight.shape) == (64, 64) == tuple(block.mlp.up_proj.weight.shape)
        assert tuple(block.mlp.down_proj.weight.shape) == (64, 64)
        assert pruned.config.intermediate_size == 64 and pruned.config.num_attention_heads == 2
        if arch == "qwen2":
            assert block.self_attn.q_proj.bias.shape == (32,)
    assert pruned(IDS[:, :8] % 500).logits.shape == (2, 8, peft.config.vocab_size)
    # embeddings are shared with the base model, not copied; the base model is untouched
    assert pruned.get_input_embeddings().weight is peft.get_input_embeddings().weight
    assert all(p.device.type != "meta" for p in pruned.parameters())


def test_pruned_weights_keep_dtype_and_device():
    model, _ = tiny("llama")
    model = model.to(torch.bfloat16)
    pruned = build_pruned_model(model, compute_mask(model, 0.5))
    assert {p.dtype for p in pruned.parameters()} == {torch.bfloat16}
    assert pruned(IDS[:, :6]).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("targets", ["mlp", "heads"])
def test_targets_prune_only_what_they_name(targets):
    peft = _lora("llama")
    block = build_pruned_model(peft, compute_mask(peft, 0.5, targets=targets)).model.layers[1]
    assert block.mlp.down_proj.weight.shape[1] == (64 if targets == "mlp" else 128)
    assert block.self_attn.o_proj.weight.shape[1] == (64 if targets == "mlp" else 32)


@pytest.mark.parametrize("arch", ARCHS)
def test_rate_zero_gives_the_same_logits(arch):
    peft = _lora(arch)
    pruner = Pruner(peft)
    mask = pruner.mask(0.0)
    assert mask.is_full
    clone = pruner.build(0.0)
    state = adapter_state(peft)
    assert slice_adapter(state, mask).keys() == state.keys()
    load_adapter_state(clone.eval(), slice_adapter(state, mask))
    with torch.no_grad():
        torch.testing.assert_close(clone(IDS % 500).logits, peft(IDS % 500).logits, rtol=0, atol=0)


def _zero_pruned(peft, mask):
    """The full LoRA model with every pruned unit silenced: zero the weights (base and LoRA A) that read it."""
    masked = copy.deepcopy(peft)
    with torch.no_grad():
        for name, mm in mask.modules.items():
            if mm.keep_in is None:
                continue
            module = masked.base_model.model.get_submodule(name)
            drop = torch.ones(mm.in_features, dtype=torch.bool)
            drop[mm.keep_in] = False
            base = module.get_base_layer()
            if isinstance(base, torch.nn.Linear):  # (out, in)
                base.weight[:, drop] = 0
            else:  # Conv1D (in, out)
                base.weight[drop, :] = 0
            module.lora_A["default"].weight[:, drop] = 0
    return masked


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_model_equals_the_full_model_with_pruned_units_silenced(arch):
    """Slicing is exact: dropping channels/heads == zeroing what reads them (base weights and LoRA A)."""
    peft = _lora(arch)
    pruner = Pruner(peft, targets="both")
    mask = pruner.mask(0.5)
    pruned = pruner.build(0.5).eval()
    load_adapter_state(pruned, slice_adapter(adapter_state(peft), mask))
    with torch.no_grad():
        expected = _zero_pruned(peft, mask)(IDS % 500).logits
        torch.testing.assert_close(pruned(IDS % 500).logits, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(peft(IDS % 500).logits, expected, atol=1e-3)  # pruning did change the model


def test_gqa_prunes_whole_kv_groups_by_magnitude():
    model = _gqa_llama()  # 8 query heads, 2 KV heads (4 query heads per group), head_dim 8
    attn = model.model.layers[0].self_attn
    with torch.no_grad():  # group 0 of block 0 gets tiny weights: magnitude keeps group 1
        attn.k_proj.weight[:8] *= 1e-3
        attn.v_proj.weight[:8] *= 1e-3
        attn.q_proj.weight[:32] *= 1e-3
        attn.o_proj.weight[:, :32] *= 1e-3
        model.model.layers[0].mlp.down_proj.weight[:, 5] *= 100  # channel 5 is the most important
    mask = compute_mask(model, 0.5, targets="both")
    b0 = mask.blocks[0]
    assert b0.kv_heads.tolist() == [1] and b0.heads.tolist() == [4, 5, 6, 7]
    assert 5 in b0.mlp_channels.tolist() and len(b0.mlp_channels) == 48
    pruned = build_pruned_model(model, mask)
    layer = pruned.model.layers[0].self_attn
    assert tuple(layer.q_proj.weight.shape) == (32, 64) and tuple(layer.k_proj.weight.shape) == (8, 64)
    assert layer.num_key_value_groups == 4 and pruned.config.num_key_value_heads == 1
    torch.testing.assert_close(layer.k_proj.weight, attn.k_proj.weight[8:])
    ids = IDS % 300
    with torch.no_grad():  # equal to the full model with the dropped heads' output columns zeroed
        full = copy.deepcopy(model)
        for blk, bm in zip(full.model.layers, mask.blocks):
            drop = torch.ones(64, dtype=torch.bool)
            drop[(bm.heads[:, None] * 8 + torch.arange(8)).reshape(-1)] = False
            blk.self_attn.o_proj.weight[:, drop] = 0
            keep = torch.zeros(96, dtype=torch.bool)
            keep[bm.mlp_channels] = True
            blk.mlp.down_proj.weight[:, ~keep] = 0
        torch.testing.assert_close(pruned(ids).logits, full(ids).logits, rtol=1e-5, atol=1e-5)


def test_masks_are_deterministic_and_methods_differ():
    peft = _lora("llama")
    a, b = compute_mask(peft, 0.5), compute_mask(peft, 0.5)
    for x, y in zip(a.blocks, b.blocks):
        assert torch.equal(x.mlp_channels, y.mlp_channels) and torch.equal(x.heads, y.heads)
    r1, r2 = compute_mask(peft, 0.5, method="random", seed=3), compute_mask(peft, 0.5, method="random", seed=3)
    assert torch.equal(r1.blocks[0].mlp_channels, r2.blocks[0].mlp_channels)
    assert not torch.equal(r1.blocks[0].mlp_channels, a.blocks[0].mlp_channels)
    assert kept_count(128, 0.5) == 64 and kept_count(4, 0.9) == 1 and kept_count(9, 0.5) == 5
    with pytest.raises(FedtuneError, match=r"\[0, 0.9\]"):
        compute_mask(peft, 0.95)


def test_compute_and_payload_shrink_with_the_rate_measured():
    peft = _lora("llama")
    pruner = Pruner(peft)
    full = model_cost(peft)
    state = adapter_state(peft)
    costs = {rate: pruner.cost(rate) for rate in (0.25, 0.5, 0.75)}
    block = lambda c: sum(c.block_frozen)  # noqa: E731
    for rate, cost in costs.items():
        # every block matmul is pruned on one side: frozen block weights shrink exactly by (1 - rate)
        assert block(cost) == pytest.approx(block(full) * (1 - rate), rel=0.02)
        fwd = forward_flops(cost, tokens=96, seq_len=96, head=False) / forward_flops(full, 96, 96, head=False)
        assert fwd == pytest.approx(1 - rate, abs=0.03)
    seq = 96
    flops = [train_flops(full, seq, seq)] + [train_flops(costs[r], seq, seq) for r in (0.25, 0.5, 0.75)]
    assert flops == sorted(flops, reverse=True)
    sizes = [state_bytes(state)] + [state_bytes(slice_adapter(state, pruner.mask(r))) for r in (0.25, 0.5, 0.75)]
    assert sizes == sorted(sizes, reverse=True) and sizes[2] < 0.8 * sizes[0]
    # the cost is measured from the pruned model's modules, not assumed from the rate
    built = pruner.build(0.5)
    assert sum(costs[0.5].block_trainable) == sum(p.numel() for n, p in built.named_parameters() if "lora_" in n)
    assert pruned_cost(built, pruner.mask(0.5)).attn_dims == [32] * 4


# ---------------------------------------------------------------------------------------------
# Adapters and masked aggregation


@pytest.mark.parametrize("arch", ARCHS)
def test_slice_expand_round_trip(arch):
    peft = _lora(arch)
    mask = compute_mask(peft, 0.5)
    state = adapter_state(peft)
    sliced = slice_adapter(state, mask)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    full, coverage = expand_adapter(sliced, mask, shapes)
    for key, t in state.items():
        assert full[key].shape == t.shape and coverage[key].dtype == torch.bool
        assert torch.equal(full[key][coverage[key]], t[coverage[key]])
        assert not full[key][~coverage[key]].any()
        assert int(coverage[key].sum()) == sliced[key].numel()
    assert slice_adapter(full, mask).keys() == sliced.keys()
    assert all(torch.equal(slice_adapter(full, mask)[k], sliced[k]) for k in sliced)
    # which tensors shrink: A of modules with pruned inputs, B of modules with pruned outputs
    down = "down_proj" if arch != "gpt2" else "mlp.c_proj"
    up = "up_proj" if arch != "gpt2" else "mlp.c_fc"
    q_a = next(k for k in state if ("q_proj" in k or "c_attn" in k) and "lora_A" in k)
    assert sliced[next(k for k in state if down in k and "lora_A" in k and ".0." in k)].shape[1] == 64
    assert sliced[next(k for k in state if up in k and "lora_B" in k and ".0." in k)].shape[0] == 64
    assert sliced[q_a].shape == state[q_a].shape  # A of q reads the hidden size: unaffected
    with pytest.raises(FedtuneError, match="keys do not match"):
        expand_adapter({k: v for k, v in sliced.items() if k != q_a}, mask, shapes)


def _u(cid, n, **tensors):
    return ClientUpdate(cid, n, {k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}, 0.0)


def test_masked_fedavg_hand_computed():
    g = {"w": torch.tensor([[10.0, 10.0, 10.0]]), "b": torch.tensor([1.0, 1.0])}
    a = _u(0, 1, w=[[1.0, 2.0, 0.0]], b=[2.0, 4.0])
    b = _u(1, 3, w=[[5.0, 0.0, 0.0]], b=[6.0, 8.0])
    cov_a = {"w": torch.tensor([[True, True, False]])}  # "b" missing: fully covered
    cov_b = {"w": torch.tensor([[True, False, False]]), "b": torch.tensor([True, True])}
    out = masked_fedavg(g, [(a, cov_a), (b, cov_b)])
    # w[0]: (1*1 + 3*5) / 4 = 4; w[1]: only client a -> 2; w[2]: nobody -> global 10
    torch.testing.assert_close(out["w"], torch.tensor([[4.0, 2.0, 10.0]]))
    torch.testing.assert_close(out["b"], torch.tensor([(2 + 18) / 4, (4 + 24) / 4]))
    assert out["w"].dtype == torch.float32
    assert coverage_fraction([(a, cov_a), (b, cov_b)], g) == pytest.approx(4 / 5)


def test_masked_fedavg_with_full_masks_is_fedavg_exactly():
    gen = torch.Generator().manual_seed(0)
    g = {"x": torch.randn(4, 6, generator=gen), "y": torch.randn(6, generator=gen)}
    ups = [ClientUpdate(i, n, {k: torch.randn(v.shape, generator=gen) for k, v in g.items()}, 0.0)
           for i, n in enumerate((7, 13, 2))]
    reference = weighted_mean(ups)
    for coverage in (None, {k: torch.ones(v.shape, dtype=torch.bool) for k, v in g.items()}):
        out = masked_fedavg(g, [(u, coverage) for u in ups])
        for key in g:
            assert torch.equal(out[key], reference[key])


def test_a_coordinate_kept_by_one_client_takes_its_value():
    peft = _lora("llama")
    state = adapter_state(peft)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    gen = torch.Generator().manual_seed(0)
    mask_a = compute_mask(peft, 0.5, method="random", seed=1)
    mask_b = compute_mask(peft, 0.5, method="random", seed=2)
    pairs, trained = [], []
    for cid, mask in enumerate((mask_a, mask_b)):
        local = {k: torch.randn(v.shape, generator=gen) for k, v in slice_adapter(state, mask).items()}
        full, cov = expand_adapter(local, mask, shapes)
        pairs.append((ClientUpdate(cid, 5 + cid, full, 0.0), cov))
        trained.append((full, cov))
    out = masked_fedavg(state, pairs)
    (fa, ca), (fb, cb) = trained
    for key in state:
        only_a, only_b, none, both = ca[key] & ~cb[key], cb[key] & ~ca[key], ~ca[key] & ~cb[key], ca[key] & cb[key]
        assert torch.equal(out[key][only_a], fa[key][only_a])
        assert torch.equal(out[key][only_b], fb[key][only_b])
        assert torch.equal(out[key][none], state[key][none])
        torch.testing.assert_close(out[key][both], (5 * fa[key][both] + 6 * fb[key][both]) / 11)


# ---------------------------------------------------------------------------------------------
# Activation-aware importance (calibrated)


def _captured_inputs(model, ids, mask):
    """Brute force: the output projections' inputs over the unpadded tokens, per (block, "mlp" | "attn")."""
    captured = {}

    def capture(key):
        def hook(module, inputs, output) -> None:
            captured[key] = inputs[0].detach()
        return hook

    hooks = [m.register_forward_hook(capture(key)) for i, layer in enumerate(model.model.layers)
             for key, m in (((i, "mlp"), layer.mlp.down_proj), ((i, "attn"), layer.self_attn.o_proj))]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    return {key: x[mask.bool()].float() for key, x in captured.items()}


def test_activation_stats_skip_padding_and_ignore_the_adapter():
    peft = _lora("llama")
    mask = torch.ones_like(IDS)
    mask[1, 8:] = 0  # padded tail: must not count
    # two batches: the statistics accumulate over both
    stats = activation_stats(peft, [{"input_ids": IDS[:1], "attention_mask": mask[:1]},
                                    {"input_ids": IDS[1:], "attention_mask": mask[1:]}])
    with peft.disable_adapter():
        reference = _captured_inputs(peft.get_base_model(), IDS, mask)
    for (i, key), x in reference.items():
        got = stats[i][key]
        assert got.count == 20 == x.shape[0]
        torch.testing.assert_close(got.norm, x.pow(2).sum(0).sqrt())
        torch.testing.assert_close(got.mean, x.mean(0))
        torch.testing.assert_close(got.var, x.var(0, unbiased=False), atol=1e-5, rtol=1e-4)
    # the (non-zero) LoRA weights do not change the statistics: they describe the frozen base
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(10)
    again = activation_stats(peft, [{"input_ids": IDS, "attention_mask": mask}])
    for i, block in enumerate(stats):
        for key in block:
            torch.testing.assert_close(again[i][key].sum_sq, block[key].sum_sq)


def test_activation_method_keeps_the_channels_the_formula_ranks_highest():
    peft = _gqa_llama()
    batches = [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}]
    stats = activation_stats(peft, batches)
    mask = compute_mask(peft, 0.5, method="activation", targets="both", activations=stats)
    for i, layer in enumerate(peft.model.layers):
        score = layer.mlp.down_proj.weight.abs().sum(0) * stats[i]["mlp"].norm  # ||W[:, j]||_1 * ||X_j||_2
        expected = torch.sort(torch.topk(score, kept_count(len(score), 0.5)).indices).values
        assert torch.equal(mask.blocks[i].mlp_channels, expected)
        per_feature = layer.self_attn.o_proj.weight.abs().sum(0) * stats[i]["attn"].norm
        group_score = per_feature.reshape(2, -1).sum(1)  # 2 KV groups of 4 query heads x head_dim 8
        assert mask.blocks[i].kv_heads.tolist() == [int(group_score.argmax())]
    assert mask != compute_mask(peft, 0.5, method="magnitude", targets="both")
    with pytest.raises(FedtuneError, match="needs calibration"):
        Pruner(peft, method="activation")
    pruner = Pruner(peft, method="activation", calibration=lambda: batches)
    assert pruner.mask(0.5).blocks[0].mlp_channels.tolist() == mask.blocks[0].mlp_channels.tolist()


def test_fluctuation_method_ranks_by_variance_times_squared_column_norm():
    peft = _gqa_llama()
    stats = activation_stats(peft, [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}])
    mask = compute_mask(peft, 0.5, method="fluctuation", targets="mlp", activations=stats)
    for i, layer in enumerate(peft.model.layers):
        score = layer.mlp.down_proj.weight.pow(2).sum(0) * stats[i]["mlp"].var  # ||W[:, j]||_2^2 * Var(X_j)
        expected = torch.sort(torch.topk(score, kept_count(len(score), 0.5)).indices).values
        assert torch.equal(mask.blocks[i].mlp_channels, expected)
    assert not torch.equal(mask.blocks[0].mlp_channels, compute_mask(
        peft, 0.5, method="activation", targets="mlp", activations=stats).blocks[0].mlp_channels)
    with pytest.raises(FedtuneError, match="'fluctuation' needs calibration"):
        compute_mask(peft, 0.5, method="fluctuation", targets="mlp")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compensation_keeps_each_projection_output_mean_on_the_calibration_tokens(arch):
    peft = _lora(arch)
    batch = {"input_ids": IDS % 500, "attention_mask": torch.ones_like(IDS)}
    stats = activation_stats(peft, [batch])
    plain = compute_mask(peft, 0.5, method="activation", targets="both", activations=stats)
    comp = compute_mask(peft, 0.5, method="activation", targets="both", activations=stats, compensate=True)
    assert [b.mlp_channels.tolist() for b in comp.blocks] == [b.mlp_channels.tolist() for b in plain.blocks]
    base = peft.get_base_model()
    with peft.disable_adapter():
        inputs = _captured_inputs(base, batch["input_ids"], batch["attention_mask"]) if arch == "llama" else None
    pruned, uncompensated = build_pruned_model(peft, comp), build_pruned_model(peft, plain)
    prefix = "model.layers" if arch == "llama" else "transformer.h"
    names = {"mlp": "mlp.down_proj", "attn": "self_attn.o_proj"} if arch == "llama" else \
        {"mlp": "mlp.c_proj", "attn": "attn.c_proj"}
    for i in range(peft.config.num_hidden_layers):
        for key, name in names.items():
            path = f"{prefix}.{i}.{name}"
            full = base.get_submodule(path).get_base_layer()  # without its LoRA
            small, bare = pruned.get_submodule(path), uncompensated.get_submodule(path)
            keep = comp.modules[path].keep_in
            # the same inputs, as the calibration pass saw them (llama: captured; gpt2: the stats' mean input)
            x = inputs[(i, key)] if inputs is not None else stats[i][key].mean.reshape(1, -1)
            with torch.no_grad():
                want = full(x).mean(0)
                got, without = small(x[:, keep]).mean(0), bare(x[:, keep]).mean(0)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
            assert (without - want).abs().max() > 100 * (got - want).abs().max()  # what the bias puts back
    with pytest.raises(FedtuneError, match="compensation needs calibration"):
        compute_mask(peft, 0.5, targets="both", compensate=True)
    with pytest.raises(FedtuneError, match="with compensation needs calibration samples"):
        Pruner(peft, method="magnitude", compensate=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_mask_survives_json_exactly(arch):
    """What a deployed server sends a pruned client (through JSON text) builds the same pruned model."""
    peft = _lora(arch)
    batch = {"input_ids": IDS % 500, "attention_mask": torch.ones_like(IDS)}
    mask = compute_mask(peft, 0.5, method="activation", targets="both", activations=activation_stats(peft, [batch]),
                        compensate=True)
    back = PruneMask.from_json(json.loads(json.dumps(mask.to_json())))
    assert (back.rate, back.method, back.targets) == (mask.rate, mask.method, mask.targets)
    assert back.modules.keys() == mask.modules.keys() and len(back.blocks) == len(mask.blocks)
    for a, b in [*zip(mask.blocks, back.blocks), *((mask.modules[k], back.modules[k]) for k in mask.modules)]:
        for name, value in vars(a).items():
            other = getattr(b, name)
            if isinstance(value, torch.Tensor):
                assert other.dtype == value.dtype and torch.equal(other, value), name
            else:
                assert other == value, name
    assert any(m.bias_shift is not None for m in back.modules.values())
    ids = IDS % 500
    with torch.no_grad():
        torch.testing.assert_close(build_pruned_model(peft, back)(ids).logits,
                                   build_pruned_model(peft, mask)(ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Config and FedLLM


def test_config_validation(tiny_config):
    cfg = tiny_config("pruning.rates=[0.5, 0.0, 0.25]", "pruning.targets=mlp")
    assert cfg.pruning.rates == [0.5, 0.0, 0.25] and cfg.pruning.method == "activation"
    for override, message in [("pruning.rates=[0.95]", r"pruning.rates entries must be in \[0, 0.9\]"),
                              ("pruning.rates=[0.5, 0.1]", "pruning.rates has 2 entries but federation.num_clients = 3"),
                              ("pruning.method=l1", "unknown pruning method 'l1'; valid choices: activation, fluctuation, magnitude, random"),
                              ("pruning.targets=rows", "pruning.targets")]:
        with pytest.raises(ConfigError, match=message):
            tiny_config(override)
    with pytest.raises(ConfigError, match="applies to paradigm 'fedllm'"):
        tiny_config("pruning.rates=[0.5]", "paradigm=split", "split.cut=2")


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    from conftest import TINY

    from fedtune.config import load_config
    from fedtune.engine.runner import Runner

    out = tmp_path_factory.mktemp("pruned") / "run"
    cfg = load_config(TINY, ["pruning.rates=[0.5, 0.0, 0.0]", "pruning.targets=both"])
    return cfg, out, Runner(cfg, out).run()


def test_fedllm_run_with_a_pruned_client(pruned_run):
    cfg, out, summary = pruned_run
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"] - 0.1
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["eval_loss"])) for r in lines)
    assert [r["pruning_rates"] for r in lines[1:]] == [[0.5, 0.0, 0.0]] * cfg.federation.rounds
    c0, c1, c2 = summary["clients"]
    assert c0["rounds_trained"] == c1["rounds_trained"] == cfg.federation.rounds
    assert c0["uplink_bytes"] < 0.85 * c1["uplink_bytes"] and c1["uplink_bytes"] == c2["uplink_bytes"]
    assert c0["downlink_bytes"] < 0.85 * c1["downlink_bytes"]
    assert c0["pruning_rates"] == [[r, 0.5] for r in range(1, cfg.federation.rounds + 1)]
    by_rate = summary["pruning"]["by_rate"]
    assert by_rate["0.5"]["adapter_bytes"] < by_rate["0"]["adapter_bytes"]
    assert by_rate["0.5"]["train_flops_per_token"] < 0.75 * by_rate["0"]["train_flops_per_token"]
    assert by_rate["0.5"]["block_params"] == by_rate["0"]["block_params"] // 2
    # the uplink per round is the pruned adapter plus the message header
    assert c0["uplink_bytes"] / cfg.federation.rounds == pytest.approx(by_rate["0.5"]["adapter_bytes"], rel=0.2)
    # the global adapter keeps its full shapes
    from safetensors.torch import load_file

    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert sum(t.numel() * t.element_size() for t in adapter.values()) == by_rate["0"]["adapter_bytes"]


def test_resume_with_pruning_is_exact(pruned_run, tmp_path):
    """A 2-round run extended to 3 rounds on resume reaches the uninterrupted 3-round result."""
    from conftest import TINY
    from safetensors.torch import load_file

    from fedtune.cli import main

    cfg, reference, ref_summary = pruned_run
    short = tmp_path / "short"
    assert main(["run", str(TINY), "--set", "pruning.rates=[0.5, 0.0, 0.0]", "--set", "pruning.targets=both",
                 "--set", "federation.rounds=2", "--out", str(short)]) == 0
    assert main(["run", "--resume", str(short), "--set", "federation.rounds=3",
                 "--set", "pruning.rates=[0.5, 0.0, 0.0]"]) == 0
    summary = json.loads((short / "summary.json").read_text())
    assert summary["final"] == ref_summary["final"] and summary["comm"] == ref_summary["comm"]
    assert summary["clients"][0]["pruning_rates"] == ref_summary["clients"][0]["pruning_rates"]
    a = load_file(reference / "adapter" / "adapter_model.safetensors")
    b = load_file(short / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_planned_rates_are_applied_per_round(tmp_path, tiny_config):
    """FedLLM asks the run's network for each round's planned rates and trains each client's pruned model at its."""
    from fedtune.comm.ledger import DOWN, UP
    from fedtune.core.progress import RunProgress
    from fedtune.engine.context import build_context
    from fedtune.paradigms.fedllm import FedLLM

    cfg = tiny_config("federation.rounds=2", "train.local_steps=1", "pruning.targets=both", "network.planner=jcpba",
                      "devices.profiles=['phone', 'laptop', 'workstation']")
    ctx = build_context(cfg, RunProgress(False), tmp_path)
    paradigm = FedLLM(ctx)
    for round in (1, 2):
        planned = ctx.network.pruning_rates(round)
        assert {c: paradigm.pruning_rate(round, c) for c in planned} == planned
        result = paradigm.run_round(round)
        assert result.extra.get("pruning_rates", [0.0] * 3) == [planned[c] for c in result.clients]
        pruned = [c for c in result.clients if planned[c] > 0]
        full = [c for c in result.clients if planned[c] == 0]
        for p in pruned:  # a pruned client's adapter is smaller both ways
            for f in full:
                assert ctx.ledger.bytes(round=round, client=p, direction=UP) < ctx.ledger.bytes(
                    round=round, client=f, direction=UP)
                assert ctx.ledger.bytes(round=round, client=p, direction=DOWN) < ctx.ledger.bytes(
                    round=round, client=f, direction=DOWN)
    assert paradigm.pruning_history, "the phone is pruned in some round"
    assert all(v.shape == paradigm.global_state[k].shape for k, v in adapter_state(ctx.model).items())


def test_compensated_pruned_client_trains_with_the_bias_and_sends_only_its_adapter(tmp_path, tiny_config):
    from fedtune.comm.ledger import UP
    from fedtune.core.progress import RunProgress
    from fedtune.engine.context import build_context
    from fedtune.paradigms.fedllm import FedLLM

    runs = {}
    for compensate in (False, True):
        cfg = tiny_config("federation.rounds=1", "train.local_steps=1", "pruning.rates=[0.5, 0.0, 0.0]",
                          f"pruning.compensate={str(compensate).lower()}")
        ctx = build_context(cfg, RunProgress(False), tmp_path / str(compensate))
        paradigm = FedLLM(ctx)
        down = paradigm.pruner.build(0.5).get_base_model().model.layers[0].mlp.down_proj.get_base_layer()
        assert (down.bias is not None) == compensate and not any(p.requires_grad for p in down.parameters())
        paradigm.run_round(1)
        runs[compensate] = (ctx.ledger.bytes(round=1, client=0, direction=UP), paradigm.global_state)
    (bytes_plain, plain), (bytes_comp, comp) = runs[False], runs[True]
    assert bytes_comp == bytes_plain  # the bias is derived locally, never sent
    assert any(not torch.equal(plain[k], comp[k]) for k in plain)  # and it changes what the pruned client learns
