"""The backend interface: where a round's client work runs, behind one call.

A paradigm splits a client's turn in three:

1. ``paradigm.client_job(round, cid)`` (server side, on the driver): the message the client downloads and the
   client's private simulation state it trains from (stream position, its own adapter in KD, ...);
2. ``paradigm.run_client(job)`` (client side): trains from ``job.download`` (already decoded) and ``job.state``
   only, and returns the message it uploads, its new private state and its statistics. It runs on the
   driver (in-process backend) or on a Ray worker holding its own copy of the model and data (Ray backend);
3. the paradigm applies the replies (aggregation, new client states) on the driver.

Every message crosses the driver's :class:`~fedtune.comm.transport.Transport` whatever the backend: the
download is encoded and recorded there, the upload is recorded and decoded there. Private client state is
simulation bookkeeping (a real device would simply keep it), so it is shipped but never counted as traffic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from fedtune.comm.messages import Message
from fedtune.core.errors import ClientQuorumError, FedtuneError
from fedtune.core.registry import Registry

BACKENDS: Registry[type["Backend"]] = Registry("backend")


@dataclass(frozen=True)
class Capabilities:
    """What a paradigm does, declared by the paradigm (``Paradigm.capabilities``) for the backends and the network
    model, which never guess it from the paradigm's methods."""

    federated: bool = True  # clients train (False: the centralized reference, where the server trains on pooled data)
    client_jobs: bool = False  # a client's turn is one job: client_job -> run_client -> reply (runs on any backend)
    split_sessions: bool = False  # a client's turn is a split session with the server, one exchange per batch
    prunes_clients: bool = False  # clients train pruned models at per-round rates (from a planner)
    drops_stragglers: bool = False  # clients missing network.deadline_s are left out of the round's aggregate
    client_adapters: bool = False  # every client keeps its own adapter (no global model is averaged)
    public_set: bool = False  # clients also use a public set of rows the paradigm reserves (KD's ``reserved_rows``)


#: Builds a worker's own copy of a run from its resolved configuration and a scratch directory: (context, paradigm).
#: Handed down by the layer that builds contexts, so a backend can start workers without importing that layer.
CopyBuilder = Callable[[object, object], tuple[object, object]]


#: ``ClientJob.state`` key: the private-state keys the client reports back with its reply, because the server
#: evaluates them (a simulated server reads them directly; a deployed client sends them with its reply, in the
#: Flower message's measured bytes and, as in simulation, outside the ledger).
DISCLOSE = "disclose"


@dataclass
class ClientJob:
    """One client's turn in a round, as the server hands it out."""

    round: int
    client: int
    download: Message | None  # what the server sends the client first (None: nothing)
    state: dict = field(default_factory=dict)  # the client's private state (not a message; never in the ledger)


@dataclass
class ClientReply:
    """What a client's turn produced."""

    client: int
    upload: Message  # what it sends back (its update, logits, or a 'client_failure' notice)
    state: dict  # its new private state
    stats: dict  # flops, peak_memory, failure (NaN guard), paradigm-specific numbers


@dataclass
class RoundReplies:
    """The replies that arrived, the clients whose turn was lost (worker died, timed out) with why, and those whose
    turn was lost in an earlier attempt of the round and replied when retried (with why it was lost)."""

    replies: dict[int, ClientReply] = field(default_factory=dict)
    lost: dict[int, str] = field(default_factory=dict)
    retried: dict[int, str] = field(default_factory=dict)

    def lost_records(self) -> list[dict]:
        """Entries for ``RoundResult.rejected`` (and so metrics.jsonl and summary.json), by client: ``"lost": true``
        for each lost turn; a retried one is marked ``"retried": true`` too (its update arrived: not a rejection)."""
        return lost_records(self.lost, self.retried)


def lost_records(lost: dict[int, str], retried: dict[int, str]) -> list[dict]:
    """The ``rejected`` entries of a round's lost turns (``lost``) and of its retried ones (``retried``), by client."""
    records = [{"client": c, "reason": r, "lost": True} for c, r in lost.items()]
    records += [{"client": c, "reason": r, "lost": True, "retried": True} for c, r in retried.items()]
    return sorted(records, key=lambda item: item["client"])


class ClientLost(Exception):
    """A client's turn was lost to its worker (it died or did not answer in time); the message says why."""


