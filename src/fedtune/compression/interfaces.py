"""One direction of one split interface (activations up, body outputs down, gradients up and down).

``send`` builds the message that crosses (and the uncompressed message the same step would have sent, so the
ledger can report reductions against the run's own uncompressed equivalent); ``receive`` rebuilds the
(B, T, d) tensor on the other side. Without codec, reuse or entropy coding the message is the padded tensor as it
is. The stages compose in this order: reuse decides which samples cross, a changed sample crosses as a residual
against the held copy (``residual``) or plus its error feedback (``error_feedback``), the codec quantises, and
entropy coding packs the whole message (payload, flags and what rides along: mask, labels) into one zstd frame.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedtune.comm.messages import Message
from fedtune.compression import entropy
from fedtune.compression.codecs import CODECS, Codec
from fedtune.compression.feedback import ErrorFeedback
from fedtune.compression.reuse import ReuseReceiver, ReuseSender


@dataclass
class InterfaceSettings:
    kind: str  # message kind, e.g. "activations"
    field: str  # tensor name in the message, e.g. "hidden" or "grad"
    codec: str = "none"
    reuse: bool = False
    metric: str = "cosine"
    projection_dim: int = 64
    cache_dtype: torch.dtype = torch.float16
    receiver_budget_bytes: int | None = None
    residual: bool = False
    error_feedback: bool = False  # only without reuse (a residual against the held copy feeds back already)
    entropy: str = "none"  # "zstd": the whole message as one zstd frame
    resend_budget: float | None = None  # re-sends capped at this share of the uncompressed bytes (a credit)


@dataclass
class ReuseCounts:
    """Samples uploaded vs offered, in total and per data epoch of the sending client."""

    sent: int = 0
    total: int = 0
    by_epoch: dict[int, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))

    def add(self, sent: int, total: int, epoch: int) -> None:
        self.sent += sent
        self.total += total
        self.by_epoch[epoch][0] += sent
        self.by_epoch[epoch][1] += total

    @property
    def ratio(self) -> float:
        return self.sent / self.total if self.total else 1.0


def _lengths(mask: torch.Tensor) -> list[int]:
    return [int(n) for n in mask.sum(dim=1).tolist()]


class Interface:
    def __init__(self, settings: InterfaceSettings, d_model: int, seed: int, spill_dir: Path) -> None:
        self.s = settings
        self.codec: Codec = CODECS.get(settings.codec)()
        self.compressed = settings.codec != "none" or settings.reuse or settings.entropy != "none"
        if settings.error_feedback and settings.reuse:
            raise ValueError(f"{settings.kind}: error feedback is for interfaces sent every step; with reuse, send "
                             "changed samples as residuals against the held copy instead")
        self.feedback = ErrorFeedback(spill_dir / f"{settings.kind}-feedback") if settings.error_feedback else None
        self.sender = self.receiver = None
        if settings.reuse:
            self.sender = ReuseSender(d_model, settings.projection_dim, seed, settings.metric, settings.residual,
                                      settings.cache_dtype, spill_dir / f"{settings.kind}-sender")
            self.receiver = ReuseReceiver(settings.cache_dtype, settings.receiver_budget_bytes,
                                          spill_dir / f"{settings.kind}-receiver")
        self.counts = ReuseCounts()

    # -- sender -----------------------------------------------------------------------------
    def send(self, client: int, sample_ids: list[int], x: torch.Tensor, mask: torch.Tensor, extra: dict,
             theta: float, epoch: int) -> tuple[Message, Message]:
        """(message, uncompressed equivalent) for the batch ``x`` (B, T, d) of samples ``sample_ids``."""
        x = x.detach().cpu()
        plain = Message(self.s.kind, {self.s.field: x, **extra})
        if not self.compressed:
            self.counts.add(len(sample_ids), len(sample_ids), epoch)
            return plain, plain
        lengths = _lengths(mask)
        rows = [x[i, :n] for i, n in enumerate(lengths)]
        keys = [(client, sid) for sid in sample_ids]
        if self.sender is not None:
            decision = self.sender.decide(keys, rows, theta, self._resend_cost if self.s.resend_budget else None,
                                          self.s.resend_budget)
        else:
            decision = None
        sent = decision.sent if decision else [True] * len(rows)
        residual = decision.residual if decision else [False] * len(rows)
        wire_rows, wire_keys, meant, references = [], [], [], []
        for key, r, is_sent, is_res in zip(keys, rows, sent, residual):
            if not is_sent:
                continue
            reference = self.sender.reference(key) if is_res else None
            wire = r - reference if is_res else r
            wire_rows.append(self.feedback.corrected(key, wire) if self.feedback is not None else wire)
            wire_keys.append(key)
            meant.append(r)
            references.append(reference)
        d = x.shape[-1]
        payload = self.codec.encode(torch.cat(wire_rows) if wire_rows else x.new_zeros(0, d))
        if self.sender is not None or self.feedback is not None:
            self._remember(wire_keys, wire_rows, meant, references, self.codec.decode(payload))
        tensors = {f"{self.s.field}.{k}": v for k, v in payload.items()}
        tensors |= {"sample_ids": torch.tensor(sample_ids, dtype=torch.int32),
                    "sent": torch.tensor(sent, dtype=torch.bool), "residual": torch.tensor(residual, dtype=torch.bool)}
        self.counts.add(sum(sent), len(sent), epoch)
        tensors = {**tensors, **extra}
        if self.s.entropy == "zstd":
            tensors = entropy.pack(tensors)
        return Message(self.s.kind, tensors), plain

    def _resend_cost(self, row: torch.Tensor) -> int:
        """The coded bytes of one sample's rows, before entropy coding (zstd only shrinks them)."""
        return sum(t.numel() * t.element_size() for t in self.codec.encode(row).values())

    def _remember(self, keys: list, wire_rows: list[torch.Tensor], meant: list[torch.Tensor],
                  references: list[torch.Tensor | None], decoded: torch.Tensor) -> None:
        """After a send, from what the receiver will decode: the reuse sender's record of what the receiver holds,
        and what error feedback carries to each sample's next send."""
        offset = 0
        for key, wire, r, reference in zip(keys, wire_rows, meant, references):
            received = decoded[offset : offset + len(wire)]
            offset += len(wire)
            if self.sender is not None:
                held = received + reference if reference is not None else received
                self.sender.commit(key, r, held.to(self.s.cache_dtype))
            if self.feedback is not None:
                self.feedback.keep(key, wire, received)

    # -- receiver ---------------------------------------------------------------------------
    def open(self, message: Message) -> Message:
        """The message with its tensors as sent (an entropy-coded message unpacked; any other as it is)."""
        if not entropy.is_packed(message.tensors):
            return message
        return Message(message.kind, entropy.unpack(message.tensors), message.meta)

    def receive(self, client: int, message: Message, mask: torch.Tensor) -> torch.Tensor:
        """The (B, T, d) tensor the message stands for (pads are zeros), updating the receiver's cache."""
        if not self.compressed:
            return message.tensors[self.s.field]
        t = self.open(message).tensors
        prefix = f"{self.s.field}."
        decoded = self.codec.decode({k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}).float()
        lengths = _lengths(mask)
        B, T = mask.shape
        out = torch.zeros(B, T, decoded.shape[-1])
        offset = 0
        for i, (sid, n) in enumerate(zip(t["sample_ids"].tolist(), lengths)):
            key = (client, int(sid))
            if bool(t["sent"][i]):
                rows = decoded[offset : offset + n]
                offset += n
                if bool(t["residual"][i]):
                    rows = rows + self.receiver.reuse(key)
                if self.receiver is not None:
                    self.receiver.accept(key, rows)
            else:
                rows = self.receiver.reuse(key)
            out[i, :n] = rows
        return out

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "sender": self.sender.state_dict() if self.sender else {},
            "receiver": self.receiver.state_dict() if self.receiver else {},
            "feedback": self.feedback.state_dict() if self.feedback else {},
            "counts": {"sent": self.counts.sent, "total": self.counts.total,
                       "by_epoch": {str(e): v for e, v in self.counts.by_epoch.items()}},
        }

    def load_state_dict(self, state: dict) -> None:
        if self.sender:
            self.sender.load_state_dict(state["sender"])
            self.receiver.load_state_dict(state["receiver"])
        if self.feedback:
            self.feedback.load_state_dict(state["feedback"])
        c = state["counts"]
        self.counts = ReuseCounts(int(c["sent"]), int(c["total"]))
        for e, v in c["by_epoch"].items():
            self.counts.by_epoch[int(e)] = [int(v[0]), int(v[1])]
