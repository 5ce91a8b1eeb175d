"""Server side of KD-FedLLM: clients' top-k logits on the public positions -> soft labels.

Per position, a client's top-k (values, indices) becomes a sparse distribution ``softmax(values / T)`` over its k
indices. The server combines the clients' sparse distributions (union of indices) with per-(client, position) weights
from an aggregator, keeps the top-k of the result and renormalises it. A client's position whose values are not
finite (or whose indices are out of range) gets weight 0; positions with no valid client are masked out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fedtune.core.registry import Registry

#: ``fn(probs [C, n, k], valid [C, n]) -> weights [C, n]``; probs are 0 where not valid.
Aggregator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AGGREGATORS: Registry[Aggregator] = Registry("kd aggregation")


@AGGREGATORS.register("mean")
def mean_weights(probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Every valid client counts the same."""
    return valid.to(probs.dtype)


@AGGREGATORS.register("confidence")
def confidence_weights(probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each client's distribution weighted by its max probability at that position."""
    return probs.max(dim=-1).values * valid.to(probs.dtype)


@dataclass
class SoftLabels:
    """The aggregate per public position: ``indices`` [P, k] (None: full vocabulary), ``probs`` [P, k or V], ``mask`` [P]."""

    indices: torch.Tensor | None
    probs: torch.Tensor
    mask: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"probs": self.probs, "mask": self.mask}
        if self.indices is not None:
            out["indices"] = self.indices
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "SoftLabels":
        return cls(tensors.get("indices"), tensors["probs"], tensors["mask"].bool())


def sparse_distribution(values: torch.Tensor, indices: torch.Tensor | None, temperature: float,
                        vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs [n, k], valid [n]): softmax(values / T) per row; rows with non-finite values or bad indices are invalid
    (their probs are 0)."""
    values = values.float()
    valid = torch.isfinite(values).all(dim=-1)
    if indices is not None:
        valid &= ((indices >= 0) & (indices < vocab_size)).all(dim=-1)
    safe = torch.where(valid[:, None], values, torch.zeros_like(values))
    probs = torch.softmax(safe / temperature, dim=-1)
    return torch.where(valid[:, None], probs, torch.zeros_like(probs)), valid


def aggregate_logits(uploads: list[tuple[torch.Tensor, torch.Tensor | None]], *, temperature: float, topk: int,
                     vocab_size: int, method: str = "mean", chunk: int = 256) -> SoftLabels:
    """Combine clients' logits on the same P positions into soft labels.

    ``uploads``: per client (values [P, k], indices [P, k] int) or (values [P, V], None) for the full vocabulary.
    Returns the top-``topk`` of the aggregate per position, renormalised (``topk`` 0: the full distribution).
    Works in chunks of positions so only ``chunk x V`` floats are dense at a time.
    """
    if not uploads:
        raise ValueError("no client logits to aggregate")
    weigh = AGGREGATORS.get(method)
    num_positions = uploads[0][0].shape[0]
    for values, indices in uploads:
        if values.shape[0] != num_positions or (indices is not None and indices.shape != values.shape):
            raise ValueError(f"client logits cover {values.shape[0]} positions, expected {num_positions}")
    k = min(topk, vocab_size) if topk else 0
    out_idx, out_probs, out_mask = [], [], []
    for start in range(0, num_positions, chunk):
        stop = min(start + chunk, num_positions)
        parts = [sparse_distribution(v[start:stop], None if i is None else i[start:stop], temperature, vocab_size)
                 for v, i in uploads]
        probs = torch.stack([p for p, _ in parts])  # [C, n, k]
        valid = torch.stack([m for _, m in parts])  # [C, n]
        weights = weigh(probs, valid) * valid
        total = weights.sum(dim=0)  # [n]
        dense = torch.zeros(stop - start, vocab_size)
        for c, (_, indices) in enumerate(uploads):
            contrib = weights[c][:, None] * probs[c]
            if indices is None:
                dense += contrib
            else:
                idx = torch.where(valid[c][:, None], indices[start:stop].long(), torch.zeros_like(indices[start:stop]).long())
                dense.scatter_add_(1, idx, contrib)
        mask = total > 0
        dense = dense / total.clamp_min(1e-30)[:, None]
        if k:
            top, idx = dense.topk(k, dim=-1)
            out_idx.append(idx.to(torch.int32))
            dense = top
        dense = dense / dense.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        out_probs.append(torch.where(mask[:, None], dense, torch.zeros_like(dense)))
        out_mask.append(mask)
    return SoftLabels(torch.cat(out_idx) if k else None, torch.cat(out_probs), torch.cat(out_mask))


def private_soft_labels(mean_probs: torch.Tensor, candidates: torch.Tensor | None) -> SoftLabels:
    """Soft labels from the noised mean of the clients' probabilities at the candidates (client-level DP): negative
    entries (noise) set to 0, each position renormalised; a position left with no mass is masked out."""
    probs = mean_probs.float().clamp_min(0)
    total = probs.sum(dim=-1, keepdim=True)
    mask = total[:, 0] > 0
    probs = torch.where(mask[:, None], probs / total.clamp_min(1e-30), torch.zeros_like(probs))
    return SoftLabels(None if candidates is None else candidates.to(torch.int32), probs, mask)
