"""Masked FedAvg: average each coordinate over the clients that kept it (clients on pruned models).

A client that trained a pruned model returns its adapter mapped back to full size
(:func:`fedtune.models.pruning.expand_adapter`) with a coverage mask: True where it had the coordinate.
Each coordinate of the aggregate is the ``num_samples``-weighted mean over the clients covering it; a
coordinate no client covered keeps the global value. With every mask full this is exactly
:func:`fedtune.federated.strategies.weighted_mean` (same float64 operations in the same order).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtune.federated.strategies import ClientUpdate, TensorDict

#: Per adapter key, where the client has values (bool or 0/1); ``None`` or a missing key = everywhere.
Coverage = dict[str, torch.Tensor]


def masked_fedavg(global_state: TensorDict,
                  updates: Sequence[tuple[ClientUpdate, Coverage | None]]) -> TensorDict:
    """Per coordinate: sum_k m_k w_k x_k / sum_k m_k w_k over clients k (w = num_samples, m = coverage);
    where no client covers a coordinate, the global value stays."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    out: TensorDict = {}
    for key, current in global_state.items():
        weights = []
        for update, coverage in updates:
            if key not in update.tensors:
                raise KeyError(f"client {update.client} update has no tensor {key!r}")
            if tuple(update.tensors[key].shape) != tuple(current.shape):
                raise ValueError(f"client {update.client} tensor {key!r} has shape "
                                 f"{tuple(update.tensors[key].shape)}, global {tuple(current.shape)}")
            m = None if coverage is None else coverage.get(key)
            w = torch.full(current.shape, float(update.num_samples), dtype=torch.float64)
            weights.append(w if m is None else w * m.to(device="cpu", dtype=torch.float64))
        total = torch.zeros(current.shape, dtype=torch.float64)
        for w in weights:
            total += w
        covered = total > 0
        safe = torch.where(covered, total, torch.ones_like(total))
        acc = torch.zeros(current.shape, dtype=torch.float64)
        for (update, _), w in zip(updates, weights):
            acc += update.tensors[key].to(device="cpu", dtype=torch.float64) * (w / safe)
        merged = torch.where(covered, acc, current.to(device="cpu", dtype=torch.float64))
        out[key] = merged.to(current.dtype)
    return out


def coverage_fraction(updates: Sequence[tuple[ClientUpdate, Coverage | None]], global_state: TensorDict) -> float:
    """Share of the adapter's coordinates that at least one client covered (1.0 without pruning)."""
    total = covered = 0
    for key, t in global_state.items():
        any_cover = torch.zeros(t.shape, dtype=torch.bool)
        for _, coverage in updates:
            m = None if coverage is None else coverage.get(key)
            any_cover |= True if m is None else m.to("cpu").bool()
        total += t.numel()
        covered += int(any_cover.sum())
    return covered / total if total else 1.0
