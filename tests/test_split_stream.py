"""The split stream (issue 19): TLS with the run's certificates, refused without the run's secret, frames that
carry fedtune's wire messages unchanged (a real gRPC server on 127.0.0.1 with certificates the test makes)."""

from __future__ import annotations

import pytest

from fedtune.comm.messages import Message, decode, encode
from fedtune.core.errors import FedtuneError
from fedtune.deploy.credentials import make_credentials
from fedtune.runtime.split_stream import SplitStreamClient, SplitStreamServer, pack, unpack


@pytest.fixture
def served(tmp_path):
    creds = make_credentials(tmp_path / "creds", ["127.0.0.1"], 0)
    logs: list[str] = []
    opened: list[dict] = []

    def open_session(hello: dict):
        opened.append(hello)
        return lambda header, payload: ({"echo": header["op"]}, payload[::-1])

    server = SplitStreamServer("127.0.0.1", creds.server_cert, creds.server_key, "s3cret", open_session, logs.append)
    yield server, creds, logs, opened
    server.stop()


def test_frames_round_trip():
    header, payload = unpack(pack({"op": "step", "rows": [1, 2]}, b"\x00\x01payload"))
    assert header == {"op": "step", "rows": [1, 2]} and payload == b"\x00\x01payload"


def test_a_session_with_the_secret_carries_messages(served):
    server, creds, logs, opened = served
    client = SplitStreamClient(server.address, creds.ca_cert.read_bytes(), {"secret": "s3cret", "round": 1})
    import torch

    data = encode(Message("activations", {"h": torch.arange(6.0).reshape(2, 3)}))
    header, payload = client.call({"op": "step"}, data)
    client.close()
    assert header == {"echo": "step"} and payload == data[::-1]
    assert opened == [{"secret": "s3cret", "round": 1}] and not logs
    assert server.frames["up"] >= len(data) and server.frames["down"] >= len(data)
    assert decode(payload[::-1]).tensors["h"].sum() == 15


def test_a_stream_without_the_secret_is_refused_on_both_sides(served):
    server, creds, logs, opened = served
    with pytest.raises(FedtuneError, match="UNAUTHENTICATED.*secret"):
        SplitStreamClient(server.address, creds.ca_cert.read_bytes(), {"secret": "guess", "round": 1})
    assert not opened
    assert any("without this run's secret" in line for line in logs)


def test_a_client_that_does_not_trust_the_certificate_cannot_connect(served, tmp_path):
    server, _, _, opened = served
    other = make_credentials(tmp_path / "other", ["127.0.0.1"], 0)
    with pytest.raises(FedtuneError, match="UNAVAILABLE"):
        SplitStreamClient(server.address, other.ca_cert.read_bytes(), {"secret": "s3cret"})
    assert not opened
