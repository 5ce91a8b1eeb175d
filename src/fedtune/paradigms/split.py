"""Split-FedLLM: split federated LoRA fine-tuning (SplitFed V1/V2, U-shape, SplitFT per-client cuts).

Per step and client: the client runs embeddings and its head blocks and uploads the activations (+ the
attention mask, + the labels in the standard split); the server runs its body blocks (and, standard, the
norm, LM head and loss), back-propagates and returns the cut-layer gradient; the client back-propagates it
and steps. In a U-shape the server returns its body output instead, the client runs its tail blocks, norm,
head and loss, uploads the gradient at the body output, and the exchange unwinds. Token ids never leave the
client; in a U-shape neither do the labels.

Adapters: the run keeps one full global LoRA state. At the start of a client's session the client downloads
the LoRA weights of its own blocks; the server uses one shared body adapter updated by every client in turn
(``server_adapter = "shared"``, SplitFed-V2) or a fresh copy of the global body per client
(``"per_client"``, V1). At the end of the round every block is averaged over the versions trained in that
round, weighted by samples: a client-side block over the clients that held it (their uploads), a server-side
block over the server's copy (V2: one copy weighted by the samples of the clients it served; V1: one copy per
client). Since every block's weights live in the one global state, a block whose owner changes (adaptive
cuts) takes its weights with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from fedtune.comm.ledger import DOWN, UP
from fedtune.comm.messages import Message
from fedtune.compression.channels import SplitChannels
from fedtune.engine.client_data import SampleStream
from fedtune.engine.evaluation import evaluate
from fedtune.engine.seeding import numpy_rng
from fedtune.errors import ClientQuorumError, ConfigError, RoundAbortedError
from fedtune.federated.sampling import local_steps, sample_clients
from fedtune.models.flops import train_flops
from fedtune.models.lora import adapter_state, load_adapter_state
from fedtune.paradigms.base import PARADIGMS, Paradigm, RoundResult
from fedtune.network.devices import client_profiles
from fedtune.split.adaptive import adapt_cuts
from fedtune.split.placement import cuts_from_profiles, measure_client_memory, round_flops
from fedtune.split.cut import Cut, CutError, SplitModel, find_blocks
from fedtune.split.session import ClientSide, ServerSide
from fedtune.runtime.base import ClientJob, ClientLost, backend_of

TensorDict = dict[str, torch.Tensor]



def _weighted_mean(versions: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    total = sum(w for _, w in versions)
    acc = sum(t.to(torch.float64) * (w / total) for t, w in versions)
    return acc.to(versions[0][0].dtype)


@dataclass
class Session:
    """What one client's round of split training produced."""

    client_state: TensorDict | None  # uploaded client-side LoRA weights (None: rejected)
    body_state: TensorDict | None  # the server's body weights after this client (None: rejected)
    loss: float
    client_flops: int
    server_flops: int
    client_memory: int
    server_memory: int
    failure: str | None = None
    stream: dict | None = None  # the client's stream position after the session
    lost: str | None = None  # why the session was lost (a Ray worker died or was late)
    caches: dict | None = None  # sides run in a worker's copy: their touched reuse-cache entries, by side


