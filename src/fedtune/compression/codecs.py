"""Value codecs for what crosses a split interface: each turns rows of a (n, d) tensor into wire tensors.

``none`` sends the rows as they are, ``fp16`` halves them, ``int8`` quantizes each row (token) with its own
absmax scale. A codec's ``roundtrip`` is what the receiver will hold, so both sides can agree on it.
"""

from __future__ import annotations

import torch

from fedtune.core.registry import Registry

CODECS: Registry[type["Codec"]] = Registry("codec")


class Codec:
    def encode(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def roundtrip(self, rows: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(rows)).to(rows.dtype)


@CODECS.register("none")
class Identity(Codec):
    def encode(self, rows):
        return {"values": rows}

    def decode(self, tensors):
        return tensors["values"]


@CODECS.register("fp16")
class Half(Codec):
    def encode(self, rows):
        return {"values": rows.to(torch.float16)}

    def decode(self, tensors):
        return tensors["values"].float()


@CODECS.register("int8")
class Int8PerRow(Codec):
    """Symmetric int8 with one float16 scale per row: 1 byte per value + 2 per row."""

    def encode(self, rows):
        scale = rows.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / 127.0
        scale = scale.to(torch.float16).float().clamp_min(6e-8)  # what the receiver will see
        q = torch.round(rows.float() / scale).clamp_(-127, 127).to(torch.int8)
        return {"q": q, "scale": scale.to(torch.float16)}

    def decode(self, tensors):
        return tensors["q"].float() * tensors["scale"].float()
