"""Peak training memory meter (CPU breakdown; CUDA allocator when available)."""

from __future__ import annotations

import pytest
import torch
from models_helpers import tiny

from fedtune.config import LoraConfig
from fedtune.models.lora import attach_lora, trainable_parameters
from fedtune.models.memory import MemoryMeter


def measure(batch_size: int, device: torch.device, steps: int = 2) -> MemoryMeter:
    model, _ = tiny("llama")
    model = attach_lora(model, LoraConfig(), seed=0).to(device)
    model.train()
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-3)
    meter = MemoryMeter(device)
    ids = torch.randint(0, 512, (batch_size, 24), generator=torch.Generator().manual_seed(0)).to(device)
    for _ in range(steps):
        with meter.step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        meter.observe(model, optimizer)
    return meter


def test_cpu_breakdown_and_growth_with_batch():
    small, large = measure(2, torch.device("cpu")), measure(8, torch.device("cpu"))
    b = small.breakdown
    model, _ = tiny("llama")
    lora_bytes = 4 * 2048 * 4  # float32 LoRA weights
    assert b["parameters"] >= sum(p.numel() * 4 for p in model.parameters()) + lora_bytes
    assert b["gradients"] == lora_bytes
    assert lora_bytes * 2 <= b["optimizer_state"] < lora_bytes * 2 + 1024  # AdamW moments (+ step counters)
    assert b["activations"] > 0 and b["peak"] == small.peak_bytes == sum(
        b[k] for k in ("parameters", "gradients", "optimizer_state", "activations")
    )
    assert large.breakdown["activations"] > 3 * b["activations"]
    assert large.peak_bytes > small.peak_bytes


def test_saved_parameters_are_not_activations():
    layer = torch.nn.Linear(256, 256, bias=False)
    x = torch.randn(4, 256, requires_grad=True)
    meter = MemoryMeter("cpu")
    with meter.step():
        layer(x).sum().backward()
    # F.linear saves its input (4 KiB) and the weight (a parameter: skipped)
    assert meter.breakdown["activations"] == x.numel() * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_allocator_peak():
    small, large = measure(2, torch.device("cuda")), measure(8, torch.device("cuda"))
    assert small.peak_bytes > 0 and large.peak_bytes > small.peak_bytes
    assert small.breakdown["cuda_max_allocated"] == small.peak_bytes