def with_quorum(round: int, clients: list[int], need: int, retries: int,
                attempt: Callable[[list[int]], dict[int, str]], on_retry: Callable[[dict[int, str]], None],
                retried: dict[int, str] | None = None) -> dict[int, str]:
    """Run ``attempt(clients)`` (it returns the lost turns, {client: why}); while fewer than ``need`` clients replied,
    retry the lost ones (after ``on_retry(lost)``) up to ``retries`` times. Returns the turns still lost; raises
    :class:`ClientQuorumError` when too few replied in the end. ``retried`` (when given) is filled with the turns
    lost in an attempt that replied in a later one, {client: why it was lost}."""
    lost = attempt(list(clients))
    for _ in range(retries):
        if not lost or len(clients) - len(lost) >= need:
            break
        on_retry(lost)
        before, lost = lost, attempt(sorted(lost))
        if retried is not None:
            retried.update({c: why for c, why in before.items() if c not in lost})
    if len(clients) - len(lost) < need:
        detail = "; ".join(f"client {c}: {r}" for c, r in sorted(lost.items()))
        raise ClientQuorumError(
            f"round {round}: only {len(clients) - len(lost)} of {len(clients)} clients replied, fewer than "
            f"federation.min_clients = {need}, after {retries} retries ({detail})", round)
    return lost


class Backend:
    """Runs client turns. The in-process backend runs them one after another in this process."""

    name = "base"
    #: Clients run on their own machines (a deployment): their data never reaches the server, so a paradigm
    #: checks its config can run that way (``Paradigm.check_remote``).
    remote_clients = False

    @classmethod
    def check_capabilities(cls, capabilities: Capabilities, paradigm: str) -> None:
        """Raise ValueError for a paradigm this backend cannot run (part of config validation)."""

    def __init__(self, ctx, capabilities: Capabilities, build_copy: CopyBuilder | None = None) -> None:
        self.ctx = ctx
        self.capabilities = capabilities
        self.build_copy = build_copy

    def run_clients(self, paradigm, jobs: list[ClientJob]) -> RoundReplies:
        raise NotImplementedError

    def run_clients_securely(self, paradigm, jobs: list[ClientJob], template: dict) -> tuple[RoundReplies, dict | None]:
        """The round's jobs with their uploads summed securely (``deploy.secure_aggregation``): the replies, whose
        uploads carry only their meta, and the sample-weighted mean of the uploads' tensors (shaped and typed like
        ``template``; None when none arrived). Only a deployment's clients mask their uploads."""
        raise FedtuneError(f"deploy.secure_aggregation needs runtime.backend = 'flower', not {self.name!r}")

    def split_session(self, trainer, job: ClientJob, body: dict):
        """The two ends of one client's split session: ``(client, server)`` endpoints
        (:class:`~fedtune.split.protocol.ClientEndpoint`, ``ServerEndpoint``) on the sides the paradigm's
        :class:`~fedtune.split.trainer.SplitTrainer` opens, carrying their messages across the transport.
        ``job.download`` is the client's blocks; ``body`` the weights the server's blocks start from."""
        raise NotImplementedError

    def split_turn(self, trainer, job: ClientJob, body: dict, drive: Callable):
        """One client's whole split session: ``(steps, client result, server result)``. ``drive(client, server)``
        runs the steps over the endpoints of :meth:`split_session` (returning the driver's ``SessionSteps``); then
        both ends finish. A lost client side raises :class:`ClientLost` (the server's end aborted as lost)."""
        client, server = self.split_session(trainer, job, body)
        try:
            run = drive(client, server)
            return run, client.finish(run.failure, run.mean_loss), server.finish()
        except ClientLost:
            server.abort(lost=True)
            raise

    def close(self) -> None:
        """Release workers (no-op in-process)."""

    def info(self) -> dict:
        """What the run's summary records about the backend."""
        return {"backend": self.name}


def make_backend(ctx, capabilities: Capabilities, build_copy: CopyBuilder | None = None, **resources) -> Backend:
    """The backend named by ``runtime.backend`` for this run's context. ``resources``: what a backend needs from
    the process hosting the run (the Flower backend: the ServerApp's ``grid``)."""
    import fedtune.runtime  # noqa: F401 - registers the implementations

    return BACKENDS.get(ctx.cfg.runtime.backend)(ctx, capabilities, build_copy, **resources)
