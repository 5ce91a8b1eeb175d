"""Per-client cuts from device profiles: the most blocks a device's memory (and time budget) allows.

Client memory is measured, not guessed: one real training step of the client's part with 1 and with 2 head
blocks (and, for a U-shape, of the tail) at the run's batch size and maximum length gives a per-block cost
and a fixed cost, from which ``memory(head, tail)`` follows linearly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtune.federated.sampling import local_steps
from fedtune.models.flops import ModelCost, train_flops
from fedtune.models.lora import adapter_state, load_adapter_state
from fedtune.models.memory import MemoryMeter
from fedtune.network.devices import DeviceProfile, client_profiles
from fedtune.split.cut import CutError, SplitModel
from fedtune.training.steps import make_optimizer


@dataclass(frozen=True)
class ClientMemoryModel:
    fixed_bytes: int  # embeddings and what does not grow with blocks
    per_block_bytes: int  # one more block: weights, LoRA grads and optimizer state, saved activations
    tail_extra_bytes: int  # U-shape: final norm, LM head and logits on the client

    def bytes_for(self, head: int, tail: int) -> int:
        return self.fixed_bytes + (head + tail) * self.per_block_bytes + (self.tail_extra_bytes if tail else 0)


def _step_memory(split: SplitModel, modules: list[torch.nn.Module], start: int, stop: int,
                 batch: dict[str, torch.Tensor], device: torch.device) -> int:
    meter = MemoryMeter(device, by_tensors=True)
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, lr=0.0, weight_decay=0.0)
    with meter.step():
        if start == 0:
            out = split.run(0, stop, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            out.backward(torch.ones_like(out))
        else:
            hidden = torch.zeros(*batch["input_ids"].shape, split.model.config.hidden_size, device=device)
            out = split.run(start, stop, hidden=hidden, attention_mask=batch["attention_mask"], labels=batch["input_ids"])
            out.loss.backward()
    optimizer.step()  # lr 0: allocates the optimizer state without changing weights
    meter.observe(torch.nn.ModuleList(modules), optimizer)
    optimizer.zero_grad(set_to_none=True)
    return meter.peak_bytes


def measure_client_memory(split: SplitModel, batch: dict[str, torch.Tensor], device: torch.device,
                          tail: int) -> ClientMemoryModel:
    model, blocks, L = split.model, split.blocks, split.num_layers
    embed = model.get_input_embeddings()
    one = _step_memory(split, [embed, blocks[0]], 0, 1, batch, device)
    two = _step_memory(split, [embed, blocks[0], blocks[1]], 0, 2, batch, device)
    per_block = max(0, two - one)
    tail_extra = 0
    if tail:
        tail_only = _step_memory(split, [blocks[L - 1], model.get_output_embeddings()], L - 1, L, batch, device)
        tail_extra = max(0, tail_only - per_block)
    return ClientMemoryModel(fixed_bytes=max(0, one - per_block), per_block_bytes=per_block, tail_extra_bytes=tail_extra)


def round_flops(cost: ModelCost, head: int, tail: int, *, steps: int, batch_size: int, seq_len: int) -> int:
    """Client training FLOPs of one round with ``head`` (+ ``tail``) blocks at full length."""
    tokens = batch_size * seq_len
    flops = train_flops(cost, tokens, seq_len, blocks=range(head), head=False)
    if tail:
        flops += train_flops(cost, tokens, seq_len, blocks=range(cost.n_layers - tail, cost.n_layers), head=True)
    return steps * flops


def cuts_from_profiles(profiles: list[DeviceProfile], memory: ClientMemoryModel, flops_of, *, num_layers: int,
                       tail: int, reference_cut: int, time_budget_s: float | None) -> tuple[list[int], list[int]]:
    """(cuts, capacities) per client.

    capacity = most head blocks that fit the device's memory (and ``time_budget_s`` if given); cut = most
    blocks that also finish a round's compute within the budget, which defaults to the time the slowest
    device needs for ``reference_cut`` blocks (so synchronous rounds finish together).
    """
    top = num_layers - 1 - tail
    slowest = min(p.flops_per_s for p in profiles)
    budget = time_budget_s if time_budget_s is not None else flops_of(min(reference_cut, top)) / slowest
    cuts, capacities = [], []
    for cid, device in enumerate(profiles):
        fits_memory = [k for k in range(1, top + 1) if memory.bytes_for(k, tail) <= device.memory_bytes]
        if not fits_memory:
            raise CutError(f"client {cid} ({device.name}, {device.memory_bytes / 1e9:.2f} GB) cannot hold even one "
                           f"block: that needs {memory.bytes_for(1, tail) / 1e9:.2f} GB")
        in_time = [k for k in fits_memory if flops_of(k) / device.flops_per_s <= budget] or [1]
        capacity = max(fits_memory) if time_budget_s is None else max(in_time)
        cuts.append(max(in_time))
        capacities.append(capacity)
    return cuts, capacities


def place_by_profiles(ctx, split: SplitModel, tail: int) -> tuple[list[int], list[int], dict]:
    """(cuts, capacities, what the summary records) from the run's device profiles and the client memory measured
    at the run's batch size and maximum length. The model's LoRA weights are left as they were (lr 0)."""
    cfg = ctx.cfg
    n = cfg.federation.num_clients
    profiles = client_profiles(cfg.devices, n)
    g = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.train.batch_size, cfg.data.max_length)
    ids = torch.randint(0, ctx.model.config.vocab_size, shape, generator=g).to(ctx.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    before = adapter_state(ctx.model)
    memory = measure_client_memory(split, batch, ctx.device, tail)
    load_adapter_state(ctx.model, before)  # lr 0 left the weights as they were; be explicit
    steps = max(local_steps(cfg, len(p)) for p in ctx.partitions)

    def flops_of(k: int) -> int:
        return round_flops(ctx.cost, k, tail, steps=steps, batch_size=shape[0], seq_len=shape[1])

    cuts, capacities = cuts_from_profiles(profiles, memory, flops_of, num_layers=split.num_layers, tail=tail,
                                          reference_cut=cfg.split.cut, time_budget_s=cfg.split.round_time_budget_s)
    info = {"memory_model": {"fixed_bytes": memory.fixed_bytes, "per_block_bytes": memory.per_block_bytes,
                             "tail_extra_bytes": memory.tail_extra_bytes},
            "devices": [p.name for p in profiles]}
    return cuts, capacities, info
