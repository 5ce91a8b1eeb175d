"""Ray backend (``[runtime] backend = "ray"``): a round's client turns run in parallel on a pool of Ray actors.

Each worker actor (:class:`fedtune.runtime.worker.RunWorker`) builds its own copy of the model and data from
the resolved configuration once and then trains whichever client it is handed; the driver keeps every client's
state and ships it with the call, so results do not depend on placement and equal the in-process backend's.
Pool size: ``runtime.workers``, else as many as the cluster fits (``cpus_per_client``, ``gpus_per_client``), at
most the clients sampled per round.
Messages still cross the driver's transport: the driver encodes (and records) each download and ships the bytes;
the worker returns its upload as bytes, which the driver records and decodes.

SplitCom in split learning: each session's thresholds come from the driver's controllers. A client's reuse caches
travel with its session (shipped in, the entries it touched handed back, like its stream position: simulation
bookkeeping, not messages); the server's stay on the server's worker between sessions. The driver merges both
sides' touched entries into its own channels when a round completes, so its checkpoints hold every cache as of the
last complete round; a new server worker (a resumed run) is loaded from there, and so are a lost session's server
entries, so its retry starts where it did.

Faults: a call whose worker dies (killed, out of memory, node lost) or that runs past ``runtime.client_timeout_s``
loses that client's turn; the worker is replaced (a timed-out one killed first). The round goes on with the other
clients if at least ``federation.min_clients`` replied; otherwise the lost turns are retried on fresh workers up to
``runtime.max_retries`` times, and then :class:`~fedtune.errors.ClientQuorumError` stops the run (the runner
leaves a checkpoint of the last complete round to resume from). Lost turns are recorded in the round's
``rejected`` list with ``"lost": true`` and the reason; the client's state is untouched, so it simply takes part
again the next time it is sampled.

Connecting: ``runtime.address`` empty starts a private single-machine Ray instance on 127.0.0.1 (shut down when the
run ends); ``"auto"`` or ``"HOST:PORT"`` joins an existing cluster (left running). ``runtime.auth_token_path``
turns on Ray's token authentication with that token file (else Ray's own settings apply: ``RAY_AUTH_MODE``,
``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``). If Ray is already initialised in this process
(e.g. by a test, a notebook or a benchmark), that connection is used and left open, and the idle pool is parked
at the end of the run for the next run in the process (:func:`release_parked` frees it).
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from fedtune.comm.ledger import DOWN, UP
from fedtune.errors import ClientQuorumError, ConfigError, FedtuneError, ServerLostError
from fedtune.runtime.base import BACKENDS, Backend, ClientJob, ClientLost, ClientReply, RoundReplies

if TYPE_CHECKING:
    from fedtune.compression.channels import SplitChannels

LOOPBACK = "127.0.0.1"
#: Environment variables a worker inherits from the driver when they are set there.
FORWARDED_ENV = ("FEDTUNE_CACHE", "HF_HUB_OFFLINE", "HF_HOME", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@contextmanager
def single_machine() -> Iterator[None]:
    """Keep a private Ray instance on loopback while it starts.

    Ray resolves "127.0.0.1" to the machine's outward address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (its
    single-machine mode), which it reads when ``ray`` is first imported: set it for Ray's own processes (they
    inherit the environment) and for this process (the constant, if ray was imported already), then restore both.
    """
    key = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    saved_env = os.environ.get(key)
    os.environ[key] = "0"
    constants, saved = None, None
    try:
        from ray._private import ray_constants as constants

        saved = constants.ENABLE_RAY_CLUSTER
        constants.ENABLE_RAY_CLUSTER = False
    except (ImportError, AttributeError):  # a Ray without the switch: the environment variable still applies
        constants = None
    try:
        yield
    finally:
        if constants is not None:
            constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved_env


def connect(rt) -> bool:
    """Initialise Ray for ``rt`` (a RuntimeConfig) unless it already is; returns whether this call started it."""
    if rt.auth_token_path:
        path = Path(rt.auth_token_path).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"runtime.auth_token_path: no token file at {path}")
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
        os.environ.pop("RAY_AUTH_TOKEN", None)
    import ray

    if ray.is_initialized():
        return False
    if rt.auth_token_path:
        try:  # Ray caches the auth mode when it is imported; re-read it as Ray itself does when it enables tokens
            from ray._raylet import Config

            Config.initialize("")
        except Exception:  # noqa: BLE001 - older/newer Ray without this hook: the environment still applies
            pass
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": rt.progress,
                              "configure_logging": True, "logging_level": "warning"}
    try:
        if rt.address:
            ray.init(address=rt.address, **kwargs)
        else:
            with single_machine():
                ray.init(_node_ip_address=LOOPBACK, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {rt.address!r}" if rt.address else "a local Ray instance"
        raise FedtuneError(f"cannot connect to {where}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. ray.exceptions.AuthenticationError
        if type(exc).__name__ == "AuthenticationError":
            raise FedtuneError(f"Ray refused the connection (token authentication): {exc}. Set "
                               "runtime.auth_token_path to the cluster's token file") from None
        raise
    return True


def _kill(actors: list) -> None:
    import ray

    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


#: Idle worker pools left by finished runs whose Ray connection belongs to the caller, by worker configuration.
_PARKED: dict[str, list["_Slot"]] = {}


def release_parked() -> None:
    """Kill the worker pools parked by earlier runs in this process (ray.shutdown() also ends them)."""
    while _PARKED:
        _kill([s.actor for s in _PARKED.popitem()[1]])


@dataclass
class _Slot:
    """One place in the worker pool: its current actor and whether it is starting, idle, busy or dead."""

    index: int
    actor: Any
    ready_ref: Any
    start_deadline: float
    state: str = "starting"  # starting | idle | busy | dead
    info: dict = field(default_factory=dict)
    error: str = ""


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = next((line for line in text if line.strip()), type(exc).__name__)
    return f"{type(exc).__name__}: {first[:200]}"


@BACKENDS.register("ray")
class RayBackend(Backend):
    name = "ray"

    #: Test and fault-injection seam: when set, called as ``on_dispatch(backend, job, worker)`` right after a
    #: client's call has been submitted to ``worker.actor`` (so while it runs; ``worker.info`` has its node and
    #: pid). The fault tests use it to ``ray.kill`` a worker mid-call or to freeze it (SIGSTOP) so that it times
    #: out. fedtune itself never sets it.
    on_dispatch: Callable[["RayBackend", ClientJob, _Slot], None] | None = None

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise ValueError for configurations this backend cannot run (called by config validation)."""
        from fedtune.paradigms import PARADIGMS

        paradigm = PARADIGMS.get(cfg.paradigm)
        if paradigm.federated and not (hasattr(paradigm, "run_client") or hasattr(paradigm, "server_side")):
            raise ValueError(f"runtime.backend = 'ray' is not yet supported for paradigm {cfg.paradigm!r}; "
                             "use runtime.backend = 'inprocess'")

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self._slots: list[_Slot] = []
        self._server: _Slot | None = None  # split learning: the server's worker
        self._server_synced = False  # whether the server's worker holds the driver's server-side reuse caches
        self._owns_ray = False
        self._actor_cls = None
        self.lost_turns = 0
        self.retries = 0
        self.nodes: set[str] = set()

    # -- pool ------------------------------------------------------------------------------------
    def _threads(self, cpus: float | None = None) -> int:
        rt = self.ctx.cfg.runtime
        return rt.threads or max(1, int(rt.cpus_per_client if cpus is None else cpus))

    def _worker_env(self) -> dict[str, str]:
        import fedtune

        env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(self._threads())}
        env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
        source = Path(fedtune.__file__).resolve().parents[1]
        if source.name == "src":  # running from a source checkout, not an installed package: let workers import it
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(source), os.environ.get("PYTHONPATH", "")) if p)
        return env

    def _pool_size(self, ray) -> int:
        rt, fed = self.ctx.cfg.runtime, self.ctx.cfg.federation
        if rt.workers:
            return rt.workers
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
        want = fed.sampled
        if self._split:  # sessions run one after another: one worker, and a spare so a lost one costs no wait;
            want = min(2, want)  # the server's worker is placed too
            cpus, gpus = cpus - rt.server_cpus, gpus - rt.server_gpus
        fits = int(cpus // rt.cpus_per_client)
        if rt.gpus_per_client > 0:
            fits = min(fits, int(gpus // rt.gpus_per_client))
        return max(1, min(want, fits))

    def _spawn(self, index: int) -> _Slot:
        """A fresh worker actor for pool place ``index`` (-1: the split server's worker)."""
        rt = self.ctx.cfg.runtime
        cpus, gpus = (rt.server_cpus, rt.server_gpus) if index < 0 else (rt.cpus_per_client, rt.gpus_per_client)
        actor = self._actor_cls.options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0, runtime_env={"env_vars": self._env},
        ).remote(self._threads(cpus))
        return self._prepare(_Slot(index, actor, None, 0.0))

    def _prepare(self, slot: _Slot) -> _Slot:
        """Have the slot's actor build (or keep) its copy of this run; the slot is 'starting' until it answers."""
        slot.ready_ref = slot.actor.prepare.remote(self._cfg_data)
        slot.start_deadline = time.monotonic() + self.ctx.cfg.runtime.start_timeout_s
        slot.state, slot.error = "starting", ""
        return slot

    def _pool_key(self, ray) -> str:
        """Pools are interchangeable within one Ray session when their actors have the same resources and env."""
        rt = self.ctx.cfg.runtime
        return json.dumps([ray.get_runtime_context().get_job_id(), rt.cpus_per_client, rt.gpus_per_client,
                           rt.server_cpus, rt.server_gpus, rt.threads, self._env], sort_keys=True)

    def _start(self) -> None:
        if self._slots:
            return
        self._owns_ray = connect(self.ctx.cfg.runtime)
        import ray

        from fedtune.runtime.worker import RunWorker

        from fedtune.paradigms import PARADIGMS

        self._split = hasattr(PARADIGMS.get(self.ctx.cfg.paradigm), "server_side")
        self._actor_cls = ray.remote(RunWorker)
        self._cfg_data = self.ctx.cfg.model_dump(mode="json")
        self._env = self._worker_env()
        self._key = self._pool_key(ray)
        size = self._pool_size(ray)
        parked = _PARKED.pop(self._key, None)
        release_parked()  # pools parked with other resources would hold what this one needs
        if parked is not None and len([s for s in parked if s.index >= 0]) != size:
            _kill([s.actor for s in parked])
            parked = None
        try:
            self._launch(ray, size, parked)
        except FedtuneError:
            if parked is None:
                raise
            self._launch(ray, size, None)  # a parked process may have died since: start afresh once

    def _launch(self, ray, size: int, parked: list[_Slot] | None) -> None:
        rt = self.ctx.cfg.runtime
        if parked is not None:  # reuse the processes; each rebuilds its copy of the run if the config changed
            reuse = {s.index: s for s in parked}
            indices = [*range(size), *([-1] if self._split else [])]
            slots = [self._spawn(i) if i not in reuse or reuse[i].state == "dead" else self._prepare(reuse.pop(i))
                     for i in indices]
            _kill([s.actor for s in reuse.values()])  # a parked server this run does not need
        else:
            slots = [self._spawn(i) for i in [*range(size), *([-1] if self._split else [])]]
        self._slots = [s for s in slots if s.index >= 0]
        self._server = next((s for s in slots if s.index < 0), None)
        self._server_synced = False
        refs = [s.ready_ref for s in slots]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=rt.start_timeout_s)
        if len(ready) < len(refs):
            have = ray.cluster_resources()
            self.close(park=False)
            server = (f", the split server's {rt.server_cpus:g} CPU and {rt.server_gpus:g} GPU (runtime.server_cpus / "
                      "server_gpus)") if self._split else ""
            raise FedtuneError(
                f"{len(refs) - len(ready)} of {len(refs)} Ray workers did not start within runtime.start_timeout_s = "
                f"{rt.start_timeout_s:g} s: each client worker asks for {rt.cpus_per_client:g} CPU and "
                f"{rt.gpus_per_client:g} GPU (runtime.cpus_per_client / gpus_per_client){server}; the cluster has "
                f"{have}")
        for slot in slots:
            try:
                slot.info = ray.get(slot.ready_ref)
            except Exception as exc:  # noqa: BLE001 - the worker could not build its copy of the run
                self.close(park=False)
                raise FedtuneError(f"a Ray worker failed to start: {_reason(exc)}") from None
            slot.state = "idle"
            self._note_node(slot)
        reused = " (reused processes)" if parked is not None else ""
        server = f" + the split server's worker on {self._server.info['node']}" if self._server else ""
        self.ctx.progress.log(f"ray backend: {size} worker(s){reused} on node(s) {', '.join(sorted(self.nodes))}"
                              f"{server}")

    def _note_node(self, slot: _Slot) -> None:
        """Record the address of the node a worker runs on (as the cluster knows it)."""
        import ray

        node_id = slot.info.get("node_id")
        address = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), str(node_id))
        slot.info["node"] = address
        self.nodes.add(address)

    def _replace(self, slot: _Slot, kill: bool) -> None:
        import ray

        if kill:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._slots[slot.index] = self._spawn(slot.index)

    def _revive(self) -> None:
        """Give every dead slot a fresh actor (before a retry or a new round)."""
        for slot in list(self._slots):
            if slot.state == "dead":
                self._replace(slot, kill=True)

    def close(self, park: bool = True) -> None:
        """Release the pool: kill its actors and shut down a Ray instance this run started. When the caller owns
        the Ray connection (a test, notebook or benchmark), an idle pool is parked instead: the next run in this
        process with the same worker resources reuses its processes (see :func:`release_parked`)."""
        if not self._slots and self._server is None and not self._owns_ray:
            return
        import ray

        slots = self._slots + ([self._server] if self._server is not None else [])
        idle = all(s.state in ("idle", "starting", "dead") for s in slots)
        if park and idle and self._slots and not self._owns_ray and ray.is_initialized():
            _PARKED[self._key] = slots
        else:
            _kill([s.actor for s in slots])
        self._slots, self._server = [], None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def info(self) -> dict:
        info = {"backend": self.name, "workers": len(self._slots), "nodes": sorted(self.nodes),
                "lost_client_turns": self.lost_turns, "retries": self.retries}
        if self._server is not None:
            info["server_node"] = self._server.info.get("node")
        return info

    # -- a round -----------------------------------------------------------------------------------
    def run_clients(self, paradigm, jobs: list[ClientJob]) -> RoundReplies:
        self._start()
        cfg = self.ctx.cfg
        need = min(cfg.federation.min_clients, len(jobs))
        out = RoundReplies()
        todo = list(jobs)
        for attempt in range(cfg.runtime.max_retries + 1):
            self._revive()
            lost = self._attempt(todo, out)
            out.lost.update(lost)
            self.lost_turns += len(lost)
            if len(out.replies) >= need or not lost:
                break
            if attempt < cfg.runtime.max_retries:
                self.retries += 1
                self.ctx.progress.log(f"[yellow]round {jobs[0].round}: {len(out.replies)} of {len(jobs)} clients "
                                      f"replied (min_clients = {need}); retrying clients {sorted(lost)}")
                todo = [j for j in jobs if j.client in lost]
        for cid in out.replies:
            out.lost.pop(cid, None)
        if len(out.replies) < need:
            round = jobs[0].round
            detail = "; ".join(f"client {c}: {r}" for c, r in sorted(out.lost.items()))
            raise ClientQuorumError(
                f"round {round}: only {len(out.replies)} of {len(jobs)} clients replied, fewer than "
                f"federation.min_clients = {need}, after {cfg.runtime.max_retries} retries ({detail})", round)
        for cid, reason in sorted(out.lost.items()):
            self.ctx.progress.log(f"[yellow]round {jobs[0].round}: client {cid} lost: {reason}")
        return out

    def _attempt(self, jobs: list[ClientJob], out: RoundReplies) -> dict[int, str]:
        """Run ``jobs`` over the pool once; fills ``out.replies`` and returns the lost turns {client: reason}."""
        import ray
        from ray.exceptions import RayTaskError

        transport, rt = self.ctx.transport, self.ctx.cfg.runtime
        queue = deque(jobs)
        inflight: dict[Any, tuple[_Slot, ClientJob, float]] = {}
        lost: dict[int, str] = {}
        timeout = rt.client_timeout_s if rt.client_timeout_s is not None else float("inf")
        while queue or inflight:
            for slot in self._slots:
                if not queue:
                    break
                if slot.state != "idle":
                    continue
                job = queue.popleft()
                data = None
                if job.download is not None:
                    data = transport.send(job.download, round=job.round, client=job.client, direction=DOWN)
                ref = slot.actor.run.remote(job.round, job.client, data, job.state)
                slot.state = "busy"
                inflight[ref] = (slot, job, time.monotonic() + timeout)
                if self.on_dispatch is not None:
                    type(self).on_dispatch(self, job, slot)
            starting = [s for s in self._slots if s.state == "starting"]
            if queue and not inflight and not starting:
                error = next((s.error for s in self._slots if s.error), "")
                for job in queue:
                    lost[job.client] = f"no worker available ({error})"
                break
            deadlines = [d for _, _, d in inflight.values()] + [s.start_deadline for s in starting]
            wait = max(0.0, min(deadlines) - time.monotonic())
            refs = list(inflight) + [s.ready_ref for s in starting]
            done, _ = ray.wait(refs, num_returns=1, timeout=None if wait == float("inf") else wait)
            for ref in done:
                if ref in inflight:
                    slot, job, _ = inflight.pop(ref)
                    try:
                        data, state, stats = ray.get(ref)
                    except RayTaskError as exc:  # the client code raised: fail as the in-process run would
                        raise exc.as_instanceof_cause() from None
                    except Exception as exc:  # noqa: BLE001 - the worker died (killed, OOM, node lost)
                        lost[job.client] = f"worker died: {_reason(exc)}"
                        self._replace(slot, kill=True)
                        continue
                    upload = transport.receive(data, round=job.round, client=job.client, direction=UP)
                    out.replies[job.client] = ClientReply(job.client, upload, state, stats)
                    slot.state = "idle"
                else:
                    slot = next(s for s in starting if s.ready_ref == ref)
                    try:
                        slot.info = ray.get(ref)
                        slot.state = "idle"
                        self._note_node(slot)
                    except Exception as exc:  # noqa: BLE001 - a replacement failed to start
                        slot.state, slot.error = "dead", _reason(exc)
            now = time.monotonic()
            for ref, (slot, job, deadline) in list(inflight.items()):
                if now >= deadline:
                    del inflight[ref]
                    lost[job.client] = f"timed out after runtime.client_timeout_s = {rt.client_timeout_s:g} s"
                    self._replace(slot, kill=True)
            for slot in self._slots:
                if slot.state == "starting" and now >= slot.start_deadline:
                    try:
                        ray.kill(slot.actor, no_restart=True)
                    except Exception:  # noqa: BLE001
                        pass
                    slot.state, slot.error = "dead", f"did not start within {rt.start_timeout_s:g} s"
        return lost

    # -- split learning: one session at a time, a client worker and the server's worker ---------------
    def _idle_slot(self):
        """An idle client worker, waiting for one that is starting if need be."""
        import ray

        self._revive()
        while True:
            for slot in self._slots:
                if slot.state == "idle":
                    return slot
            starting = [s for s in self._slots if s.state == "starting"]
            if not starting:
                raise ClientLost("no worker available")
            wait = max(0.0, min(s.start_deadline for s in starting) - time.monotonic())
            done, _ = ray.wait([s.ready_ref for s in starting], num_returns=1, timeout=wait)
            for slot in starting:
                if slot.ready_ref in done:
                    try:
                        slot.info, slot.state = ray.get(slot.ready_ref), "idle"
                        self._note_node(slot)
                    except Exception as exc:  # noqa: BLE001
                        slot.state, slot.error = "dead", _reason(exc)
                elif time.monotonic() >= slot.start_deadline:
                    _kill([slot.actor])
                    slot.state, slot.error = "dead", "did not start in time"

    def _call(self, slot: _Slot, method: str, *args, round: int) -> Any:
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
            reason = f"timed out after runtime.client_timeout_s = {timeout:g} s"
        except Exception as exc:  # noqa: BLE001 - the worker died (killed, out of memory, node lost)
            reason = f"worker died: {_reason(exc)}"
        if slot is self._server:
            _kill([slot.actor])
            slot.state = "dead"
            raise ServerLostError(f"round {round}: the split server's Ray worker is lost ({reason})", round)
        self.lost_turns += 1
        self._replace(slot, kill=True)
        raise ClientLost(reason)

    def split_session(self, paradigm, job: ClientJob, body: dict):
        self._start()
        if self._server is None or self._server.state == "dead":
            raise ServerLostError(f"round {job.round}: the split server's Ray worker is lost", job.round)
        channels = paradigm.channels
        if not self._server_synced:  # a fresh (or parked) server worker: it gets the driver's caches (resume)
            self._call(self._server, "split_server_load_caches", channels.export_caches("server"), round=job.round)
            self._server_synced = True
        slot = self._idle_slot()
        data = self.ctx.transport.send(job.download, round=job.round, client=job.client, direction=DOWN)
        baton: dict = {"rng": None}  # the generator state, handed from side to side with the messages
        client = _RayClient(self, slot, job.round, job.client, baton)
        server = _RayServer(self, self._server, job.round, job.client, baton, channels, client)
        slot.state = "busy"
        baton["rng"] = client.call("split_client_begin", job.round, job.client, data, job.state,
                                   channels.export_caches("client", job.client))
        if self.on_dispatch is not None:
            type(self).on_dispatch(self, job, slot)
        server.call("split_server_begin", job.round, job.client, job.state["cut"], body, job.state["thetas"])
        return client, server


