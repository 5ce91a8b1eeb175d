"""Messages exchanged between clients and the server, and their wire encoding.

A message is a kind, a dict of tensors and a small JSON-serialisable ``meta`` dict. It is encoded
with safetensors (tensors) plus the meta as a JSON string in the safetensors header, so the bytes
the ledger counts are exactly the bytes a real deployment would send.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

#: Meta key of a coded message: the bytes of the plain message it stands for (the ledger's baseline for it).
UNCOMPRESSED_BYTES = "uncompressed_bytes"


@dataclass
class Message:
    """One client<->server message: ``kind`` names the payload (e.g. 'global_adapter')."""

    kind: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    #: The bytes this message arrived as, when it came from another process (:meth:`Transport.receive`), so that
    #: relaying it on to a third process needs no second encoding.
    wire: bytes | None = field(default=None, compare=False, repr=False)


def wire_bytes(message: Message) -> bytes:
    """The message's encoding: the bytes it arrived as, if it arrived from another process."""
    return message.wire if message.wire is not None else encode(message)


def encode(message: Message) -> bytes:
    """Serialise a message to bytes (safetensors with a JSON header entry)."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in message.tensors.items()}
    header = {"kind": message.kind, "meta": json.dumps(message.meta, sort_keys=True)}
    return st_save(tensors, metadata=header)


def decode(data: bytes) -> Message:
    """Inverse of :func:`encode`."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    meta = header.get("__metadata__", {})
    return Message(kind=meta["kind"], tensors=st_load(data), meta=json.loads(meta["meta"]))
