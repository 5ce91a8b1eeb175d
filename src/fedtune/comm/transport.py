"""The one seam every client<->server message crosses: it serialises, records, and deserialises."""

from __future__ import annotations

from fedtune.comm.ledger import DOWN, UP, Ledger
from fedtune.comm.messages import UNCOMPRESSED_BYTES, Message, decode, encode


class Transport:
    """In-process transport: messages are really encoded to bytes and decoded on the other side.

    The ledger records ``len(encoded)`` for every message, so byte counts are measured, not estimated. A message's
    uncompressed equivalent (the baseline of reductions) is ``baseline`` when given, else the size a coded message
    records in its meta (:data:`~fedtune.comm.messages.UNCOMPRESSED_BYTES`), else the message itself.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def _carry(self, message: Message, round: int, client: int, direction: str, baseline: Message | None) -> Message:
        return decode(self.send(message, round=round, client=client, direction=direction, baseline=baseline))

    def send(self, message: Message, *, round: int, client: int, direction: str,
             baseline: Message | None = None, retransmit: bool = False) -> bytes:
        """Encode and record a message whose other end is in another process; returns the bytes to ship.

        (The Ray backend: the driver encodes a download here and ships these bytes to the worker.) ``retransmit``:
        the message is sent again (a lost turn's download, resent by its retry), marked so in the ledger."""
        data = encode(message)
        base = len(encode(baseline)) if baseline is not None and baseline is not message else None
        base = base if base is not None else message.meta.get(UNCOMPRESSED_BYTES)
        self.ledger.record(round, client, direction, message.kind, len(data), base, retransmit=retransmit)
        return data

    def receive(self, data: bytes, *, round: int, client: int, direction: str,
                baseline_bytes: int | None = None) -> Message:
        """Record and decode bytes that arrived from another process (the Ray backend: a worker's upload)."""
        message = decode(data)
        message.wire = data
        base = baseline_bytes if baseline_bytes is not None else message.meta.get(UNCOMPRESSED_BYTES)
        self.ledger.record(round, client, direction, message.kind, len(data), base)
        return message

    def upload(self, message: Message, *, round: int, client: int, baseline: Message | None = None) -> Message:
        """Client -> server. ``baseline``: the uncompressed message this one stands for (for reductions)."""
        return self._carry(message, round, client, UP, baseline)

    def download(self, message: Message, *, round: int, client: int, baseline: Message | None = None) -> Message:
        """Server -> client."""
        return self._carry(message, round, client, DOWN, baseline)