class _RayClient:
    """The driver's end of a client worker's split session: relays its messages through the transport."""

    def __init__(self, backend: RayBackend, slot: _Slot, round: int, cid: int, baton: dict) -> None:
        self.b, self.slot, self.round, self.cid, self.baton = backend, slot, round, cid, baton

    def call(self, method: str, *args) -> Any:
        return self.b._call(self.slot, method, *args, round=self.round)

    def _up(self, data: bytes, baseline: int | None):
        return self.b.ctx.transport.receive(data, round=self.round, client=self.cid, direction=UP,
                                            baseline_bytes=baseline)

    def forward(self) -> tuple[bytes, dict]:
        data, baseline, info, self.baton["rng"] = self.call("split_client_forward", self.baton["rng"])
        self._up(data, baseline)
        return data, info

    def tail(self, body: bytes) -> tuple[bytes | None, float]:
        data, baseline, loss, self.baton["rng"] = self.call("split_client_tail", body, self.baton["rng"])
        if data is not None:
            self._up(data, baseline)
        return data, loss

    def backward(self, grads: bytes) -> None:
        self.call("split_client_backward", grads)

    def abort(self) -> None:
        self.call("split_client_abort")

    def release(self) -> None:
        """Free the worker of a session that cannot go on (the server's worker was lost), for the next run."""
        if self.b._slots[self.slot.index] is not self.slot:  # this worker was lost already (and replaced)
            return
        try:
            self.abort()
        except ClientLost:  # it is lost now
            return
        self.slot.state = "idle"

    def finish(self, failure: str | None, mean_loss: float):
        data, memory, stream, report = self.call("split_client_finish", failure, mean_loss)
        self.slot.state = "idle"
        return self._up(data, None), memory, stream, report


