"""Ray backend (``[runtime] backend = "ray"``): a round's client turns run in parallel on a pool of Ray actors.

Each worker actor builds its own copy of the model and data from the resolved configuration once and then trains
whichever client it is handed (:mod:`fedtune.runtime.ray_pool`); the driver keeps every client's state and ships it
with the call, so results do not depend on placement and equal the in-process backend's. Messages still cross the
driver's transport: the driver encodes (and records) each download and ships the bytes; the worker returns its
upload as bytes, which the driver records and decodes.

SplitCom in split learning: each session's thresholds come from the driver's controllers. A client's reuse caches
travel with its session (shipped in, the entries it touched handed back, like its stream position: simulation
bookkeeping, not messages); the server's stay on the server's worker between sessions. The driver merges both
sides' touched entries into its own channels when a round completes, so its checkpoints hold every cache as of the
last complete round; a new server worker (a resumed run) is loaded from there, and so are a lost session's server
entries, so its retry starts where it did.

Faults: a call whose worker dies (killed, out of memory, node lost) or that runs past ``runtime.client_timeout_s``
loses that client's turn; the worker is replaced (a timed-out one killed first). The round goes on with the other
clients if at least ``federation.min_clients`` replied; otherwise the lost turns are retried on fresh workers up to
``runtime.max_retries`` times (:func:`~fedtune.runtime.base.with_quorum`), and then
:class:`~fedtune.core.errors.ClientQuorumError` stops the run (the runner leaves a checkpoint of the last complete
round to resume from). Lost turns are recorded in the round's ``rejected`` list with ``"lost": true`` and the
reason; the client's state is untouched, so it simply takes part again the next time it is sampled. A turn lost and
then retried successfully is recorded too, with ``"retried": true`` (its update arrived: not a rejection), and the
download its retry sent again (for split, the session's) is marked as retransmitted in the ledger.

Connecting: :mod:`fedtune.runtime.ray_connect`.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable

from fedtune.comm.ledger import DOWN, UP
from fedtune.core.errors import ServerLostError
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
from fedtune.runtime.ray_pool import WorkerPool, WorkerSlot, kill, reason
from fedtune.runtime.ray_split import RayClient, RayServer


@BACKENDS.register("ray")
class RayBackend(Backend):
    name = "ray"

    #: Test and fault-injection seam: when set, called as ``on_dispatch(backend, job, worker)`` right after a
    #: client's call has been submitted to ``worker.actor`` (so while it runs; ``worker.info`` has its node and
    #: pid). The fault tests use it to ``ray.kill`` a worker mid-call or to freeze it (SIGSTOP) so that it times
    #: out. fedtune itself never sets it.
    on_dispatch: Callable[["RayBackend", ClientJob, WorkerSlot], None] | None = None

    @classmethod
    def check_capabilities(cls, capabilities: Capabilities, paradigm: str) -> None:
        if capabilities.federated and not (capabilities.client_jobs or capabilities.split_sessions):
            raise ValueError(f"runtime.backend = 'ray' is not yet supported for paradigm {paradigm!r}; "
                             "use runtime.backend = 'inprocess'")

    def __init__(self, ctx, capabilities: Capabilities, build_copy=None) -> None:
        super().__init__(ctx, capabilities, build_copy)
        self.pool = WorkerPool(ctx, build_copy, with_server=capabilities.split_sessions)
        self._server_synced = False  # whether the server's worker holds the driver's server-side reuse caches
        self._session_sent: set[tuple[int, int]] = set()  # (round, client) sent a split session's download this round
        self.lost_turns = 0
        self.retries = 0

    def _start(self) -> None:
        if not self.pool.slots:
            self.pool.start()
            self._server_synced = False

    def close(self) -> None:
        self.pool.close()

    def info(self) -> dict:
        info = {"backend": self.name, "workers": len(self.pool.slots), "nodes": sorted(self.pool.nodes),
                "lost_client_turns": self.lost_turns, "retries": self.retries}
        if self.pool.server is not None:
            info["server_node"] = self.pool.server.info.get("node")
        return info

    # -- a round of client jobs ------------------------------------------------------------------
    def run_clients(self, paradigm, jobs: list[ClientJob]) -> RoundReplies:
        self._start()
        cfg, round = self.ctx.cfg, jobs[0].round
        by_client = {job.client: job for job in jobs}
        out = RoundReplies()
        sent: set[int] = set()  # clients sent their download in this call (a retry's is a retransmission)

        def attempt(clients: list[int]) -> dict[int, str]:
            self.pool.revive()
            lost = self._attempt([by_client[c] for c in clients], out, sent)
            self.lost_turns += len(lost)
            return lost

        def on_retry(lost: dict[int, str]) -> None:
            self.retries += 1
            self.ctx.progress.log(f"[yellow]round {round}: {len(out.replies)} of {len(jobs)} clients replied "
                                  f"(min_clients = {need}); retrying clients {sorted(lost)}")

        need = min(cfg.federation.min_clients, len(jobs))
        out.lost = with_quorum(round, list(by_client), need, cfg.runtime.max_retries, attempt, on_retry, out.retried)
        for cid, why in sorted(out.lost.items()):
            self.ctx.progress.log(f"[yellow]round {round}: client {cid} lost: {why}")
        return out

    def _dispatch(self, queue: deque, inflight: dict, timeout: float, sent: set[int]) -> None:
        """Hand queued jobs to idle workers (their downloads encoded and recorded now; one already ``sent`` in an
        earlier attempt is recorded as a retransmission)."""
        for slot in self.pool.slots:
            if not queue:
                break
            if slot.state != "idle":
                continue
            job = queue.popleft()
            data = None
            if job.download is not None:
                data = self.ctx.transport.send(job.download, round=job.round, client=job.client, direction=DOWN,
                                               retransmit=job.client in sent)
                sent.add(job.client)
            ref = slot.actor.run.remote(job.round, job.client, data, job.state)
            slot.state = "busy"
            inflight[ref] = (slot, job, time.monotonic() + timeout)
            if self.on_dispatch is not None:
                type(self).on_dispatch(self, job, slot)

    def _collect(self, ref, inflight: dict, out: RoundReplies, lost: dict[int, str]) -> None:
        """A finished call: its reply through the transport, or its turn lost (the worker replaced)."""
        import ray
        from ray.exceptions import RayTaskError

        slot, job, _ = inflight.pop(ref)
        try:
            data, state, stats = ray.get(ref)
        except RayTaskError as exc:  # the client code raised: fail as the in-process run would
            raise exc.as_instanceof_cause() from None
        except Exception as exc:  # noqa: BLE001 - the worker died (killed, OOM, node lost)
            lost[job.client] = f"worker died: {reason(exc)}"
            self.pool.replace(slot)
            return
        upload = self.ctx.transport.receive(data, round=job.round, client=job.client, direction=UP)
        out.replies[job.client] = ClientReply(job.client, upload, state, stats)
        slot.state = "idle"

    def _expire(self, inflight: dict, lost: dict[int, str]) -> None:
        """Calls past ``client_timeout_s`` lose their turn (worker replaced); starting workers past theirs die."""
        rt, now = self.ctx.cfg.runtime, time.monotonic()
        for ref, (slot, job, deadline) in list(inflight.items()):
            if now >= deadline:
                del inflight[ref]
                lost[job.client] = f"timed out after runtime.client_timeout_s = {rt.client_timeout_s:g} s"
                self.pool.replace(slot)
        for slot in self.pool.slots:
            if slot.state == "starting" and now >= slot.start_deadline:
                self.pool.expire(slot, f"did not start within {rt.start_timeout_s:g} s")

    def _attempt(self, jobs: list[ClientJob], out: RoundReplies, sent: set[int]) -> dict[int, str]:
        """Run ``jobs`` over the pool once; fills ``out.replies`` and ``sent`` (the clients whose download was sent)
        and returns the lost turns {client: reason}."""
        import ray

        rt = self.ctx.cfg.runtime
        queue = deque(jobs)
        inflight: dict[Any, tuple[WorkerSlot, ClientJob, float]] = {}
        lost: dict[int, str] = {}
        timeout = rt.client_timeout_s if rt.client_timeout_s is not None else float("inf")
        while queue or inflight:
            self._dispatch(queue, inflight, timeout, sent)
            starting = [s for s in self.pool.slots if s.state == "starting"]
            if queue and not inflight and not starting:
                error = next((s.error for s in self.pool.slots if s.error), "")
                for job in queue:
                    lost[job.client] = f"no worker available ({error})"
                break
            deadlines = [d for _, _, d in inflight.values()] + [s.start_deadline for s in starting]
            wait = max(0.0, min(deadlines) - time.monotonic())
            refs = list(inflight) + [s.ready_ref for s in starting]
            done, _ = ray.wait(refs, num_returns=1, timeout=None if wait == float("inf") else wait)
            for ref in done:
                if ref in inflight:
                    self._collect(ref, inflight, out, lost)
                else:
                    self.pool.started(next(s for s in starting if s.ready_ref == ref))
            self._expire(inflight, lost)
        return lost

    # -- split learning: one session at a time, a client worker and the server's worker ---------------
    def call(self, slot: WorkerSlot, method: str, *args, round: int) -> Any:
        """One call of a split session on ``slot``'s worker, with the per-call timeout. A lost client worker
        raises :class:`ClientLost` (and is replaced); a lost server worker :class:`ServerLostError`."""
        import ray
        from ray.exceptions import GetTimeoutError, RayTaskError

        timeout = self.ctx.cfg.runtime.client_timeout_s
        try:
            return ray.get(getattr(slot.actor, method).remote(*args), timeout=timeout)
        except RayTaskError as exc:  # the session's code raised: fail as the in-process run would
            raise exc.as_instanceof_cause() from None
        except GetTimeoutError:
            why = f"timed out after runtime.client_timeout_s = {timeout:g} s"
        except Exception as exc:  # noqa: BLE001 - the worker died (killed, out of memory, node lost)
            why = f"worker died: {reason(exc)}"
        if slot is self.pool.server:
            kill([slot.actor])
            slot.state = "dead"
            raise ServerLostError(f"round {round}: the split server's Ray worker is lost ({why})", round)
        self.lost_turns += 1
        self.pool.replace(slot)
        raise ClientLost(why)

    def split_session(self, trainer, job: ClientJob, body: dict):
        self._start()
        server_slot = self.pool.server
        if server_slot is None or server_slot.state == "dead":
            raise ServerLostError(f"round {job.round}: the split server's Ray worker is lost", job.round)
        channels = trainer.channels
        if not self._server_synced:  # a fresh (or parked) server worker: it gets the driver's caches (resume)
            self.call(server_slot, "split_server_load_caches", channels.export_caches("server"), round=job.round)
            self._server_synced = True
        slot = self.pool.idle_slot()
        if slot is None:
            raise ClientLost("no worker available")
        key = (job.round, job.client)  # a session retried in its round gets its download again: a retransmission
        data = self.ctx.transport.send(job.download, round=job.round, client=job.client, direction=DOWN,
                                       retransmit=key in self._session_sent)
        self._session_sent = {k for k in self._session_sent if k[0] == job.round} | {key}
        baton: dict = {"rng": None}  # the generator state, handed from side to side with the messages
        client = RayClient(self, slot, job.round, job.client, baton)
        server = RayServer(self, server_slot, job.round, job.client, baton, channels, client)
        slot.state = "busy"
        baton["rng"] = client.call("split_client_begin", job.round, job.client, data, job.state,
                                   channels.export_caches("client", job.client))
        if self.on_dispatch is not None:
            type(self).on_dispatch(self, job, slot)
        server.call("split_server_begin", job.round, job.client, job.state, body)
        return client, server
