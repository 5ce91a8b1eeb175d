"""Which clients take part in a round, and how many local steps each one runs."""

from __future__ import annotations

import math

from fedtune.config import RunConfig
from fedtune.core.seeding import numpy_rng


def sample_clients(cfg: RunConfig, round: int) -> list[int]:
    """The sorted client ids of ``round``: a seeded draw without replacement (all when none is set)."""
    fed = cfg.federation
    if fed.sampled == fed.num_clients:
        return list(range(fed.num_clients))
    rng = numpy_rng(cfg.seed, "sample-clients", round)
    return sorted(int(c) for c in rng.choice(fed.num_clients, size=fed.sampled, replace=False))


def local_samples(cfg: RunConfig, num_samples: int) -> int | None:
    """With ``train.local_epochs``: the samples a client of ``num_samples`` trains on per round, whole passes over
    its data (1 epoch: each sample once, the last batch smaller); None without it (every step a full batch)."""
    if cfg.train.local_epochs is None:
        return None
    return max(1, round(cfg.train.local_epochs * num_samples))


def local_steps(cfg: RunConfig, num_samples: int) -> int:
    """``train.local_steps``, or the batches holding :func:`local_samples` (``train.local_epochs``)."""
    samples = local_samples(cfg, num_samples)
    return cfg.train.local_steps if samples is None else math.ceil(samples / cfg.train.batch_size)
