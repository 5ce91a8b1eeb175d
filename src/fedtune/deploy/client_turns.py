"""The ClientApp a SuperNode runs for a deployed fedtune run: it says which client it is, and trains its turns.

Node config (``flower-supernode --node-config '...'``), read by :class:`NodeSettings`:

- ``partition-id``: the client this SuperNode is (0..num_clients-1); seeds derive from it, as in simulation;
- ``data-path``: the client's own data file (JSONL/CSV/parquet; ``fedtune partition`` writes laboratory ones);
- ``public-path``: KD only, the public set's file;
- ``eval-path``: KD only, the held-out file the client evaluates its own adapter on (its ``client_eval_loss``);
- ``state-dir``: where the client keeps its private state between turns (default: ``fedtune-state`` beside the
  data file);
- ``data-<field>``: overrides of the run's ``[data]`` field mapping for this file (``data-prompt-field="q"``).

Each turn builds the client's copy of the run (:func:`~fedtune.engine.client_copy.build_client_copy`; Flower starts
a fresh ClientApp process per message), loads its private state, trains, saves the new private state and replies
with the upload.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fedtune.comm.messages import decode, encode
from fedtune.config import RunConfig
from fedtune.core.errors import ConfigError
from fedtune.deploy.client_state import ClientStateStore
from fedtune.deploy.split_client import run_session
from fedtune.engine.client_copy import build_client_copy
from fedtune.runtime.base import DISCLOSE, ClientJob
from fedtune.runtime.flower_records import (
    HELLO,
    RECORD,
    TurnReply,
    TurnRequest,
    pack_state,
    read_request,
    reply_record,
)
from fedtune.runtime.flower_secagg import SECAGG_CONFIGS
from fedtune.split.session import open_client_side

_KNOWN = ("partition-id", "data-path", "public-path", "eval-path", "state-dir")


@dataclass(frozen=True)
class NodeSettings:
    client: int
    data_path: Path
    public_path: Path | None
    eval_path: Path | None
    state_dir: Path
    data_overrides: dict

    @classmethod
    def from_node_config(cls, node_config) -> "NodeSettings":
        config = dict(node_config)
        for key in ("partition-id", "data-path"):
            if key not in config:
                raise ConfigError(f"this SuperNode's node config has no {key!r}: start it with --node-config "
                                  "'partition-id=K data-path=\"/path/to/client-K.jsonl\"'")
        data_path = Path(str(config["data-path"])).expanduser()
        overrides = {k[len("data-"):].replace("-", "_"): v for k, v in config.items()
                     if k.startswith("data-") and k not in _KNOWN}
        state_dir = Path(str(config.get("state-dir") or data_path.parent / "fedtune-state")).expanduser()
        public, evals = config.get("public-path"), config.get("eval-path")
        return cls(int(config["partition-id"]), data_path, Path(str(public)).expanduser() if public else None,
                   Path(str(evals)).expanduser() if evals else None, state_dir, overrides)


def hello_reply(node_config) -> dict:
    """What a SuperNode answers the server's discovery query with."""
    return {"partition-id": NodeSettings.from_node_config(node_config).client}


def train_turn(cfg: RunConfig, node: NodeSettings, record) -> dict:
    """One client turn from the server's request record; returns the reply record."""
    return reply_record(client_turn(cfg, node, read_request(record)))


def client_turn(cfg: RunConfig, node: NodeSettings, request: TurnRequest) -> TurnReply:
    """One client turn: build the client's copy, load its private state, train, keep the new private state."""
    if request.client != node.client:
        raise ConfigError(f"the server sent client {request.client}'s turn to the SuperNode of partition-id "
                          f"{node.client}")
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    ctx, paradigm = build_client_copy(cfg, node.client, node.data_path, public_path=node.public_path,
                                      eval_path=node.eval_path, data_overrides=node.data_overrides)
    private = paradigm.private_state
    store = ClientStateStore(node.state_dir, request.token)
    own = store.load_before(request.round)
    if own is None:  # first turn in this run: the copy's paradigm holds every client's initial state
        own = paradigm.client_private_state(node.client)
    download = decode(request.download) if request.download is not None else None
    job = ClientJob(request.round, node.client, download, {**request.directives, **own})
    if request.session is not None:
        return _split_turn(ctx, paradigm.trainer, job, request.session, store, request.token)
    reply = paradigm.run_client(job)
    store.save(request.round, {k: v for k, v in reply.state.items() if k in private})
    shared = {k: v for k, v in reply.state.items() if k not in private}
    shown = {k: reply.state[k] for k in job.state.get(DISCLOSE, ()) if k in reply.state}
    return TurnReply(encode(reply.upload), shared, reply.stats, pack_state(shown) if shown else None)


def _split_turn(ctx, trainer, job: ClientJob, ticket: dict, store: ClientStateStore, token: str) -> TurnReply:
    """A split session driven from here; its reuse caches are loaded from and saved to the state directory."""
    caches = job.state.pop("caches", None)
    if caches is not None:
        trainer.channels.load_caches("client", caches)
    side = open_client_side(trainer, job)
    hello = {"round": job.round, "client": job.client, "token": token}
    run, exchanges = run_session(side, ticket, hello, job.state["steps"], trainer.num_layers, ctx.cost)
    message, memory, stream = side.finish(run.failure, run.mean_loss)
    store.save(job.round, {"stream": stream, "caches": trainer.channels.export_caches("client", job.client)})
    stats = {"losses": run.losses, "client_flops": run.client_flops, "server_flops": run.server_flops,
             "failure": run.failure, "memory": memory, "sends": side.sends, "exchanges": exchanges}
    return TurnReply(encode(message), {}, stats)


def client_app(load: Callable[[], RunConfig]):
    """The Flower ClientApp serving the run whose configuration ``load()`` returns."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        if msg.content[RECORD]["ask"] != HELLO:
            raise ValueError(f"unknown fedtune query {msg.content[RECORD]['ask']!r}")
        return Message(RecordDict({RECORD: ConfigRecord(hello_reply(context.node_config))}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        node = NodeSettings.from_node_config(context.node_config)
        if SECAGG_CONFIGS in msg.content.config_records:  # a stage of a securely aggregated round
            from fedtune.deploy.secure_client import secure_train

            return secure_train(load, node, msg, context)
        record = train_turn(load(), node, msg.content[RECORD])
        return Message(RecordDict({RECORD: ConfigRecord(record)}), reply_to=msg)

    return app


__all__ = ["NodeSettings", "client_app", "client_turn", "hello_reply", "train_turn"]
