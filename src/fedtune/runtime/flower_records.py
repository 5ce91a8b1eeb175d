"""How a client's turn travels in a Flower message (``runtime.backend = "flower"``): one ``ConfigRecord`` each way.

The turn request carries the round, the client, the run's token (it names the client's state directory for this
run), the download as fedtune's wire bytes (exactly what the ledger records) and the server's instructions for the
turn (the turn state less the paradigm's ``private_state``), as JSON. The reply carries the upload's wire bytes, the
client's non-private state and its statistics, as JSON, and any private state the server evaluates
(``ClientJob.state[DISCLOSE]``) as a wire message. No pickles cross the network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from fedtune.comm.messages import Message, decode, encode

RECORD = "fedtune"
HELLO = "fedtune.hello"  # a query message: which client (node config partition-id) a SuperNode serves


@dataclass
class TurnRequest:
    round: int
    client: int
    token: str
    download: bytes | None
    directives: dict
    session: dict | None = None  # split learning: the split stream's address, the run's secret and its CA


@dataclass
class TurnReply:
    upload: bytes
    state: dict
    stats: dict
    disclosed: bytes | None = None  # private state the server evaluates (:func:`pack_state`)


def pack_state(state: dict[str, dict]) -> bytes:
    """Turn-state entries that are tensor dicts (an adapter), as one fedtune wire message."""
    tensors = {f"{key}/{name}": t for key, value in state.items() for name, t in value.items()}
    return encode(Message("disclosed_state", tensors, {"keys": sorted(state)}))


def unpack_state(data: bytes) -> dict[str, dict]:
    message = decode(data)
    state: dict[str, dict] = {key: {} for key in message.meta["keys"]}
    for full, tensor in message.tensors.items():
        key, name = full.split("/", 1)
        state[key][name] = tensor
    return state


def _json(value: dict) -> str:
    return json.dumps(value, sort_keys=True, default=float)


def request_record(request: TurnRequest) -> dict:
    record = {"round": request.round, "client": request.client, "token": request.token,
              "directives": _json(request.directives)}
    if request.download is not None:
        record["download"] = request.download
    if request.session is not None:
        record["session"] = _json(request.session)
    return record


def read_request(record) -> TurnRequest:
    session = json.loads(record["session"]) if "session" in record else None
    return TurnRequest(int(record["round"]), int(record["client"]), str(record["token"]),
                       record.get("download"), json.loads(record["directives"]), session)


def reply_record(reply: TurnReply) -> dict:
    record = {"upload": reply.upload, "state": _json(reply.state), "stats": _json(reply.stats)}
    if reply.disclosed is not None:
        record["disclosed"] = reply.disclosed
    return record


def read_reply(record) -> TurnReply:
    return TurnReply(record["upload"], json.loads(record["state"]), json.loads(record["stats"]),
                     record.get("disclosed"))
