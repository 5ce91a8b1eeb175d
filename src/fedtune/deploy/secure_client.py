"""A deployed client's side of a securely aggregated FedLLM round (``deploy.secure_aggregation = true``).

Each of the round's four SecAgg+ messages goes through Flower's ``secaggplus_mod``, which keeps the protocol's
state in the ClientApp's Flower context between them (the SuperNode holds it across the fresh process each message
starts). The mod calls :func:`_masked_turn` once, in the stage that collects the masked vectors: the client trains
its turn as usual (:func:`~fedtune.deploy.client_turns.client_turn`), then hands the mod its adapter as float64
arrays to weight, clip, quantise and mask. Beside the masked vector the reply carries, in the clear, what the
server needs that is not secret: the upload's meta (samples, train loss) and the turn's statistics.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from fedtune.comm.messages import Message, decode, encode
from fedtune.config import RunConfig
from fedtune.core.errors import FedtuneError
from fedtune.core.seeding import derive_seed
from fedtune.deploy.client_turns import NodeSettings, client_turn
from fedtune.runtime.flower_records import RECORD, TurnReply, read_request, reply_record
from fedtune.runtime.flower_secagg import MAX_WEIGHT, flatten

#: Flower's record of the fit instructions in the masked vectors' stage (where our request record travels).
FIT_CONFIG = "fitins.config"


def secure_train(load: Callable[[], RunConfig], node: NodeSettings, msg, context):
    """Answer one SecAgg+ stage message (the ClientApp's ``train`` handler routes them here)."""
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod(msg, context, lambda inner, _context: _masked_turn(load(), node, inner))


def _masked_turn(cfg: RunConfig, node: NodeSettings, msg):
    """Train this client's turn and reply with its adapter as a legacy FitRes, for the mod to mask."""
    from flwr.app import ConfigRecord
    from flwr.app import Message as FlowerMessage
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    config = msg.content.config_records[FIT_CONFIG]
    request = read_request(config)
    turn = client_turn(cfg, node, request)
    upload = decode(turn.upload)
    if upload.kind == "client_failure":  # an error reply: the protocol goes on without this client
        raise FedtuneError(f"client {node.client} leaves the secure round: {upload.meta['reason']}")
    arrays = flatten(upload.tensors)
    samples = int(upload.meta["num_samples"])
    weight = samples / float(config[MAX_WEIGHT])
    peak = weight * max((float(np.abs(a).max()) for a in arrays if a.size), default=0.0)
    if peak > cfg.deploy.secagg_clipping_range:
        raise FedtuneError(f"client {node.client}: a weighted adapter value of {peak:.3g} exceeds "
                           f"deploy.secagg_clipping_range = {cfg.deploy.secagg_clipping_range}; SecAgg+ would clip "
                           "it silently: raise the range")
    np.random.seed(derive_seed(cfg.seed, "secagg-rounding", request.round, node.client) % 2**32)  # the mod's rounding
    meta_only = encode(Message(upload.kind, {}, upload.meta))
    record = reply_record(TurnReply(meta_only, turn.state, {**turn.stats, "plain_upload_bytes": len(turn.upload)}))
    content = fitres_to_recorddict(FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), samples, {}),
                                   keep_input=False)
    content.config_records[RECORD] = ConfigRecord(record)
    return FlowerMessage(content, reply_to=msg)


__all__ = ["secure_train"]
