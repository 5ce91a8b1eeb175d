"""Flower backend (``runtime.backend = "flower"``): a deployed federation's client turns, as Flower messages.

It runs inside a Flower ServerApp (:mod:`fedtune.deploy.apps`), which hands it the run's ``Grid``: each
client's turn is one ``train`` message to the SuperNode whose node config says ``partition-id = <client>`` (asked
once with a ``query`` message, so seeds derive from the client's identity, not from Flower's random node ids), and
the reply is the client's upload. The download is encoded and recorded by the transport exactly as in simulation;
besides, the backend measures the protobuf size of every Flower message it sends and receives (``info()``: the
bytes the transport really carried, framing included).

A client's private state (:attr:`~fedtune.paradigms.base.Paradigm.private_state`: its stream position, KD's own
adapter) never leaves its machine: the request carries only the server's instructions, and the client keeps the
rest in its state directory (:mod:`fedtune.deploy.client_turns`). The server's copy of the private state is left as
it was.

Faults: a SuperNode that does not reply within ``runtime.client_timeout_s`` (killed, disconnected) or whose
ClientApp fails loses that client's turn; the round goes on with ``federation.min_clients``, else the lost turns
are retried ``runtime.max_retries`` times (:func:`~fedtune.runtime.base.with_quorum`). A node that reconnects is
found again by the next round's discovery.
"""

from __future__ import annotations

import json
import secrets
import time

from fedtune.comm.ledger import DOWN, UP
from fedtune.comm.messages import decode
from fedtune.core.errors import ClientQuorumError, FedtuneError
from fedtune.core.files import atomic_write
from fedtune.runtime.base import (
    BACKENDS,
    Backend,
    Capabilities,
    ClientJob,
    ClientLost,
    ClientReply,
    RoundReplies,
    with_quorum,
)
from fedtune.runtime.flower_records import HELLO, RECORD, TurnRequest, read_reply, request_record, unpack_state
from fedtune.runtime.flower_split import ServerSession, SplitHost, SplitSettings
from fedtune.split.driver import SessionSteps
from fedtune.split.protocol import SESSION_PRIVATE_STATE, ClientResult, ServerResult, SideReport

#: Seconds a discovery query waits for SuperNodes to say which client they serve.
HELLO_TIMEOUT_S = 60.0


def _carried(message) -> int:
    """Bytes of a Flower message as its transport serialises it (protobuf, metadata and records)."""
    from flwr.common.serde import message_to_proto

    return message_to_proto(message).ByteSize()


def _median(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


def _exchange_summary(exchanges: list[list[float]]) -> dict:
    """Medians of the split stream's exchanges, as the clients timed them."""
    columns = list(zip(*exchanges)) if exchanges else [[], [], [], [], []]
    return {"count": len(exchanges), "seconds_median": _median(list(columns[0])),
            "stream_seconds_median": _median(list(columns[1])), "server_seconds_median": _median(list(columns[2])),
            "transfer_seconds_median": _median([e[1] - e[2] for e in exchanges]),
            "up_bytes_median": _median(list(columns[3])), "down_bytes_median": _median(list(columns[4]))}


def run_token(run_dir) -> str:
    """The run's token, kept in ``deploy.json`` of the run directory: a resumed run keeps it, a new run gets a new
    one (clients keep their private state per token)."""
    path = run_dir / "deploy.json"
    if path.is_file():
        return json.loads(path.read_text())["token"]
    token = secrets.token_hex(16)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"token": token}).encode())
    return token