@PARADIGMS.register("split")
class SplitFed(Paradigm):
    @classmethod
    def lora_rank_pattern(cls, cfg, base_model) -> dict[str, int] | None:
        """Lower LoRA rank on the block(s) adjacent to the (single, fixed) cut (SplitFT)."""
        s = cfg.split
        if s.cut_rank is None:
            return None
        _, _, _, blocks_name = find_blocks(base_model)
        adjacent = {"client": [s.cut - 1], "server": [s.cut], "both": [s.cut - 1, s.cut]}[s.cut_rank_side]
        return {rf"{re.escape(blocks_name)}\.{b}\..*": s.cut_rank for b in adjacent}

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        cfg, s = ctx.cfg, ctx.cfg.split
        self.split = SplitModel(ctx.model)
        L = self.split.num_layers
        self.tail = s.tail if s.ushape else 0
        n = cfg.federation.num_clients
        self.max_blocks = {c: min(L - 1 - self.tail, (s.max_client_blocks or [L] * n)[c]) for c in range(n)}
        self.cuts = {c: (s.cuts[c] if s.cuts else s.cut) for c in range(n)}
        self.global_state = adapter_state(ctx.model)
        self.placement: dict = {}
        if s.cut_policy == "profiles":
            self._place_by_profiles()
        for cid, k in self.cuts.items():
            Cut(k, self.tail).check(L)
            if k > self.max_blocks[cid]:
                raise CutError(f"client {cid}: cut after {k} blocks exceeds its capacity of {self.max_blocks[cid]} blocks")
        self.key_block = self._map_keys_to_blocks()
        self.val_rows: dict[int, list[int]] = {}
        streams = []
        for cid, part in enumerate(ctx.partitions):
            rows = list(part)
            if s.adaptive:
                if len(rows) <= s.val_samples:
                    raise ConfigError(f"split.val_samples = {s.val_samples} leaves client {cid} (with {len(rows)} "
                                      "samples) nothing to train on; lower it or use fewer clients")
                perm = numpy_rng(cfg.seed, "split-val", cid).permutation(len(rows))
                self.val_rows[cid] = sorted(rows[i] for i in perm[: s.val_samples])
                rows = sorted(rows[i] for i in perm[s.val_samples:])
            streams.append(SampleStream(rows, cfg.seed, cid))
        self.streams = streams
        self.cut_history: dict[int, list[int]] = {c: [k] for c, k in self.cuts.items()}
        self.channels = SplitChannels(cfg, ctx.model.config.hidden_size, bool(self.tail), ctx.run_dir / "cache")
        self._sessions_done = 0

    def _place_by_profiles(self) -> None:
        """Initial cuts (and capacities, unless given) from device profiles and measured client memory."""
        ctx, cfg, L = self.ctx, self.ctx.cfg, self.split.num_layers
        n = cfg.federation.num_clients
        profiles = client_profiles(cfg.devices, n)
        g = torch.Generator().manual_seed(cfg.seed)
        shape = (cfg.train.batch_size, cfg.data.max_length)
        ids = torch.randint(0, ctx.model.config.vocab_size, shape, generator=g).to(ctx.device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        memory = measure_client_memory(self.split, batch, ctx.device, self.tail)
        load_adapter_state(ctx.model, self.global_state)  # lr 0 left the weights as they were; be explicit
        steps = max(local_steps(cfg, len(p)) for p in ctx.partitions)

        def flops_of(k: int) -> int:
            return round_flops(ctx.cost, k, self.tail, steps=steps, batch_size=shape[0], seq_len=shape[1])

        cuts, capacities = cuts_from_profiles(profiles, memory, flops_of, num_layers=L, tail=self.tail,
                                              reference_cut=cfg.split.cut, time_budget_s=cfg.split.round_time_budget_s)
        self.cuts = dict(enumerate(cuts))
        if cfg.split.max_client_blocks is None:
            self.max_blocks = dict(enumerate(capacities))
        self.placement = {
            "memory_model": {"fixed_bytes": memory.fixed_bytes, "per_block_bytes": memory.per_block_bytes,
                             "tail_extra_bytes": memory.tail_extra_bytes},
            "devices": [p.name for p in profiles], "capacity": [self.max_blocks[c] for c in range(n)],
        }

    def _map_keys_to_blocks(self) -> dict[str, int]:
        prefix = self.split.blocks_name
        out = {}
        for key in self.global_state:
            match = re.match(rf"{re.escape(prefix)}\.(\d+)\.", key)
            if not match:
                raise CutError(f"split learning needs LoRA on transformer blocks only; {key} is outside "
                               f"{prefix} (check lora.target_modules)")
            out[key] = int(match.group(1))
        return out

    # -- helpers ----------------------------------------------------------------------------
    def _keys(self, blocks: set[int]) -> list[str]:
        return [k for k, b in self.key_block.items() if b in blocks]

    def _params(self, blocks: set[int]) -> list[torch.nn.Parameter]:
        return [p for b in sorted(blocks) for p in self.split.blocks[b].parameters() if p.requires_grad]

    def _client_modules(self, cut: Cut) -> torch.nn.ModuleList:
        """Modules resident on the client: embeddings, head blocks, and for a U-shape tail, norm and LM head."""
        model, L = self.ctx.model, self.split.num_layers
        modules = [model.get_input_embeddings(), *(self.split.blocks[b] for b in range(cut.head))]
        if cut.tail:
            modules += [*(self.split.blocks[b] for b in range(L - cut.tail, L)), model.get_output_embeddings()]
        return torch.nn.ModuleList(modules)

    def _clip_and_step(self, optimizer: torch.optim.Optimizer) -> None:
        max_norm = self.ctx.cfg.train.max_grad_norm
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # -- the two sides of a session (run in process, or on Ray workers) ------------------------
    def client_side(self, job: ClientJob) -> ClientSide:
        """The client's half of a session from its job (downloaded blocks, stream position, cut, steps)."""
        stream = replace(self.streams[job.client], **job.state["stream"])
        return ClientSide(self, job.round, job.client, Cut(job.state["cut"], self.tail), job.download.tensors,
                          stream, job.state["steps"], job.state["thetas"])

    def server_side(self, round: int, cid: int, cut: int, body: TensorDict, thetas: dict[str, float]) -> ServerSide:
        """The server's half of a session: ``body`` holds the weights its blocks start from."""
        return ServerSide(self, round, cid, Cut(cut, self.tail), body, thetas)

    # -- one client's round -------------------------------------------------------------------
    def _session(self, round: int, cid: int, server_body: TensorDict) -> Session:
        ctx, cfg, L = self.ctx, self.ctx.cfg, self.split.num_layers
        cut = Cut(self.cuts[cid], self.tail)
        client_keys, body_keys = self._keys(set(cut.client_blocks(L))), self._keys(set(cut.body(L)))
        steps = local_steps(cfg, len(self.streams[cid].indices))
        self.channels.start_session()
        job = ClientJob(round, cid, Message("client_adapter", {k: self.global_state[k] for k in client_keys}),
                        {"stream": self.streams[cid].state_dict(), "cut": cut.head, "steps": steps,
                         "thetas": dict(self.channels.thetas)})
        body = {k: server_body.get(k, self.global_state[k]) for k in body_keys}
        losses, client_flops, server_flops, failure = [], 0, 0, None
        client = server = None
        try:
            client, server = backend_of(ctx).split_session(self, job, body)
            ctx.progress.start_steps(f"round {round} client {cid} (cut {cut.head})", steps)
            for _ in range(steps):
                up, info = client.forward()
                if not cut.tail:
                    down, loss = server.step(up, info)
                else:
                    down, body_out = None, server.forward(up, info)
                    up_grad, loss = client.tail(body_out)
                    if up_grad is not None:
                        down = server.backward(up_grad)
                if down is None:
                    failure = f"non-finite loss at step {len(losses) + 1}"
                    client.abort()
                    server.abort()
                    break
                client.backward(down)
                losses.append(loss)
                ctx.progress.step(loss)
                tokens, seq = info["tokens"], info["seq"]
                client_flops += train_flops(ctx.cost, tokens, seq, blocks=range(cut.head), head=False)
                if cut.tail:
                    client_flops += train_flops(ctx.cost, tokens, seq, blocks=range(L - cut.tail, L), head=True)
                server_flops += train_flops(ctx.cost, tokens, seq, blocks=cut.body(L), head=not cut.tail)
            mean_loss = sum(losses) / len(losses) if losses else float("nan")
            up, client_memory, stream, client_report = client.finish(failure, mean_loss)
            body_state, server_memory, server_report = server.finish()
        except ClientLost as exc:  # a Ray worker died or was late: this client's turn is lost, the round goes on
            if server is not None:
                server.abort(lost=True)
            return Session(None, None, float("nan"), 0, 0, 0, 0, lost=str(exc))
        caches = {}
        for side, report in (("client", client_report), ("server", server_report)):
            if report is not None:  # the side ran in a worker's copy: count now, merge its caches with the round
                self.channels.count(report.sends)
                caches[side] = report.caches
        progress = (round - 1 + (self._sessions_done + 1) / cfg.federation.sampled) / cfg.federation.rounds
        self._sessions_done += 1
        self.channels.end_session(round, cid, sum(losses) / len(losses) if losses else float("inf"), progress,
                                  ctx.ledger)
        stats = dict(client_flops=client_flops, server_flops=server_flops, client_memory=client_memory,
                     server_memory=server_memory, stream=stream, caches=caches)
        if up.kind == "client_failure":
            return Session(None, None, mean_loss, failure=up.meta["reason"], **stats)
        return Session(up.tensors, body_state, mean_loss, **stats)

    # -- the round ----------------------------------------------------------------------------
    def run_round(self, round: int) -> RoundResult:
        saved = self.channels.round_state()
        try:
            return self._round(round)
        except RoundAbortedError:  # the run stops at the last complete round: leave the channels as they were
            self.channels.load_round_state(saved)
            raise

    def _round(self, round: int) -> RoundResult:
        cfg = self.ctx.cfg
        shared = cfg.split.server_adapter == "shared"
        clients = sample_clients(cfg, round)
        self._sessions_done = 0
        out = RoundResult(train_loss=None, clients=clients)
        server_body: TensorDict = {}  # V2: the shared body adapter as it evolves through the round
        sessions: dict[int, Session] = {}
        streams: dict[int, dict] = {}  # applied once the round completes
        caches: dict[int, dict] = {}  # (sides run in workers' copies) likewise
        lost: dict[int, str] = {}

        def take(cid: int, session: Session) -> None:
            if session.lost:
                lost[cid] = session.lost
                return
            lost.pop(cid, None)
            streams[cid] = session.stream
            caches[cid] = session.caches
            out.client_flops[cid] = session.client_flops
            out.client_peak_memory[cid] = session.client_memory
            out.server_flops += session.server_flops
            out.server_peak_memory = max(out.server_peak_memory, session.server_memory)
            if session.failure:
                out.rejected.append({"client": cid, "reason": session.failure})
                self.ctx.progress.log(f"[yellow]round {round}: client {cid} rejected: {session.failure}")
                return
            sessions[cid] = session
            if shared:
                server_body.update(session.body_state)

        for cid in clients:
            take(cid, self._session(round, cid, server_body if shared else {}))
        need = min(cfg.federation.min_clients, len(clients))
        for attempt in range(cfg.runtime.max_retries):  # lost turns (Ray backend) retried while too few replied
            if not lost or len(clients) - len(lost) >= need:
                break
            self.ctx.progress.log(f"[yellow]round {round}: retrying the lost sessions of clients {sorted(lost)}")
            for cid in sorted(lost):
                take(cid, self._session(round, cid, server_body if shared else {}))
        if len(clients) - len(lost) < need:
            detail = "; ".join(f"client {c}: {r}" for c, r in sorted(lost.items()))
            raise ClientQuorumError(
                f"round {round}: only {len(clients) - len(lost)} of {len(clients)} clients replied, fewer than "
                f"federation.min_clients = {need}, after {cfg.runtime.max_retries} retries ({detail})", round)
        out.rejected[:0] = [{"client": c, "reason": r, "lost": True} for c, r in sorted(lost.items())]
        for cid, state in streams.items():
            self.streams[cid].load_state_dict(state)
        for by_side in caches.values():
            for side, state in by_side.items():
                self.channels.update_caches(side, state)
        if sessions:
            self._aggregate(sessions, server_body if shared else None)
            total = sum(len(self.streams[c].indices) for c in sessions)
            out.train_loss = sum(s.loss * len(self.streams[c].indices) for c, s in sessions.items()) / total
        out.extra["cuts"] = {str(c): self.cuts[c] for c in clients}
        if self.channels.controllers:
            out.extra["thresholds"] = {n: [t[2] for t in traj if t[0] == round]
                                       for n, traj in self.channels.trajectory.items()}
            out.extra["upload_ratio"] = {n: self.channels[n].counts.ratio for n in self.channels.controllers}
        if cfg.split.adaptive and sessions:
            self._adapt(sorted(sessions))
        for c in range(len(self.ctx.partitions)):
            self.cut_history[c].append(self.cuts[c])
        return out

    def _aggregate(self, sessions: dict[int, Session], shared_body: TensorDict | None) -> None:
        weight = {c: float(len(self.streams[c].indices)) for c in sessions}
        for key, block in self.key_block.items():
            versions, server_weight = [], 0.0
            for c, s in sessions.items():
                if key in s.client_state:
                    versions.append((s.client_state[key], weight[c]))
                elif shared_body is None:
                    versions.append((s.body_state[key], weight[c]))
                else:
                    server_weight += weight[c]
            if shared_body is not None and server_weight > 0:
                versions.append((shared_body[key], server_weight))
            if versions:
                self.global_state[key] = _weighted_mean(versions)

    def _adapt(self, clients: list[int]) -> None:
        """Score each client on its held-out validation samples with the new global model; move cuts."""
        ctx, s = self.ctx, self.ctx.cfg.split
        self.load_global()
        scores = {}
        for cid in clients:
            samples = [ctx.train_samples[i] for i in self.val_rows[cid]]
            ev = evaluate(ctx.model, samples, batch_size=ctx.cfg.eval.batch_size, pad_token_id=ctx.pad_token_id,
                          device=ctx.device)
            scores[cid] = -ev.loss
        self.cuts.update(adapt_cuts({c: self.cuts[c] for c in clients}, scores, gamma=s.gamma,
                                    num_layers=self.split.num_layers, max_blocks=self.max_blocks))
        self.last_scores = scores

    # -- state --------------------------------------------------------------------------------
    def load_global(self) -> None:
        load_adapter_state(self.ctx.model, self.global_state)

    def state_dict(self) -> dict:
        return {"global_state": self.global_state, "cuts": {str(c): k for c, k in self.cuts.items()},
                "cut_history": {str(c): h for c, h in self.cut_history.items()},
                "streams": [st.state_dict() for st in self.streams], "channels": self.channels.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.global_state = dict(state["global_state"])
        load_adapter_state(self.ctx.model, self.global_state)
        self.cuts = {int(c): int(k) for c, k in state["cuts"].items()}
        self.cut_history = {int(c): [int(k) for k in h] for c, h in state["cut_history"].items()}
        for stream, st in zip(self.streams, state["streams"], strict=True):
            stream.load_state_dict(st)
        self.channels.load_state_dict(state["channels"])

    def observe_eval(self, round: int, result) -> None:
        self.channels.observe_eval(result.ppl)

    def client_sizes(self) -> dict[int, int]:
        return {cid: len(st.indices) for cid, st in enumerate(self.streams)}

    def summary_extra(self) -> dict:
        ledger = self.ctx.ledger
        up_kinds = ("activations", "tail_gradients")
        down_kinds = ("gradients", "body_output")
        compression = self.channels.summary(ledger)
        return {
            "compression": compression["compression"],
            "comm": {
                **compression["comm"],
                "activation_uplink_bytes": ledger.bytes(kind="activations", direction=UP),
                "gradient_downlink_bytes": ledger.bytes(kind="gradients", direction=DOWN),
                "body_output_downlink_bytes": ledger.bytes(kind="body_output", direction=DOWN),
                "tail_gradient_uplink_bytes": ledger.bytes(kind="tail_gradients", direction=UP),
                "adapter_bytes": ledger.bytes(kind="client_adapter"),
                "exchange_bytes": sum(ledger.bytes(kind=k, direction=UP) for k in up_kinds)
                + sum(ledger.bytes(kind=k, direction=DOWN) for k in down_kinds),
            },
            "clients": {c: {"cut_layer": h} for c, h in self.cut_history.items()},
            "split": {"ushape": bool(self.tail), "tail": self.tail, "num_layers": self.split.num_layers,
                      "server_adapter": self.ctx.cfg.split.server_adapter, "adaptive": self.ctx.cfg.split.adaptive,
                      "cut_policy": self.ctx.cfg.split.cut_policy, **self.placement},
        }
