"""The split stream: one gRPC bidirectional stream per deployed split session, beside Flower's messages.

Flower carries round-level messages (seconds of overhead each); a split session exchanges messages every batch,
so its steps go over a stream of their own between the client's ClientApp (which dials out, as SuperNodes do) and
the split server inside the ServerApp's process. TLS with the SuperLink's certificate; the first frame must carry
the run's secret, which the client only gets inside its (authenticated, encrypted) Flower message, else the
stream is refused with ``UNAUTHENTICATED``.

A frame is a JSON header and a payload (a fedtune wire message or nothing): ``len(header)`` as 4 bytes, the header,
the payload. The server answers every request frame with one frame. gRPC's 4 MiB message limit is raised to
:data:`MAX_FRAME`.
"""

from __future__ import annotations

import hmac
import json
import queue
import struct
import threading
from concurrent import futures
from pathlib import Path
from typing import Callable

import grpc

from fedtune.core.errors import FedtuneError

METHOD = "/fedtune.SplitStream/Session"
MAX_FRAME = 1 << 30
OPTIONS = [("grpc.max_send_message_length", MAX_FRAME), ("grpc.max_receive_message_length", MAX_FRAME)]

#: ``handler(header, payload) -> (header, payload)`` for one opened session; built by ``open_session(hello)``.
Handler = Callable[[dict, bytes], tuple[dict, bytes]]


def pack(header: dict, payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":"), default=float).encode()
    return struct.pack(">I", len(head)) + head + payload


def unpack(frame: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack(">I", frame[:4])
    return json.loads(frame[4 : 4 + n]), frame[4 + n :]


class SplitStreamServer:
    """The split server: accepts sessions whose first frame carries ``secret``; ``open_session(hello)`` returns
    the handler of that session's frames (and raises to refuse it)."""

    def __init__(self, host: str, cert: Path, key: Path, secret: str, open_session: Callable[[dict], Handler],
                 log: Callable[[str], None] = print) -> None:
        self.secret, self.open_session, self.log = secret, open_session, log
        self.frames = {"up": 0, "down": 0}  # bytes of the frames the stream carried (payloads and headers)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=OPTIONS)
        handler = grpc.stream_stream_rpc_method_handler(self._session)
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "fedtune.SplitStream", {"Session": handler})])
        credentials = grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])
        self.port = self.server.add_secure_port(f"{host}:0" if ":" not in host else host, credentials)
        self.address = f"{host.rsplit(':', 1)[0] if ':' in host else host}:{self.port}"
        self.server.start()

    def _session(self, requests, context):
        frames = iter(requests)
        first = next(frames, None)
        if first is None:
            return
        self.frames["up"] += len(first)
        hello, _ = unpack(first)
        if not hmac.compare_digest(str(hello.get("secret", "")), self.secret):
            self.log(f"[red]split stream: refused a connection from {context.peer()} without this run's secret[/]")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "fedtune split stream: the run's secret is missing or "
                          "wrong (a client gets it in its Flower message for the session)")
        try:
            handle = self.open_session(hello)
        except FedtuneError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"fedtune split stream: {exc}")
        yield self._frame(pack({"ok": True}))
        for frame in frames:
            self.frames["up"] += len(frame)
            yield self._frame(pack(*handle(*unpack(frame))))

    def _frame(self, frame: bytes) -> bytes:
        self.frames["down"] += len(frame)
        return frame

    def stop(self) -> None:
        self.server.stop(grace=1.0).wait()


class SplitStreamClient:
    """A client's end of one session: ``call(header, payload)`` sends a frame and waits for the server's."""

    def __init__(self, address: str, ca_cert: bytes, hello: dict, server_name: str | None = None) -> None:
        options = list(OPTIONS)
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca_cert), options)
        self.requests: queue.Queue = queue.Queue()
        stream = self.channel.stream_stream(METHOD)
        self.replies = iter(stream(iter(self.requests.get, None)))
        self.lock = threading.Lock()
        self.call(hello)

    def call(self, header: dict, payload: bytes = b"") -> tuple[dict, bytes]:
        with self.lock:
            self.requests.put(pack(header, payload))
            try:
                return unpack(next(self.replies))
            except grpc.RpcError as exc:
                raise FedtuneError(f"split stream: {exc.code().name}: {exc.details()}") from None

    def close(self) -> None:
        self.requests.put(None)
        self.channel.close()
