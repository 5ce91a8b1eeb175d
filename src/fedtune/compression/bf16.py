"""The ``bf16`` codec: what crosses the cut in bfloat16, half the bytes of float32 with float32's range.

fp16 saturates at 65504, which large activations or early gradients can reach; bfloat16 keeps the exponent of
float32 and drops mantissa bits instead. (The worked example of adding a codec: README, "Extending fedtune".)
"""

from __future__ import annotations

import torch

from fedtune.compression.codecs import CODECS, Codec


@CODECS.register("bf16")
class BFloat16(Codec):
    def encode(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"values": rows.to(torch.bfloat16)}

    def decode(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return tensors["values"].float()
