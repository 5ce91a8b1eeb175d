"""Deployed split sessions, the client's half: the ClientApp drives its session over the split stream.

The client runs :func:`~fedtune.split.driver.drive_session` itself, between its own :class:`ClientSide` (wrapped as
:class:`StreamedClient`) and :class:`RemoteServer`, the split server's end reached through the stream: one round
trip per step (two in U-shape, as its protocol has). Each frame up carries the message's uncompressed size (for
the server's ledger) and the random generator's state, which comes back with the reply, so the draws are the
simulation's. Its reuse caches stay on this machine with its stream position (:mod:`fedtune.deploy.client_state`).
"""

from __future__ import annotations

import time

from fedtune.comm.messages import Message, decode, encode, wire_bytes
from fedtune.runtime.flower_split import rng_to_bytes, split_rng
from fedtune.runtime.split_stream import SplitStreamClient
from fedtune.split.driver import drive_session
from fedtune.split.protocol import StepInfo, failed
from fedtune.split.session import ClientSide, rng_state, set_rng_state


def _size(message: Message, baseline: Message | None) -> int | None:
    return None if baseline is None or baseline is message else len(encode(baseline))


class StreamedClient:
    """The client's own side as a :class:`~fedtune.split.protocol.ClientEndpoint`; a step failure it produces is
    sent to the server (it crosses, as in simulation) before the driver stops the session."""

    def __init__(self, side: ClientSide, stream: SplitStreamClient) -> None:
        self.side, self.stream = side, stream
        self.baseline: int | None = None  # the uncompressed size of the message just produced

    def _report_failure(self, message: Message) -> None:
        if failed(message):
            self.stream.call({"op": "failure"}, encode(message))

    def forward(self) -> tuple[Message, StepInfo]:
        message, baseline, info = self.side.forward()
        self.baseline = _size(message, baseline)
        return message, info

    def tail(self, body: Message) -> tuple[Message, float]:
        message, baseline, loss = self.side.tail(body)
        self.baseline = _size(message, baseline)
        self._report_failure(message)
        return message, loss

    def backward(self, grads: Message) -> Message | None:
        failure = self.side.backward(grads)
        if failure is not None:
            self._report_failure(failure)
        return failure

    def abort(self) -> None:
        self.side.abort()

    def finish(self, failure, mean_loss):  # the session's end travels in the Flower reply, not here
        raise NotImplementedError


class RemoteServer:
    """The split server's end of the session, over the stream (:class:`~fedtune.split.protocol.ServerEndpoint`)."""

    def __init__(self, stream: SplitStreamClient, client: StreamedClient, device) -> None:
        self.stream, self.client, self.device = stream, client, device
        #: Per exchange: [seconds from encoding the message to the reply decoded, of which on the stream (the
        #: frame handed to gRPC until the reply frame unpacked), of which the server handled the frame, message
        #: bytes up, bytes down] (bench/deploy_bench.py compares the stream's share less the server's with a bare
        #: gRPC round trip of the same message bytes).
        self.exchanges: list[list[float]] = []

    def _call(self, op: str, message: Message, **header) -> tuple[dict, Message]:
        start = time.perf_counter()
        state, sizes = rng_to_bytes(rng_state(self.device))
        data = wire_bytes(message)
        sent = time.perf_counter()
        reply, payload = self.stream.call({"op": op, "baseline": self.client.baseline, "rng": sizes, **header},
                                          state + data)
        received = time.perf_counter()
        state, payload = split_rng(reply, payload)
        set_rng_state(state, self.device)
        down = decode(payload)
        self.exchanges.append([time.perf_counter() - start, received - sent, reply["server_s"], len(data),
                               len(payload)])
        return reply, down

    def step(self, up: Message, info: StepInfo) -> tuple[Message, float]:
        reply, down = self._call("step", up, rows=info["rows"], epoch=info["epoch"])
        return down, reply["loss"]

    def forward(self, up: Message, info: StepInfo) -> Message:
        return self._call("forward", up, rows=info["rows"], epoch=info["epoch"])[1]

    def backward(self, tail_grads: Message) -> Message:
        return self._call("backward", tail_grads)[1]

    def abort(self, lost: bool = False) -> None:
        self.stream.call({"op": "abort"})

    def finish(self):  # the server finishes its side when the client's Flower reply arrives
        raise NotImplementedError


def run_session(side: ClientSide, ticket: dict, hello: dict, steps: int, num_layers: int, cost) -> tuple:
    """Drive the session over the stream named by ``ticket``: (the driver's ``SessionSteps``, the exchanges'
    timings, :attr:`RemoteServer.exchanges`)."""
    stream = SplitStreamClient(ticket["address"], ticket["ca"].encode(), {**hello, "secret": ticket["secret"]})
    try:
        client = StreamedClient(side, stream)
        server = RemoteServer(stream, client, side.device)
        run = drive_session(client, server, steps=steps, cut=side.cut, num_layers=num_layers, cost=cost)
        return run, server.exchanges
    finally:
        stream.close()
