"""Secure aggregation of a deployed FedLLM round with Flower's SecAgg+ (``deploy.secure_aggregation = true``).

Flower's :class:`~flwr.server.workflow.SecAggPlusWorkflow` (server) and ``secaggplus_mod`` (client,
:mod:`fedtune.deploy.secure_client`) run the protocol of Bell et al. (2020): each client weights its adapter by its
sample count, clips and quantises it, adds pairwise masks that cancel in the sum and secret-shares the keys of its
masks, so the server can unmask the sum of the clients that answered (and of those that dropped after the key
exchange) but never one client's adapter. Four message round trips per round: setup, key sharing, the masked
vectors (the only stage that trains), unmasking. What the server still learns in the clear: who took part, each
client's sample count, train loss and FLOPs, and the mean itself.

The workflow is driven here for one round at a time, with a :class:`_RoundPlan` strategy that hands it exactly the
round's nodes and catches the result; messages go through the backend's counting sender, so the carried bytes and
messages of all four stages are measured. The ledger records each client's masked vector as its upload, with the
plain adapter it stands for as the baseline (a masked vector is larger: the reduction is negative).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from fedtune.runtime.flower_records import RECORD

#: Flower's record in every SecAgg+ train message (and, in a client's stage-2 reply, its masked vector).
SECAGG_CONFIGS = "secaggplus_configs"
MASKED_VECTOR = "masked_params"
#: Our instruction in a round's fit config: the weight SecAgg+ divides sample counts by (the largest partition).
MAX_WEIGHT = "secagg-max-weight"


@dataclass
class SecureOutcome:
    """One securely aggregated round: the weighted mean (float64 arrays in sorted-key order; None: halted), our
    reply record of every client whose masked vector is in it, that vector's bytes, and the failed stages'
    reasons, by Flower node id."""

    mean: list[np.ndarray] | None = None
    replies: dict[int, dict] = field(default_factory=dict)
    masked_bytes: dict[int, int] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)  # why a node's ClientApp failed a stage


def _round_plan(fit_config: dict[int, dict], outcome: SecureOutcome):
    """A strategy that gives the workflow exactly these nodes and their fit configs, and keeps the mean."""
    from flwr.common import FitIns, parameters_to_ndarrays
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import Strategy

    class _Node(ClientProxy):  # the workflow reads only node_id
        def __init__(self, node_id: int) -> None:
            super().__init__(str(node_id))
            self.node_id = node_id

        def get_properties(self, *args, **kwargs):
            raise NotImplementedError

        get_parameters = fit = evaluate = reconnect = get_properties

    class _RoundPlan(Strategy):
        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            return [(_Node(node), FitIns(parameters, config)) for node, config in fit_config.items()]

        def aggregate_fit(self, server_round, results, failures):
            if results:  # every result holds the same unmasked mean
                outcome.mean = parameters_to_ndarrays(results[0][1].parameters)
            return None, {}  # nothing for the workflow to store

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return _RoundPlan()


class _Relay:
    """The grid the workflow talks to: sends through the backend's counting sender and keeps, from the masked
    vectors' stage, each client's own reply record and the vector's size."""

    def __init__(self, send: Callable[[list, float | None], list], outcome: SecureOutcome) -> None:
        self.send, self.outcome = send, outcome

    def send_and_receive(self, messages, *, timeout: float | None = None):
        replies = self.send(list(messages), timeout)
        for reply in replies:
            if reply.has_error():
                self.outcome.errors.setdefault(reply.metadata.src_node_id, reply.error.reason)
                continue
            records = reply.content.config_records
            vector = records.get(SECAGG_CONFIGS, {}).get(MASKED_VECTOR)
            if vector is not None and RECORD in records:
                node = reply.metadata.src_node_id
                self.outcome.replies[node] = dict(records[RECORD])
                self.outcome.masked_bytes[node] = sum(len(part) for part in vector)
        return replies


def secure_round(send, context, fit_config: dict[int, dict], round: int, *, threshold: float, clipping: float,
                 quantization: int, max_weight: float, timeout: float | None) -> SecureOutcome:
    """Run SecAgg+ for one round over the nodes of ``fit_config`` (node id -> our request record); ``send``
    is the backend's ``(messages, timeout) -> replies``, ``context`` the ServerApp's Flower context."""
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD

    outcome = SecureOutcome()
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({"current_round": round})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    legacy = LegacyContext(context, strategy=_round_plan(fit_config, outcome), client_manager=SimpleClientManager())
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=float(threshold), max_weight=max_weight,
                                  clipping_range=clipping, quantization_range=quantization, timeout=timeout)
    workflow(_Relay(send, outcome), legacy)
    return outcome


def unflatten(arrays: list[np.ndarray], template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mean's arrays (sorted-key order, as the clients flatten them) as tensors shaped and typed like
    ``template``."""
    keys = sorted(template)
    if len(arrays) != len(keys):
        raise ValueError(f"secure aggregation returned {len(arrays)} arrays for {len(keys)} adapter tensors")
    return {k: torch.from_numpy(np.asarray(a, dtype=np.float64)).reshape(template[k].shape).to(template[k].dtype)
            for k, a in zip(keys, arrays)}


def flatten(tensors: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """A client's adapter as SecAgg+ sums it: float64 arrays in sorted-key order (float64 so that the weighting and
    quantisation add no float32 rounding of their own)."""
    return [tensors[k].detach().to("cpu", torch.float64).numpy().reshape(-1) for k in sorted(tensors)]


__all__ = ["MAX_WEIGHT", "SECAGG_CONFIGS", "SecureOutcome", "flatten", "secure_round", "unflatten"]
