"""The Ray backend's split-session endpoints: the driver's ends of a client worker's and the server worker's halves.

They implement :class:`~fedtune.split.protocol.ClientEndpoint` and ``ServerEndpoint``: each call runs one side's
step on its worker; what a worker sends comes back as bytes, which the driver's transport records (with the
uncompressed size the sending side measured) and decodes, and which travel on to the other worker as they came.
The random generator's state is handed from side to side with the messages (a ``baton``), so the forward passes
draw dropout exactly as in process.
"""

from __future__ import annotations

from typing import Any

from fedtune.comm.ledger import DOWN, UP
from fedtune.comm.messages import Message, wire_bytes
from fedtune.core.errors import ServerLostError
from fedtune.runtime.base import ClientLost
from fedtune.split.protocol import ClientResult, ServerResult, StepInfo


class RayClient:
    """The driver's end of a client worker's split session."""

    def __init__(self, backend, slot, round: int, cid: int, baton: dict) -> None:
        self.b, self.slot, self.round, self.cid, self.baton = backend, slot, round, cid, baton

    def call(self, method: str, *args) -> Any:
        return self.b.call(self.slot, method, *args, round=self.round)

    def _up(self, data: bytes, baseline: int | None) -> Message:
        return self.b.ctx.transport.receive(data, round=self.round, client=self.cid, direction=UP,
                                            baseline_bytes=baseline)

    def forward(self) -> tuple[Message, StepInfo]:
        data, baseline, info, self.baton["rng"] = self.call("split_client_forward", self.baton["rng"])
        return self._up(data, baseline), info

    def tail(self, body: Message) -> tuple[Message, float]:
        data, baseline, loss, self.baton["rng"] = self.call("split_client_tail", wire_bytes(body), self.baton["rng"])
        return self._up(data, baseline), loss

    def backward(self, grads: Message) -> Message | None:
        data = self.call("split_client_backward", wire_bytes(grads))
        return None if data is None else self._up(data, None)

    def abort(self) -> None:
        self.call("split_client_abort")

    def release(self) -> None:
        """Free the worker of a session that cannot go on (the server's worker was lost), for the next run."""
        if self.b.pool.slots[self.slot.index] is not self.slot:  # this worker was lost already (and replaced)
            return
        try:
            self.abort()
        except ClientLost:  # it is lost now
            return
        self.slot.state = "idle"

    def finish(self, failure: str | None, mean_loss: float) -> ClientResult:
        data, memory, stream, report = self.call("split_client_finish", failure, mean_loss)
        self.slot.state = "idle"
        return ClientResult(self._up(data, None), memory, stream, report)


class RayServer:
    """The driver's end of the server worker's half of a session (if the worker is lost, the client's is freed)."""

    def __init__(self, backend, slot, round: int, cid: int, baton: dict, channels, client: RayClient) -> None:
        self.b, self.slot, self.round, self.cid, self.baton = backend, slot, round, cid, baton
        self.channels = channels  # the driver's: its caches are those of the last complete round
        self.client = client

    def call(self, method: str, *args) -> Any:
        try:
            return self.b.call(self.slot, method, *args, round=self.round)
        except ServerLostError:
            self.client.release()
            raise

    def _down(self, data: bytes, baseline: int | None) -> Message:
        return self.b.ctx.transport.receive(data, round=self.round, client=self.cid, direction=DOWN,
                                            baseline_bytes=baseline)

    def step(self, up: Message, info: StepInfo) -> tuple[Message, float]:
        data, baseline, loss, self.baton["rng"] = self.call("split_server_step", wire_bytes(up), info["rows"],
                                                            info["epoch"], self.baton["rng"])
        return self._down(data, baseline), loss

    def forward(self, up: Message, info: StepInfo) -> Message:
        data, baseline, self.baton["rng"] = self.call("split_server_forward", wire_bytes(up), info["rows"],
                                                      info["epoch"], self.baton["rng"])
        return self._down(data, baseline)

    def backward(self, tail_grads: Message) -> Message:
        return self._down(*self.call("split_server_backward", wire_bytes(tail_grads)))

    def abort(self, lost: bool = False) -> None:
        """Drop the pending step; a lost session also resets this client's server caches to the driver's (its
        session in this round has not been merged there), so a retry starts from where this one did."""
        self.call("split_server_abort")
        if lost:
            self.call("split_server_load_caches", self.channels.export_caches("server", self.cid), self.cid)

    def finish(self) -> ServerResult:
        body, memory, report = self.call("split_server_finish")
        return ServerResult(body, memory, report)