@BACKENDS.register("flower")
class FlowerBackend(Backend):
    name = "flower"
    remote_clients = True

    @classmethod
    def check_capabilities(cls, capabilities: Capabilities, paradigm: str) -> None:
        if capabilities.federated and not (capabilities.client_jobs or capabilities.split_sessions):
            raise ValueError(f"runtime.backend = 'flower' cannot deploy paradigm {paradigm!r}")

    def __init__(self, ctx, capabilities: Capabilities, build_copy=None, grid=None,
                 split: SplitSettings | None = None, context=None) -> None:
        super().__init__(ctx, capabilities, build_copy)
        if grid is None:
            raise FedtuneError("runtime.backend = 'flower' runs inside a Flower ServerApp: write one with "
                               "`fedtune deploy init CONFIG --out APP_DIR` and start it with `flwr run APP_DIR`")
        self.grid = grid
        self.flower_context = context  # the ServerApp's Flower context (SecAgg+ keeps its round state there)
        self.split_host = None
        if capabilities.split_sessions:
            if split is None:
                raise FedtuneError("a deployed split run needs the split server's certificate and key: give "
                                   "`fedtune deploy init --certificates DIR` (see `fedtune deploy credentials`)")
            self.split_host = SplitHost(split, ctx.progress.log)
        self.nodes: dict[int, int] = {}  # client -> Flower node id
        self.token = run_token(ctx.run_dir)
        self.carried = {UP: 0, DOWN: 0}
        self.flower_messages = {UP: 0, DOWN: 0}
        self.lost_turns = 0
        self.secure_rounds = 0
        self.retries = 0
        self.round_trips: list[float] = []  # seconds from sending a round's (or session's) messages to the replies
        self.exchanges: list[list[float]] = []  # split: per step exchange (split_client.RemoteServer)
        self.hello_seconds: float | None = None  # one discovery query's round trip: Flower's fixed cost
        self._discover(wait_for=ctx.cfg.federation.num_clients, deadline=time.monotonic() + HELLO_TIMEOUT_S)

    def close(self) -> None:
        if self.split_host is not None:
            self.split_host.close()

    def info(self) -> dict:
        info = self._info()
        if self.split_host is not None:
            frames = self.split_host.server.frames
            info["split_stream_bytes"] = {"up": frames["up"], "down": frames["down"]}
            info["split_exchanges"] = _exchange_summary(self.exchanges)
        return info

    def _info(self) -> dict:
        return {"backend": self.name, "nodes": {str(c): n for c, n in sorted(self.nodes.items())},
                "carried_bytes": {"up": self.carried[UP], "down": self.carried[DOWN]},
                "flower_messages": {"up": self.flower_messages[UP], "down": self.flower_messages[DOWN]},
                "lost_client_turns": self.lost_turns, "retries": self.retries, "secure_rounds": self.secure_rounds,
                "turn_seconds_median": _median(self.round_trips), "hello_seconds": self.hello_seconds}

    # -- which node serves which client ---------------------------------------------------------------
    def _send(self, messages: list, timeout: float) -> list:
        for message in messages:
            self.carried[DOWN] += _carried(message)
            self.flower_messages[DOWN] += 1
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            self.carried[UP] += _carried(reply)
            self.flower_messages[UP] += 1
        return replies

    def _discover(self, wait_for: int, deadline: float) -> None:
        """Ask SuperNodes not yet known which client they serve, until ``wait_for`` clients are known or the
        deadline passes."""
        from flwr.app import ConfigRecord, Message, RecordDict

        while True:
            known = set(self.nodes.values())
            new = [n for n in self.grid.get_node_ids() if n not in known]
            if new:
                asks = [Message(RecordDict({RECORD: ConfigRecord({"ask": HELLO})}), dst_node_id=n,
                                message_type="query") for n in new]
                start = time.monotonic()
                replies = self._send(asks, timeout=max(1.0, deadline - time.monotonic()))
                self.hello_seconds = time.monotonic() - start
                for reply in replies:
                    if reply.has_error():
                        self.ctx.progress.log(f"[yellow]SuperNode {reply.metadata.src_node_id} did not say which "
                                              f"client it serves: {reply.error.reason}")
                        continue
                    cid = int(reply.content[RECORD]["partition-id"])
                    self.nodes[cid] = reply.metadata.src_node_id
            if len(self.nodes) >= wait_for or time.monotonic() >= deadline:
                return
            time.sleep(1.0)

    # -- a round of client jobs ------------------------------------------------------------------
    def run_clients(self, paradigm, jobs: list[ClientJob]) -> RoundReplies:
        cfg, round = self.ctx.cfg, jobs[0].round
        by_client = {job.client: job for job in jobs}
        if any(c not in self.nodes for c in by_client):
            self._discover(wait_for=len(self.nodes) + 1, deadline=time.monotonic() + 5.0)
        out = RoundReplies()
        sent: set[int] = set()

        def attempt(clients: list[int]) -> dict[int, str]:
            lost = self._attempt(set(paradigm.private_state), [by_client[c] for c in clients], out, sent)
            self.lost_turns += len(lost)
            return lost

        def on_retry(lost: dict[int, str]) -> None:
            self.retries += 1
            self.ctx.progress.log(f"[yellow]round {round}: retrying clients {sorted(lost)}")
            self._discover(wait_for=len(self.nodes) + len(lost), deadline=time.monotonic() + 5.0)

        need = min(cfg.federation.min_clients, len(jobs))
        out.lost = with_quorum(round, list(by_client), need, cfg.runtime.max_retries, attempt, on_retry, out.retried)
        for cid, why in sorted(out.lost.items()):
            self.ctx.progress.log(f"[yellow]round {round}: client {cid} lost: {why}")
        return out

    def _attempt(self, private: set[str], jobs: list[ClientJob], out: RoundReplies, sent: set[int],
                 session: bool = False) -> dict[int, str]:
        """Send each job's turn, wait for the replies; returns the lost turns. ``session``: split sessions (the
        request carries the split stream's ticket)."""
        from flwr.app import ConfigRecord, Message, RecordDict

        lost, messages = {}, []
        online = set(self.grid.get_node_ids())
        for job in jobs:
            node = self._connected_node(job.client, online, lost)
            if node is None:
                continue
            record = self._request(job, private, sent, session)
            messages.append(Message(RecordDict({RECORD: ConfigRecord(record)}), dst_node_id=node,
                                    message_type="train", group_id=str(job.round)))
        start = time.monotonic()
        replies = {r.metadata.src_node_id: r for r in self._send(messages, timeout=self.ctx.cfg.runtime.client_timeout_s)}
        self.round_trips.append(time.monotonic() - start)
        by_node = {node: cid for cid, node in self.nodes.items()}
        for job in jobs:
            if job.client in lost:
                continue
            reply = replies.get(self.nodes[job.client])
            if reply is None:
                lost[job.client] = f"no reply within runtime.client_timeout_s = {self.ctx.cfg.runtime.client_timeout_s} s"
            elif reply.has_error():
                lost[job.client] = f"the client's ClientApp failed: {reply.error.reason}"
            else:
                out.replies[by_node[reply.metadata.src_node_id]] = self._reply(job, read_reply(reply.content[RECORD]))
        return lost

    def _connected_node(self, client: int, online: set[int], lost: dict[int, str]) -> int | None:
        """The Flower node serving ``client`` if it is connected; else None, with why in ``lost``."""
        node = self.nodes.get(client)
        if node is None or node not in online:
            lost[client] = f"no SuperNode serving partition-id {client} is connected"
            return None
        return node

    def _request(self, job: ClientJob, private: set[str], sent: set[int], session: bool = False) -> dict:
        """A turn's request record: the download (encoded and recorded, a repeat marked as retransmitted), the
        instructions (the turn state less the private keys) and, for a split session, the stream's ticket."""
        data = None
        if job.download is not None:
            data = self.ctx.transport.send(job.download, round=job.round, client=job.client, direction=DOWN,
                                           retransmit=job.client in sent)
            sent.add(job.client)
        directives = {k: v for k, v in job.state.items() if k not in private}
        ticket = self.split_host.ticket() if session else None
        return request_record(TurnRequest(job.round, job.client, self.token, data, directives, ticket))

    # -- a securely aggregated round ----------------------------------------------------------------
    def run_clients_securely(self, paradigm, jobs: list[ClientJob], template: dict) -> tuple[RoundReplies, dict]:
        """The round through Flower's SecAgg+ (:mod:`fedtune.runtime.flower_secagg`): all its clients at once,
        retried whole (``runtime.max_retries``) when the protocol halts or fewer than ``federation.min_clients``
        masked adapters arrive; a retry is a fresh round of the protocol, never a sum of fewer clients."""
        from fedtune.runtime.flower_secagg import MAX_WEIGHT, secure_round, unflatten

        if self.flower_context is None:
            raise FedtuneError("deploy.secure_aggregation needs the ServerApp's Flower context "
                               "(`fedtune deploy init` writes an app that passes it)")
        cfg, round, deploy = self.ctx.cfg, jobs[0].round, self.ctx.cfg.deploy
        need = max(2, min(cfg.federation.min_clients, len(jobs)))
        max_weight = float(max(len(part) for part in self.ctx.partitions))
        private, sent = set(paradigm.private_state), set()
        why = ""
        for attempt in range(cfg.runtime.max_retries + 1):
            if attempt:
                self.retries += 1
                self.ctx.progress.log(f"[yellow]round {round}: secure aggregation retried ({why})")
            self._discover(wait_for=cfg.federation.num_clients, deadline=time.monotonic() + (5.0 if attempt else 0))
            online, lost, fit_config = set(self.grid.get_node_ids()), {}, {}
            for job in jobs:
                node = self._connected_node(job.client, online, lost)
                if node is not None:
                    fit_config[node] = {**self._request(job, private, sent), MAX_WEIGHT: max_weight}
            start = time.monotonic()
            outcome = secure_round(self._send, self.flower_context, fit_config, round,
                                   threshold=deploy.secagg_threshold, clipping=deploy.secagg_clipping_range,
                                   quantization=deploy.secagg_quantization_range, max_weight=max_weight,
                                   timeout=cfg.runtime.client_timeout_s)
            self.round_trips.append(time.monotonic() - start)
            by_node = {node: cid for cid, node in self.nodes.items()}
            out = RoundReplies()
            for node, record in sorted(outcome.replies.items(), key=lambda item: by_node[item[0]]):
                cid = by_node[node]
                turn = read_reply(record)
                upload = decode(turn.upload)  # its meta only: the tensors are in the masked sum
                self.ctx.ledger.record(round, cid, UP, f"masked_{upload.kind}", outcome.masked_bytes[node],
                                       turn.stats["plain_upload_bytes"])
                job = next(j for j in jobs if j.client == cid)
                out.replies[cid] = ClientReply(cid, upload, {**job.state, **turn.state}, turn.stats)
            errors = {by_node[node]: reason for node, reason in outcome.errors.items()}
            lost.update({j.client: f"the client's ClientApp failed: {errors[j.client]}" if j.client in errors else
                         "its masked adapter is not in the secure sum (no reply in time)"
                         for j in jobs if j.client not in out.replies and j.client not in lost})
            self.lost_turns += len(lost)
            if outcome.mean is not None and len(out.replies) >= need:
                self.secure_rounds += 1
                out.lost = lost
                for cid, reason in sorted(lost.items()):
                    self.ctx.progress.log(f"[yellow]round {round}: client {cid} lost: {reason}")
                return out, unflatten(outcome.mean, template)
            why = ("SecAgg+ halted (too few clients survived the key exchange)" if outcome.mean is None else
                   f"only {len(out.replies)} masked adapters arrived, fewer than {need}")
        detail = "; ".join(f"client {c}: {r}" for c, r in sorted(lost.items()))
        raise ClientQuorumError(f"round {round}: secure aggregation failed after {cfg.runtime.max_retries} retries: "
                                f"{why} ({detail})", round)

    # -- a deployed split session ----------------------------------------------------------------
    def split_turn(self, trainer, job: ClientJob, body: dict, drive):
        """The client drives its session from its machine (``drive`` is the simulation's driver, unused here); the
        split server runs this end. Returns what the in-process driver would: (steps, client result, server
        result); a session without a reply is lost (:class:`~fedtune.runtime.base.ClientLost`)."""
        session = ServerSession(trainer, self.ctx.transport, job, body)
        self.split_host.expect(session)
        out = RoundReplies()
        try:
            lost = self._attempt(set(SESSION_PRIVATE_STATE), [job], out, set(), session=True)
        finally:
            self.split_host.drop(job.round, job.client)
        if lost:
            self.lost_turns += 1
            session.side.abort()
            raise ClientLost(lost[job.client])
        reply = out.replies[job.client]
        stats = reply.stats
        run = SessionSteps(stats["losses"], stats["client_flops"], stats["server_flops"], stats["failure"])
        sends = [tuple(s) for s in stats["sends"]]
        self.exchanges.extend(stats.get("exchanges", []))
        client = ClientResult(reply.upload, stats["memory"], job.state["stream"], SideReport(sends, None))
        body_state, memory = session.side.finish()
        return run, client, ServerResult(body_state, memory)

    def _reply(self, job: ClientJob, turn) -> ClientReply:
        upload = self.ctx.transport.receive(turn.upload, round=job.round, client=job.client, direction=UP)
        shown = unpack_state(turn.disclosed) if turn.disclosed is not None else {}
        return ClientReply(job.client, upload, {**job.state, **turn.state, **shown}, turn.stats)
