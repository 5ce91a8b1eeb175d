"""Deployed split sessions, the server's half: the split server in the ServerApp's process.

The client's ClientApp drives its session (:mod:`fedtune.deploy.split_client`): per step it sends its activations
over the split stream (:mod:`fedtune.runtime.split_stream`) and gets the gradients back, one round trip, as a bare
gRPC exchange would. Here each frame is handed to the session's :class:`~fedtune.split.session.ServerSide`, which
runs on the run's own model and channels (as in process), and every message is recorded by the run's transport:
the client's as they arrive, the server's as they leave, so the ledger equals the simulation's. The random
generator's state travels with the frames (its raw bytes lead the payload; ``rng`` in the header holds their
lengths), so dropout draws are the simulation's too.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fedtune.comm.ledger import DOWN, UP
from fedtune.core.errors import FedtuneError
from fedtune.runtime.split_stream import SplitStreamServer
from fedtune.split.session import open_server_side, rng_state, set_rng_state


#: The generators a side hands on, in the order their raw states lead a frame's payload.
_GENERATORS = ("cpu", "cuda")


def rng_to_bytes(state: dict) -> tuple[bytes, list[int]]:
    """A generator state (:func:`~fedtune.split.session.rng_state`) as raw bytes and each generator's length: it
    leads the frame's payload (``header["rng"]`` holds the lengths), so a step's frame carries no encoded copy."""
    parts = [state[name].cpu().numpy().tobytes() for name in _GENERATORS if name in state]
    return b"".join(parts), [len(part) for part in parts]


def rng_from_bytes(data: bytes, sizes: list[int]) -> dict:
    state, at = {}, 0
    for name, size in zip(_GENERATORS, sizes):
        state[name] = torch.frombuffer(bytearray(data[at : at + size]), dtype=torch.uint8)
        at += size
    return state


def split_rng(header: dict, payload: bytes) -> tuple[dict | None, bytes]:
    """A frame's payload as (the generator state it leads with, or None; the message's bytes)."""
    sizes = header.get("rng")
    if sizes is None:
        return None, payload
    size = sum(sizes)
    return rng_from_bytes(payload[:size], sizes), payload[size:]


@dataclass(frozen=True)
class SplitSettings:
    """Where the split server listens and how clients reach it (the app's run config)."""

    host: str  # address to listen on, HOST or HOST:PORT (no port: a free one), e.g. 0.0.0.0:9443
    advertise: str  # the host clients dial (a name or address in the certificate)
    cert: Path
    key: Path
    ca: Path  # the certificate authority clients verify the split server with (sent inside their Flower message)


class ServerSession:
    """One client's session on the split server."""

    def __init__(self, trainer, transport, job, body) -> None:
        self.side = open_server_side(trainer, job, body)
        self.transport, self.round, self.cid = transport, job.round, job.client
        self.device = trainer.ctx.device

    def _up(self, payload: bytes, header: dict):
        return self.transport.receive(payload, round=self.round, client=self.cid, direction=UP,
                                      baseline_bytes=header.get("baseline"))

    def _down(self, message, baseline, rng: bool = False, **header) -> tuple[dict, bytes]:
        """The reply frame; ``rng``: led by the generator state, which the client continues from."""
        data = self.transport.send(message, round=self.round, client=self.cid, direction=DOWN, baseline=baseline)
        if not rng:
            return header, data
        state, sizes = rng_to_bytes(rng_state(self.device))
        return {**header, "rng": sizes}, state + data

    def handle(self, header: dict, payload: bytes) -> tuple[dict, bytes]:
        """One frame of the session; the reply's header says how long the server computed (``server_s``)."""
        start = time.perf_counter()
        reply, data = self._handle(header, payload)
        return {**reply, "server_s": time.perf_counter() - start}, data

    def _handle(self, header: dict, payload: bytes) -> tuple[dict, bytes]:
        op = header["op"]
        state, payload = split_rng(header, payload)
        set_rng_state(state, self.device)
        if op == "step":
            message, baseline, loss = self.side.step(self._up(payload, header), header["rows"], header["epoch"])
            return self._down(message, baseline, rng=True, loss=loss)
        if op == "forward":
            message, baseline = self.side.forward(self._up(payload, header), header["rows"], header["epoch"])
            return self._down(message, baseline, rng=True)
        if op == "backward":
            return self._down(*self.side.backward(self._up(payload, header)))
        if op == "failure":  # the client's step failure notice (recorded as it crossed), then the session stops
            self._up(payload, header)
            return {}, b""
        if op == "abort":
            self.side.abort()
            return {}, b""
        raise FedtuneError(f"split stream: unknown operation {op!r}")


class SplitHost:
    """The split server and the session each client is expected to open."""

    def __init__(self, settings: SplitSettings, log) -> None:
        self.settings, self.log = settings, log
        self.secret = secrets.token_hex(32)
        self.sessions: dict[tuple[int, int], ServerSession] = {}
        self.lock = threading.Lock()
        self.server = SplitStreamServer(settings.host, settings.cert, settings.key, self.secret, self._open, log)
        self.address = f"{settings.advertise.rsplit(':', 1)[0]}:{self.server.port}"  # the host, the bound port

    def expect(self, session: ServerSession) -> None:
        with self.lock:
            self.sessions[(session.round, session.cid)] = session

    def drop(self, round: int, cid: int) -> ServerSession | None:
        with self.lock:
            return self.sessions.pop((round, cid), None)

    def _open(self, hello: dict):
        with self.lock:
            session = self.sessions.get((int(hello["round"]), int(hello["client"])))
        if session is None:
            raise FedtuneError(f"no session of client {hello.get('client')} in round {hello.get('round')} is open")
        return session.handle

    def ticket(self) -> dict:
        """What a client needs to open its session: the address, the secret and the CA to verify the server with."""
        return {"address": self.address, "secret": self.secret, "ca": self.settings.ca.read_text()}

    def close(self) -> None:
        self.server.stop()
