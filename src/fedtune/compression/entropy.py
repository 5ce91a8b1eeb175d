"""Entropy coding of what a compressed message carries: all its tensors as one zstandard frame.

The quantised payload of a low-bit codec is far from uniform (most values of a group sit near zero next to its
absmax), and the flags, sample ids, masks and labels beside it are small integers: one zstd frame of the whole
safetensors encoding takes them to close to their entropy. The message then carries that frame as a single uint8
tensor, so the ledger counts its real compressed size. Lossless: :func:`unpack` returns the tensors bit for bit.
"""

from __future__ import annotations

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FRAME = "zstd"  # the one tensor a packed message carries
LEVEL = 9  # zstd level: within a few per cent of level 19's size on these payloads, many times faster


def pack(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` as one zstd-compressed frame (a uint8 tensor under :data:`FRAME`)."""
    import zstandard

    data = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    frame = zstandard.ZstdCompressor(level=LEVEL).compress(data)
    return {FRAME: torch.frombuffer(bytearray(frame), dtype=torch.uint8)}


def is_packed(tensors: dict[str, torch.Tensor]) -> bool:
    return set(tensors) == {FRAME}


def unpack(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors :func:`pack` was given (a dict that is not packed is returned as it is)."""
    if not is_packed(tensors):
        return tensors
    import zstandard

    return st_load(zstandard.ZstdDecompressor().decompress(tensors[FRAME].numpy().tobytes()))
