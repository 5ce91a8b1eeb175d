"""LoRA attachment, determinism and the adapter state round trip."""

from __future__ import annotations

import warnings

import pytest
import torch
from models_helpers import ARCHS, tiny

from fedtune.config import LoraConfig
from fedtune.core.errors import FedtuneError
from fedtune.models.lora import adapter_state, attach_lora, load_adapter_state, trainable_parameters


def lora_model(arch: str = "llama", seed: int = 0, **fields):
    model, _ = tiny(arch)
    return attach_lora(model, LoraConfig(**fields), seed=seed)


@pytest.mark.parametrize("arch", ARCHS)
def test_attach_only_lora_trainable(arch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PEFT's fan_in_fan_out warning for GPT-2 Conv1D
        model = lora_model(arch)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert sum(p.numel() for p in trainable_parameters(model)) == 4 * 2048  # r=8 on q,v (llama) or c_attn (gpt2)
    state = adapter_state(model)
    assert list(state) == sorted(state) and len(state) == len(names)
    x = torch.tensor([[5, 6, 7]])
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in trainable_parameters(model))


def test_custom_targets_and_unknown_target():
    model = lora_model(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4)
    assert sum(p.numel() for p in trainable_parameters(model)) == 4 * 4 * (4 * 64 + 64 * 4)
    with pytest.raises(FedtuneError, match="cannot attach LoRA"):
        lora_model(target_modules=["no_such_module"])


def test_seeded_init_is_deterministic_and_leaves_global_rng():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = adapter_state(lora_model(seed=7))
    assert torch.equal(before, torch.get_rng_state())
    b = adapter_state(lora_model(seed=7))
    c = adapter_state(lora_model(seed=8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k)


def test_adapter_state_round_trip():
    model = lora_model()
    state = adapter_state(model)
    assert all(t.device.type == "cpu" and not t.requires_grad for t in state.values())
    new = {k: torch.randn_like(v) for k, v in state.items()}
    load_adapter_state(model, new)
    assert all(torch.equal(new[k], v) for k, v in adapter_state(model).items())
    next(iter(new.values())).zero_()  # the model holds its own copy
    assert not torch.equal(adapter_state(model)[next(iter(new))], next(iter(new.values())))


def test_load_adapter_state_mismatch():
    model = lora_model()
    state = adapter_state(model)
    first = next(iter(state))
    with pytest.raises(FedtuneError, match="missing"):
        load_adapter_state(model, {k: v for k, v in state.items() if k != first})
    with pytest.raises(FedtuneError, match="unexpected"):
        load_adapter_state(model, {**state, "base_model.model.extra.lora_A.weight": torch.zeros(1)})
    with pytest.raises(FedtuneError, match="shape mismatch"):
        load_adapter_state(model, adapter_state(lora_model(r=4)))
