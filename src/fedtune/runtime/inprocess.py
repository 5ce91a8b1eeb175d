"""The default backend: every client turn runs in this process, on the one shared model, one after another."""

from __future__ import annotations

from dataclasses import replace

from fedtune.runtime.base import BACKENDS, Backend, ClientJob, RoundReplies


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

    def split_session(self, paradigm, job: ClientJob, body: dict):
        from fedtune.split.session import LocalClient, LocalServer

        transport = self.ctx.transport
        down = transport.download(job.download, round=job.round, client=job.client)
        client = paradigm.client_side(replace(job, download=down))
        server = paradigm.server_side(job.round, job.client, job.state["cut"], body, job.state["thetas"])
        return (LocalClient(client, transport, job.round, job.client),
                LocalServer(server, transport, job.round, job.client))
