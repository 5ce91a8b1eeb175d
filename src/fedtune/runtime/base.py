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

from fedtune.comm.messages import Message
from fedtune.registry import Registry

BACKENDS: Registry[type["Backend"]] = Registry("backend")


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
    """The replies that arrived, and the clients whose turn was lost (worker died, timed out) with why."""

    replies: dict[int, ClientReply] = field(default_factory=dict)
    lost: dict[int, str] = field(default_factory=dict)

    def lost_records(self) -> list[dict]:
        """Entries for ``RoundResult.rejected`` (and so metrics.jsonl and summary.json)."""
        return [{"client": c, "reason": r, "lost": True} for c, r in sorted(self.lost.items())]


class ClientLost(Exception):
    """A client's turn was lost to its worker (it died or did not answer in time); the message says why."""


class Backend:
    """Runs client turns. The in-process backend runs them one after another in this process."""

    name = "base"

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise ValueError for a configuration this backend cannot run (part of config validation)."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx

    def run_clients(self, paradigm, jobs: list[ClientJob]) -> RoundReplies:
        raise NotImplementedError

    def split_session(self, paradigm, job: ClientJob, body: dict):
        """The two ends of one client's split session: ``(client, server)`` endpoints whose methods run the
        :class:`~fedtune.split.session.ClientSide` / ``ServerSide`` halves and carry their messages across the
        transport. ``job.download`` is the client's blocks; ``body`` the weights the server's blocks start from."""
        raise NotImplementedError

    def close(self) -> None:
        """Release workers (no-op in-process)."""

    def info(self) -> dict:
        """What the run's summary records about the backend."""
        return {"backend": self.name}


def make_backend(ctx) -> Backend:
    """The backend named by ``runtime.backend`` for this run's context."""
    import fedtune.runtime  # noqa: F401 - registers the implementations

    return BACKENDS.get(ctx.cfg.runtime.backend)(ctx)


def backend_of(ctx) -> Backend:
    """The context's backend, created on first use (a context built outside the runner gets one too)."""
    backend = getattr(ctx, "backend", None)
    if backend is None:
        backend = make_backend(ctx)
        ctx.backend = backend
    return backend
