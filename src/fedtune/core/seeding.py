"""Seeds derived from (run seed, purpose, round, client, ...).

Every random choice draws from a generator derived from the run seed and the coordinates of the
choice, never from history. A resumed run therefore makes exactly the choices an uninterrupted run
makes, with no global RNG state to save.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed determined by ``seed`` and the ``keys`` (strings hashed stably with CRC32)."""
    words = [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return int(np.random.SeedSequence([seed, *words]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def numpy_rng(seed: int, *keys: int | str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))


def seed_torch(seed: int, *keys: int | str) -> None:
    """Seed torch's global generators (CPU and CUDA) for what runs next, e.g. LoRA dropout."""
    torch.manual_seed(derive_seed(seed, *keys))
