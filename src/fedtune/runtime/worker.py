"""What one Ray worker actor runs: its own copy of the run, and whichever client (or split server) it is handed.

A worker builds the context (base model + LoRA, tokenized data, partitions) and the paradigm from the
driver's resolved configuration, exactly as the driver does, then serves client turns. It keeps no client
between calls: each call brings the client's private state and the downloaded message as wire bytes, and
returns the upload as wire bytes plus the new state, so a result does not depend on which worker ran it.
A worker process can serve later runs too: :meth:`RunWorker.prepare` rebuilds its copy only when the
configuration changes. In split learning a worker runs one side of a session at a time (the client's, or the
server's on the server worker), keeping that side's autograd graph between calls; the random generator's state
travels with the calls (see :mod:`fedtune.split.session`). SplitCom's reuse caches: a client worker loads the
client's with its session and hands back what the session touched; the server worker keeps the server's between
sessions (loaded by the driver when the worker starts, and a client's reset when its session is lost). Their
spill files go to this worker's own temporary directory. This module does not import Ray;
:mod:`fedtune.runtime.ray_backend` makes the actors.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedtune.comm.messages import Message, decode, encode
from fedtune.runtime.base import ClientJob, CopyBuilder
from fedtune.split.session import open_client_side, open_server_side, rng_state, set_rng_state

if TYPE_CHECKING:
    from fedtune.split.protocol import SideReport


def _copy_key(data: dict) -> str:
    """What a worker's copy of the run depends on: not the run's name, length, checkpointing or Ray settings."""
    data = json.loads(json.dumps(data))
    for key in ("name", "checkpoint"):
        data.pop(key, None)
    for key in ("rounds", "min_clients", "stop_after_rejected_rounds"):
        data.get("federation", {}).pop(key, None)
    data["runtime"] = {k: data.get("runtime", {}).get(k) for k in ("device", "threads")}
    return json.dumps(data, sort_keys=True)


class RunWorker:
    def __init__(self, threads: int, build_copy: CopyBuilder) -> None:
        torch.set_num_threads(max(1, int(threads)))
        self.build_copy = build_copy
        self.key: str | None = None
        self.ctx = None
        self.paradigm = None
        self.tmp: str | None = None
        self.builds = 0
        self.client_side = None  # split learning: the side of a session this worker is running
        self.server_side = None

    def prepare(self, cfg_data: dict) -> dict:
        """Build this worker's copy of the run for ``cfg_data`` (the driver's resolved config) unless it holds it
        already; returns where the worker runs."""
        from fedtune.config import build_config

        data = {**cfg_data, "runtime": {**cfg_data.get("runtime", {}), "backend": "inprocess", "progress": False}}
        key = _copy_key(data)
        if key != self.key:
            self.key, self.ctx, self.paradigm = None, None, None
            if self.tmp:
                shutil.rmtree(self.tmp, ignore_errors=True)
            cfg = build_config(data)
            self.tmp = tempfile.mkdtemp(prefix="fedtune-worker-")
            self.ctx, self.paradigm = self.build_copy(cfg, Path(self.tmp))
            self.key = key
            self.builds += 1
        try:
            import ray

            node = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - outside Ray (unit use)
            node = "local"
        return {"node_id": node, "pid": os.getpid(), "device": str(self.ctx.device), "builds": self.builds}

    def run(self, round: int, client: int, download: bytes | None, state: dict) -> tuple[bytes, dict, dict]:
        """One client turn: decode the download, train, return (upload bytes, new private state, stats)."""
        job = ClientJob(round, client, decode(download) if download is not None else None, state)
        reply = self.paradigm.run_client(job)
        return encode(reply.upload), reply.state, reply.stats

    # -- split learning: one side of a session per call ----------------------------------------------
    def _rng(self) -> dict:
        return rng_state(self.ctx.device)

    def _set_rng(self, state: dict | None) -> None:
        set_rng_state(state, self.ctx.device)

    def split_client_begin(self, round: int, client: int, download: bytes, state: dict, caches: dict) -> dict:
        """Start a client's session (its blocks, stream, reuse caches, optimizer; seeds the generator); returns
        the generator."""
        trainer = self.paradigm.trainer
        trainer.channels.load_caches("client", caches)
        self.client_side = open_client_side(trainer, ClientJob(round, client, decode(download), state))
        return self._rng()

    def split_client_forward(self, rng: dict) -> tuple[bytes, int | None, dict, dict]:
        self._set_rng(rng)
        message, baseline, info = self.client_side.forward()
        return encode(message), _baseline_bytes(message, baseline), info, self._rng()

    def split_client_tail(self, body: bytes, rng: dict) -> tuple[bytes, int | None, float, dict]:
        self._set_rng(rng)
        message, baseline, loss = self.client_side.tail(decode(body))
        return encode(message), _baseline_bytes(message, baseline), loss, self._rng()

    def split_client_backward(self, grads: bytes) -> bytes | None:
        failure = self.client_side.backward(decode(grads))
        return None if failure is None else encode(failure)

    def split_client_abort(self) -> None:
        if getattr(self, "client_side", None) is not None:
            self.client_side.abort()

    def split_client_finish(self, failure: str | None, mean_loss: float) -> tuple[bytes, int, dict, SideReport]:
        side, self.client_side = self.client_side, None
        message, memory, stream = side.finish(failure, mean_loss)
        return encode(message), memory, stream, side.report()

    def split_server_load_caches(self, caches: dict, client: int | None = None) -> None:
        """Replace the server's reuse caches (one client's, when given) with the driver's."""
        self.paradigm.trainer.channels.load_caches("server", caches, client)

    def split_server_begin(self, round: int, client: int, state: dict, body: dict) -> None:
        self.server_side = open_server_side(self.paradigm.trainer, ClientJob(round, client, None, state), body)

    def split_server_step(self, up: bytes, rows: list, epoch: int, rng: dict) -> tuple:
        self._set_rng(rng)
        message, baseline, loss = self.server_side.step(decode(up), rows, epoch)
        return encode(message), _baseline_bytes(message, baseline), loss, self._rng()

    def split_server_forward(self, up: bytes, rows: list, epoch: int, rng: dict) -> tuple[bytes, int | None, dict]:
        self._set_rng(rng)
        message, baseline = self.server_side.forward(decode(up), rows, epoch)
        return encode(message), _baseline_bytes(message, baseline), self._rng()

    def split_server_backward(self, tail_grads: bytes) -> tuple[bytes, int | None]:
        message, baseline = self.server_side.backward(decode(tail_grads))
        return encode(message), _baseline_bytes(message, baseline)

    def split_server_abort(self) -> None:
        if getattr(self, "server_side", None) is not None:
            self.server_side.abort()

    def split_server_finish(self) -> tuple[dict, int, SideReport]:
        side, self.server_side = self.server_side, None
        state, memory = side.finish()
        return state, memory, side.report()


def _baseline_bytes(message: Message, baseline: Message | None) -> int | None:
    """What the transport would record as the message's uncompressed size (None: the message itself)."""
    return None if baseline is None or baseline is message else len(encode(baseline))
