"""The default backend: every client turn runs in this process, on the one shared model, one after another."""

from __future__ import annotations

from dataclasses import replace

from fedtune.runtime.base import BACKENDS, Backend, ClientJob, RoundReplies
from fedtune.split.session import LocalClient, LocalServer, open_client_side, open_server_side


@BACKENDS.register("inprocess")
class InProcessBackend(Backend):
    name = "inprocess"

    def run_clients(self, paradigm, jobs: list[ClientJob]) -> RoundReplies:
        transport = self.ctx.transport
        out = RoundReplies()
        for job in jobs:
            down = None
            if job.download is not None:
                down = transport.download(job.download, round=job.round, client=job.client)
            reply = paradigm.run_client(replace(job, download=down))
            reply.upload = transport.upload(reply.upload, round=job.round, client=job.client)
            out.replies[job.client] = reply
        return out

    def split_session(self, trainer, job: ClientJob, body: dict):
        transport = self.ctx.transport
        down = transport.download(job.download, round=job.round, client=job.client)
        client = open_client_side(trainer, replace(job, download=down))
        server = open_server_side(trainer, job, body)
        return (LocalClient(client, transport, job.round, job.client),
                LocalServer(server, transport, job.round, job.client))