class _RayServer:
    """The driver's end of the server worker's half of a session (if the worker is lost, the client's is freed)."""

    def __init__(self, backend: RayBackend, slot: _Slot, round: int, cid: int, baton: dict, channels: SplitChannels,
                 client: _RayClient) -> None:
        self.b, self.slot, self.round, self.cid, self.baton = backend, slot, round, cid, baton
        self.channels = channels  # the driver's: its caches are those of the last complete round
        self.client = client

    def call(self, method: str, *args) -> Any:
        try:
            return self.b._call(self.slot, method, *args, round=self.round)
        except ServerLostError:
            self.client.release()
            raise

    def _down(self, data: bytes, baseline: int | None) -> bytes:
        self.b.ctx.transport.receive(data, round=self.round, client=self.cid, direction=DOWN, baseline_bytes=baseline)
        return data

    def step(self, up: bytes, info: dict) -> tuple[bytes | None, float]:
        data, baseline, loss, self.baton["rng"] = self.call("split_server_step", up, info["rows"], info["epoch"],
                                                            self.baton["rng"])
        return (None if data is None else self._down(data, baseline)), loss

    def forward(self, up: bytes, info: dict) -> bytes:
        data, baseline, self.baton["rng"] = self.call("split_server_forward", up, info["rows"], info["epoch"],
                                                      self.baton["rng"])
        return self._down(data, baseline)

    def backward(self, tail_grads: bytes) -> bytes:
        return self._down(*self.call("split_server_backward", tail_grads))

    def abort(self, lost: bool = False) -> None:
        """Drop the pending step; a lost session also resets this client's server caches to the driver's (its
        session in this round has not been merged there), so a retry starts from where this one did."""
        self.call("split_server_abort")
        if lost:
            self.call("split_server_load_caches", self.channels.export_caches("server", self.cid), self.cid)

    def finish(self):
        return self.call("split_server_finish")
