"""SplitCom temporal reuse on one split interface (one direction), sender and receiver sides apart.

Per (client, sample id), the **sender** keeps a random projection of the tensor it last sent for that sample (as
it was before the codec: reuse asks whether the tensor changed, not how closely the codec kept it; the projection
never leaves the sender); the **receiver** keeps the full tensor in low precision (a :class:`TensorStore` that
spills to disk past its memory budget). Each step, per sample: the similarity between the projection of the
current tensor and the cached projection is compared with the threshold theta; at or above it only a skip flag
crosses and the receiver reuses its copy; below it the sample's rows are sent (through the codec, optionally as a
residual against the held copy, which carries the codec's last error along) and both caches update. Only the
valid (unpadded) tokens of a sample are ever sent or cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from fedtune.compression.store import TensorStore
from fedtune.core.registry import Registry

Key = tuple[int, int]  # (client, sample id)
CREDIT = -1  # the sample id under which a client's re-send credit (compression.resend_budget) is kept


class Projector:
    """Seeded Gaussian projection of each token's d-vector to k dimensions."""

    def __init__(self, d_model: int, dim: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.matrix = torch.randn(d_model, dim, generator=g) / math.sqrt(dim)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.detach().float().cpu() @ self.matrix


#: How alike a sample's projected tensor (tokens x k) is to its cached projection (higher = more similar), by name.
SIMILARITIES: Registry[Callable[[torch.Tensor, torch.Tensor], float]] = Registry("similarity metric")


@SIMILARITIES.register("cosine")
def cosine(p: torch.Tensor, c: torch.Tensor) -> float:
    """cos of the flattened projections (the paper's: the whole sample at once)."""
    return float(F.cosine_similarity(p.flatten(), c.flatten(), dim=0))


@SIMILARITIES.register("rel_l2")
def relative_l2(p: torch.Tensor, c: torch.Tensor) -> float:
    """1 - ||p - c|| / ||c|| of the flattened projections."""
    return 1.0 - float((p - c).norm() / c.norm().clamp_min(1e-12))


@SIMILARITIES.register("token_min")
def token_min(p: torch.Tensor, c: torch.Tensor) -> float:
    """The least similar token's cosine: one changed token decides, however much energy the others hold (past the
    first blocks a decoder's first token, the attention sink, can hold most of a short sample's norm)."""
    return float(F.cosine_similarity(p, c, dim=-1).min())


@SIMILARITIES.register("token_mean")
def token_mean(p: torch.Tensor, c: torch.Tensor) -> float:
    """The mean of the per-token cosines: every token weighs the same, whatever its norm."""
    return float(F.cosine_similarity(p, c, dim=-1).mean())


def similarity(metric: str, current: torch.Tensor, cached: torch.Tensor) -> float:
    """Similarity ``metric`` (a :data:`SIMILARITIES` name) of two projections, tokens x k each."""
    tokens = lambda x: x.reshape(-1, x.shape[-1]).float()  # noqa: E731
    return SIMILARITIES.get(metric)(tokens(current), tokens(cached))


@dataclass
class BatchDecision:
    sent: list[bool]  # per sample: uploaded (True) or reused (False)
    residual: list[bool]  # per sample: sent as a residual against the held copy


class ReuseSender:
    """Sender side: projections of what it last sent, and (residual mode) the copies the receiver holds."""

    def __init__(self, d_model: int, dim: int, seed: int, metric: str, residual: bool, held_dtype: torch.dtype,
                 spill_dir: Path) -> None:
        self.projector = Projector(d_model, dim, seed)
        self.metric = metric
        self.projections = TensorStore(torch.float32, None, spill_dir)
        self.held = TensorStore(held_dtype, None, spill_dir) if residual else None
        self.credit = TensorStore(torch.float32, None, spill_dir)  # resend budget: (client, CREDIT) -> [bytes]

    def decide(self, keys: list[Key], rows: list[torch.Tensor], theta: float,
               cost: Callable[[torch.Tensor], int] | None = None, budget: float | None = None) -> BatchDecision:
        """Which samples to send: the new ones, and those whose similarity to what was last sent is below
        ``theta``. With a ``budget`` (a share of the uncompressed bytes) the client's credit grows by that share of
        the batch's bytes and the changed samples are re-sent least similar first while it covers their ``cost``."""
        scores = [similarity(self.metric, self.projector(x), self.projections.get(key)) if key in self.projections
                  else None for key, x in zip(keys, rows)]
        send = [s is None or s < theta for s in scores]
        if budget is not None and cost is not None and keys:
            client = keys[0][0]
            credit = self._credit(client) + budget * sum(x.numel() * 4 for x in rows)  # float32 uncompressed
            for i in sorted((i for i, s in enumerate(scores) if s is not None and send[i]), key=lambda i: scores[i]):
                price = cost(rows[i])
                if price <= credit:
                    credit -= price
                else:
                    send[i] = False
            self.credit.put((client, CREDIT), torch.tensor([[credit]], dtype=torch.float32))
        residual = [bool(sent and s is not None and self.held is not None) for sent, s in zip(send, scores)]
        return BatchDecision(send, residual)

    def _credit(self, client: int) -> float:
        key = (client, CREDIT)
        return float(self.credit.get(key)[0, 0]) if key in self.credit else 0.0

    def reference(self, key: Key) -> torch.Tensor:
        return self.held.get(key).float()

    def commit(self, key: Key, sent: torch.Tensor, held: torch.Tensor) -> None:
        """Record that ``sent`` was sent for ``key`` and the receiver holds ``held`` (``sent`` through the codec)."""
        self.projections.put(key, self.projector(sent))
        if self.held is not None:
            self.held.put(key, held)

    def state_dict(self) -> dict:
        return {"projections": self.projections.state_dict(),
                "held": self.held.state_dict() if self.held is not None else {},
                "credit": self.credit.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.projections.load_state_dict(state["projections"])
        self.credit.load_state_dict(state.get("credit", {}))
        if self.held is not None:
            self.held.load_state_dict(state["held"])


class ReuseReceiver:
    """Receiver side: the full tensor last received per (client, sample), in low precision."""

    def __init__(self, dtype: torch.dtype, budget_bytes: int | None, spill_dir: Path) -> None:
        self.store = TensorStore(dtype, budget_bytes, spill_dir)

    def accept(self, key: Key, rows: torch.Tensor) -> None:
        self.store.put(key, rows)

    def reuse(self, key: Key) -> torch.Tensor:
        if key not in self.store:
            raise RuntimeError(f"protocol error: skip flag for {key} but nothing cached for it")
        return self.store.get(key).float()

    def state_dict(self) -> dict:
        return self.store.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.store.load_state_dict(state)
