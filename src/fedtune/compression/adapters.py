"""LoRA weights between a split client and the server, through a codec: downloads as they are, uploads as the
change from what the client downloaded (both sides know it, so only the change crosses).

The tensors of a state (in the order of the keys both sides derive from the cut) are laid end to end in groups of
:data:`~fedtune.compression.lowbit.GROUP` values, so a per-group codec scales every 64 consecutive weights on
their own; entropy coding then packs the message into one zstd frame. A coded message records, in its meta, the
size of the plain message it stands for, so the ledger reports reductions against it.
"""

from __future__ import annotations

import torch

from fedtune.comm.messages import UNCOMPRESSED_BYTES, Message, encode
from fedtune.compression import entropy
from fedtune.compression.codecs import CODECS
from fedtune.compression.lowbit import GROUP

TensorDict = dict[str, torch.Tensor]


class AdapterCoder:
    def __init__(self, codec: str, entropy_coder: str) -> None:
        self.name = codec
        self.codec = CODECS.get(codec)()
        self.entropy = entropy_coder

    @property
    def active(self) -> bool:
        return self.name != "none"

    def _flat(self, state: TensorDict, keys: list[str]) -> torch.Tensor:
        flat = torch.cat([state[k].detach().float().cpu().reshape(-1) for k in keys])
        return torch.nn.functional.pad(flat, (0, -len(flat) % GROUP)).reshape(-1, GROUP)

    def encode(self, kind: str, state: TensorDict, keys: list[str], meta: dict | None = None,
               start: TensorDict | None = None) -> Message:
        """``state``'s ``keys`` (less ``start``, when given) through the codec; as it is when the codec is 'none'."""
        plain = Message(kind, {k: state[k] for k in keys}, dict(meta or {}))
        if not self.active:
            return plain
        rows = self._flat(state, keys) - (self._flat(start, keys) if start is not None else 0)
        tensors = self.codec.encode(rows)
        if self.entropy == "zstd":
            tensors = entropy.pack(tensors)
        return Message(kind, tensors, {**plain.meta, UNCOMPRESSED_BYTES: len(encode(plain))})

    def decode(self, message: Message, template: TensorDict, keys: list[str],
               start: TensorDict | None = None) -> TensorDict:
        """The state ``message`` stands for; ``template`` gives each key's shape and dtype (and ``start`` what an
        upload's change is added to)."""
        if not self.active:
            return dict(message.tensors)
        flat = self.codec.decode(entropy.unpack(message.tensors)).float()
        if start is not None:
            flat = flat + self._flat(start, keys)
        flat, out, offset = flat.reshape(-1), {}, 0
        for k in keys:
            t = template[k]
            out[k] = flat[offset : offset + t.numel()].reshape(t.shape).to(t.dtype)
            offset += t.numel()
        return out

    def roundtrip(self, state: TensorDict, keys: list[str]) -> TensorDict:
        """What the receiver of a download of ``state`` decodes."""
        return self.decode(self.encode("client_adapter", state, keys), state, keys)
