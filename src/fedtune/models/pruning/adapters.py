"""Adapters mapped between the full base model and a client's pruned one.

LoRA ``A`` (r x in) indexes a module's input features, ``B`` (out x r) its output features. :func:`slice_adapter`
keeps the rows/columns a client kept (``A`` columns of ``down_proj``/``o_proj``, ``B`` rows of
``gate``/``up``/``q``/``k``/``v``; other modules' A/B are unaffected), :func:`expand_adapter` puts a pruned adapter
back at full size with a coverage mask, which :func:`fedtune.federated.masked.masked_fedavg` averages.
"""

from __future__ import annotations

import torch

from fedtune.core.errors import FedtuneError
from fedtune.models.pruning.importance import PruneMask
from fedtune.models.pruning.layout import PEFT_PREFIX


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


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Raw tensor bytes of an adapter state (the message adds a small header)."""
    return sum(t.numel() * t.element_size() for t in state.values())
