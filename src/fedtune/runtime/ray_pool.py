"""The Ray backend's pool of worker actors: starting it, replacing lost workers, parking an idle pool for reuse.

Each worker actor (:class:`fedtune.runtime.worker.RunWorker`) builds its own copy of the run once (through the
copy builder the context builder hands down) and then serves whichever client it is handed. Pool size:
``runtime.workers``, else as many as the cluster fits (``cpus_per_client``, ``gpus_per_client``), at most the
clients sampled per round (split learning, whose sessions run one at a time: at most 2, plus the server's worker).

If Ray is already initialised in this process (a test, notebook or benchmark), that connection is used and left
open, and the idle pool is parked at the end of the run for the next run in the process (:func:`release_parked`
frees it).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.core.errors import FedtuneError
from fedtune.runtime.ray_connect import connect

#: Environment variables a worker inherits from the driver when they are set there.
FORWARDED_ENV = ("FEDTUNE_CACHE", "HF_HUB_OFFLINE", "HF_HOME", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def kill(actors: list) -> None:
    import ray

    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


def reason(exc: BaseException) -> str:
    """One line naming what went wrong in a worker."""
    text = str(exc).strip().splitlines()
    first = next((line for line in text if line.strip()), type(exc).__name__)
    return f"{type(exc).__name__}: {first[:200]}"


@dataclass
class WorkerSlot:
    """One place in the worker pool: its current actor and whether it is starting, idle, busy or dead."""

    index: int  # -1: the split server's worker
    actor: Any
    ready_ref: Any
    start_deadline: float
    state: str = "starting"  # starting | idle | busy | dead
    info: dict = field(default_factory=dict)
    error: str = ""


#: Idle worker pools left by finished runs whose Ray connection belongs to the caller, by worker configuration.
_PARKED: dict[str, list[WorkerSlot]] = {}


def release_parked() -> None:
    """Kill the worker pools parked by earlier runs in this process (ray.shutdown() also ends them)."""
    while _PARKED:
        kill([s.actor for s in _PARKED.popitem()[1]])


class WorkerPool:
    """Client worker slots (and, for split learning, the server's) on one Ray connection."""

    def __init__(self, ctx, build_copy, with_server: bool) -> None:
        self.ctx, self.build_copy, self.with_server = ctx, build_copy, with_server
        self.slots: list[WorkerSlot] = []
        self.server: WorkerSlot | None = None
        self.owns_ray = False
        self.nodes: set[str] = set()
        self._actor_cls = None

    # -- starting ----------------------------------------------------------------------------------
    def _threads(self, cpus: float | None = None) -> int:
        rt = self.ctx.cfg.runtime
        return rt.threads or max(1, int(rt.cpus_per_client if cpus is None else cpus))

    def _worker_env(self) -> dict[str, str]:
        import fedtune

        env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(self._threads()),
               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}  # workers share cores: never spin
        env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
        source = Path(fedtune.__file__).resolve().parents[1]
        if source.name == "src":  # running from a source checkout, not an installed package: let workers import it
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(source), os.environ.get("PYTHONPATH", "")) if p)
        return env

    def _size(self, ray) -> int:
        rt, fed = self.ctx.cfg.runtime, self.ctx.cfg.federation
        if rt.workers:
            return rt.workers
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
        want = fed.sampled
        if self.with_server:  # sessions run one after another: one worker, and a spare so a lost one costs no wait;
            want = min(2, want)  # the server's worker is placed too
            cpus, gpus = cpus - rt.server_cpus, gpus - rt.server_gpus
        fits = int(cpus // rt.cpus_per_client)
        if rt.gpus_per_client > 0:
            fits = min(fits, int(gpus // rt.gpus_per_client))
        return max(1, min(want, fits))

    def spawn(self, index: int) -> WorkerSlot:
        """A fresh worker actor for pool place ``index`` (-1: the split server's worker)."""
        rt = self.ctx.cfg.runtime
        cpus, gpus = (rt.server_cpus, rt.server_gpus) if index < 0 else (rt.cpus_per_client, rt.gpus_per_client)
        actor = self._actor_cls.options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0, runtime_env={"env_vars": self._env},
        ).remote(self._threads(cpus), self.build_copy)
        return self._prepare(WorkerSlot(index, actor, None, 0.0))

    def _prepare(self, slot: WorkerSlot) -> WorkerSlot:
        """Have the slot's actor build (or keep) its copy of this run; the slot is 'starting' until it answers."""
        slot.ready_ref = slot.actor.prepare.remote(self._cfg_data)
        slot.start_deadline = time.monotonic() + self.ctx.cfg.runtime.start_timeout_s
        slot.state, slot.error = "starting", ""
        return slot

    def _key(self, ray) -> str:
        """Pools are interchangeable within one Ray session when their actors have the same resources and env."""
        rt = self.ctx.cfg.runtime
        return json.dumps([ray.get_runtime_context().get_job_id(), rt.cpus_per_client, rt.gpus_per_client,
                           rt.server_cpus, rt.server_gpus, rt.threads, self._env], sort_keys=True)

    def start(self) -> None:
        """Connect and start the pool (reusing a parked one with the same resources), unless it runs already."""
        if self.slots:
            return
        self.owns_ray = connect(self.ctx.cfg.runtime)
        import ray

        from fedtune.runtime.worker import RunWorker

        self._actor_cls = ray.remote(RunWorker)
        self._cfg_data = self.ctx.cfg.model_dump(mode="json")
        self._env = self._worker_env()
        self.key = self._key(ray)
        size = self._size(ray)
        parked = _PARKED.pop(self.key, None)
        release_parked()  # pools parked with other resources would hold what this one needs
        if parked is not None and len([s for s in parked if s.index >= 0]) != size:
            kill([s.actor for s in parked])
            parked = None
        try:
            self._launch(ray, size, parked)
        except FedtuneError:
            if parked is None:
                raise
            self._launch(ray, size, None)  # a parked process may have died since: start afresh once

    def _launch(self, ray, size: int, parked: list[WorkerSlot] | None) -> None:
        indices = [*range(size), *([-1] if self.with_server else [])]
        if parked is not None:  # reuse the processes; each rebuilds its copy of the run if the config changed
            reuse = {s.index: s for s in parked}
            slots = [self.spawn(i) if i not in reuse or reuse[i].state == "dead" else self._prepare(reuse.pop(i))
                     for i in indices]
            kill([s.actor for s in reuse.values()])  # a parked server this run does not need
        else:
            slots = [self.spawn(i) for i in indices]
        self.slots = [s for s in slots if s.index >= 0]
        self.server = next((s for s in slots if s.index < 0), None)
        self._await_start(ray, slots)
        reused = " (reused processes)" if parked is not None else ""
        server = f" + the split server's worker on {self.server.info['node']}" if self.server else ""
        self.ctx.progress.log(f"ray backend: {size} worker(s){reused} on node(s) {', '.join(sorted(self.nodes))}"
                              f"{server}")

    def _await_start(self, ray, slots: list[WorkerSlot]) -> None:
        rt = self.ctx.cfg.runtime
        refs = [s.ready_ref for s in slots]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=rt.start_timeout_s)
        if len(ready) < len(refs):
            have = ray.cluster_resources()
            self.close(park=False)
            server = (f", the split server's {rt.server_cpus:g} CPU and {rt.server_gpus:g} GPU (runtime.server_cpus / "
                      "server_gpus)") if self.with_server else ""
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
                raise FedtuneError(f"a Ray worker failed to start: {reason(exc)}") from None
            slot.state = "idle"
            self.note_node(slot)

    # -- keeping it alive --------------------------------------------------------------------------
    def note_node(self, slot: WorkerSlot) -> None:
        """Record the address of the node a worker runs on (as the cluster knows it)."""
        import ray

        node_id = slot.info.get("node_id")
        address = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), str(node_id))
        slot.info["node"] = address
        self.nodes.add(address)

    def started(self, slot: WorkerSlot) -> None:
        """A starting slot's actor answered (or failed): it is idle now, or dead."""
        import ray

        try:
            slot.info = ray.get(slot.ready_ref)
            slot.state = "idle"
            self.note_node(slot)
        except Exception as exc:  # noqa: BLE001 - a replacement failed to start
            slot.state, slot.error = "dead", reason(exc)

    def expire(self, slot: WorkerSlot, why: str) -> None:
        """A starting slot that missed its deadline: kill it, mark it dead."""
        kill([slot.actor])
        slot.state, slot.error = "dead", why

    def replace(self, slot: WorkerSlot) -> None:
        """Kill the slot's actor (if it still lives) and start a fresh one in its place."""
        kill([slot.actor])
        self.slots[slot.index] = self.spawn(slot.index)

    def revive(self) -> None:
        """Give every dead slot a fresh actor (before a retry or a new round)."""
        for slot in list(self.slots):
            if slot.state == "dead":
                self.replace(slot)

    def idle_slot(self) -> WorkerSlot | None:
        """An idle client worker, waiting for one that is starting if need be (None: none will come)."""
        import ray

        self.revive()
        while True:
            for slot in self.slots:
                if slot.state == "idle":
                    return slot
            starting = [s for s in self.slots if s.state == "starting"]
            if not starting:
                return None
            wait = max(0.0, min(s.start_deadline for s in starting) - time.monotonic())
            done, _ = ray.wait([s.ready_ref for s in starting], num_returns=1, timeout=wait)
            for slot in starting:
                if slot.ready_ref in done:
                    self.started(slot)
                elif time.monotonic() >= slot.start_deadline:
                    self.expire(slot, "did not start in time")

    def close(self, park: bool = True) -> None:
        """Release the pool: kill its actors and shut down a Ray instance this run started. When the caller owns
        the Ray connection, an idle pool is parked instead: the next run in this process with the same worker
        resources reuses its processes (see :func:`release_parked`)."""
        if not self.slots and self.server is None and not self.owns_ray:
            return
        import ray

        slots = self.slots + ([self.server] if self.server is not None else [])
        idle = all(s.state in ("idle", "starting", "dead") for s in slots)
        if park and idle and self.slots and not self.owns_ray and ray.is_initialized():
            _PARKED[self.key] = slots
        else:
            kill([s.actor for s in slots])
        self.slots, self.server = [], None
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()
        self.owns_ray = False
