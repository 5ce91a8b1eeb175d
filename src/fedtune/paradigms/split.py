"""Split-FedLLM: split federated LoRA fine-tuning (SplitFed V1/V2, U-shape, SplitFT per-client cuts).

Per step and client: the client runs embeddings and its head blocks and uploads the activations (+ the
attention mask, + the labels in the standard split); the server runs its body blocks (and, standard, the
norm, LM head and loss), back-propagates and returns the cut-layer gradient; the client back-propagates it
and steps. In a U-shape the server returns its body output instead, the client runs its tail blocks, norm,
head and loss, uploads the gradient at the body output, and the exchange unwinds. Token ids never leave the
client; in a U-shape neither do the labels. The messages and endpoints are :mod:`fedtune.split.protocol`'s.

Adapters: the run keeps one full global LoRA state. At the start of a client's session the client downloads
the LoRA weights of its own blocks; the server uses one shared body adapter updated by every client in turn
(``server_adapter = "shared"``, SplitFed-V2) or a fresh copy of the global body per client (``"per_client"``,
V1). At the end of the round every block is averaged over the versions trained in that round
(:mod:`fedtune.split.aggregation`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedtune.comm.ledger import DOWN, UP
from fedtune.comm.messages import Message
from fedtune.comm.split_interfaces import USHAPE_ONLY
from fedtune.compression.adapters import AdapterCoder
from fedtune.compression.channels import SplitChannels
from fedtune.core.errors import ConfigError, RoundAbortedError
from fedtune.core.seeding import numpy_rng
from fedtune.federated.sampling import local_samples, local_steps, sample_clients
from fedtune.models.lora import adapter_state, load_adapter_state
from fedtune.paradigms.base import PARADIGMS, Paradigm, RoundResult
from fedtune.runtime.base import Capabilities, ClientJob, ClientLost, lost_records, with_quorum
from fedtune.split.adaptive import adapt_cuts
from fedtune.split.aggregation import aggregate_blocks
from fedtune.split.cut import Cut, CutError, SplitModel, find_blocks
from fedtune.split.driver import drive_session
from fedtune.split.placement import place_by_profiles
from fedtune.split.protocol import SESSION_PRIVATE_STATE, TensorDict
from fedtune.split.trainer import SplitTrainer, blocks_of_keys
from fedtune.training.evaluation import evaluate
from fedtune.training.steps import all_finite, update_norm_failure
from fedtune.training.streams import SampleStream


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


def _compression_on(cfg) -> bool:
    return cfg.compression.on


def _body_failure(body: TensorDict, start: TensorDict, max_ratio: float | None) -> str | None:
    """Why a session is rejected for the server's body blocks after it (not finite, or moved more than
    ``train.max_update_ratio`` from ``start``, the body the server started the session from), or None."""
    failure = (None if all_finite(body) else "non-finite weights") or update_norm_failure(body, start, max_ratio)
    return f"server body: {failure}" if failure else None


@PARADIGMS.register("split")
class SplitFed(Paradigm):
    capabilities = Capabilities(split_sessions=True)
    private_state = SESSION_PRIVATE_STATE
    exclusive_settings = {"compression applies to the split interfaces": _compression_on}
    own_sections = ("split", "compression")

    @classmethod
    def check_remote(cls, cfg) -> None:
        if cfg.split.adaptive:
            raise ValueError("split.adaptive scores every client on validation rows held out of its data, which a "
                             "deployed server does not hold: not deployable yet; give per-client cuts with "
                             "split.cuts instead")

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        s, n = cfg.split, cfg.federation.num_clients
        for key in ("cuts", "max_client_blocks"):
            values = getattr(s, key)
            if values is not None and len(values) != n:
                raise ValueError(f"split.{key} has {len(values)} entries but federation.num_clients = {n}; give one per client")
            if values is not None and min(values) < 1:
                raise ValueError(f"split.{key} entries must be >= 1, got {values}")
        c = cfg.compression
        for key, names in (("interfaces", c.interfaces or []), ("per_interface", c.per_interface)):
            bad = [i for i in names if i in USHAPE_ONLY]
            if _compression_on(cfg) and bad and not s.ushape:
                raise ValueError(f"compression.{key} {bad} exist only in a U-shape split (split.ushape = true)")
        if s.cut_policy == "profiles" and not cfg.devices.profiles:
            raise ValueError("split.cut_policy = 'profiles' needs devices.profiles")
        if s.cut_rank is not None and (s.cuts is not None or s.adaptive):
            raise ValueError("split.cut_rank needs one fixed cut (split.cut): with per-client or adaptive cuts the "
                             "blocks adjacent to the cut differ between clients and rounds")
        if s.cut_rank is not None and s.cut_rank > cfg.lora.r:
            raise ValueError(f"split.cut_rank ({s.cut_rank}) must not exceed lora.r ({cfg.lora.r})")
        if cfg.model.source == "tiny" and s.cut_policy == "config":  # the layer count is in the config: check now
            key = ("split.cuts" if s.cuts is not None else "split.cut") + (" with split.tail" if s.ushape else "")
            for head in s.cuts if s.cuts is not None else [s.cut]:
                try:
                    Cut(head, s.tail if s.ushape else 0).check(cfg.model.tiny.num_layers)
                except CutError as exc:
                    raise ValueError(f"{key}: {exc}") from None

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
        split = SplitModel(ctx.model)
        L, n = split.num_layers, cfg.federation.num_clients
        self.tail = s.tail if s.ushape else 0
        self.max_blocks = {c: min(L - 1 - self.tail, (s.max_client_blocks or [L] * n)[c]) for c in range(n)}
        self.cuts = {c: (s.cuts[c] if s.cuts else s.cut) for c in range(n)}
        self.global_state = adapter_state(ctx.model)
        self.placement: dict = {}
        if s.cut_policy == "profiles":
            self._place_by_profiles(split)
        for cid, k in self.cuts.items():
            Cut(k, self.tail).check(L)
            if k > self.max_blocks[cid]:
                raise CutError(f"client {cid}: cut after {k} blocks exceeds its capacity of {self.max_blocks[cid]} blocks")
        channels = SplitChannels(cfg, ctx.model.config.hidden_size, bool(self.tail), ctx.run_dir / "cache")
        self.streams, self.val_rows = self._streams()
        c = cfg.compression
        self.trainer = SplitTrainer(ctx, split, blocks_of_keys(self.global_state, split.blocks_name), channels,
                                    self.tail, [st.indices for st in self.streams],
                                    AdapterCoder(c.adapter_download_codec, c.entropy),
                                    AdapterCoder(c.adapter_codec, c.entropy))
        self.cut_history: dict[int, list[int]] = {c: [k] for c, k in self.cuts.items()}
        self._counts_before: dict[str, tuple[int, int]] = {}  # each reusing interface's (sent, offered) at round start
        self._sessions_done = 0

    @property
    def channels(self) -> SplitChannels:
        return self.trainer.channels

    def _place_by_profiles(self, split: SplitModel) -> None:
        """Initial cuts (and capacities, unless given) from device profiles and measured client memory."""
        cuts, capacities, info = place_by_profiles(self.ctx, split, self.tail)
        self.cuts = dict(enumerate(cuts))
        if self.ctx.cfg.split.max_client_blocks is None:
            self.max_blocks = dict(enumerate(capacities))
        self.placement = {**info, "capacity": [self.max_blocks[c] for c in range(len(cuts))]}

    def _streams(self) -> tuple[list[SampleStream], dict[int, list[int]]]:
        """Each client's training stream, and (adaptive cuts) the validation rows held out of it."""
        cfg, s = self.ctx.cfg, self.ctx.cfg.split
        streams, val_rows = [], {}
        for cid, part in enumerate(self.ctx.partitions):
            rows = list(part)
            if s.adaptive:
                if len(rows) <= s.val_samples:
                    raise ConfigError(f"split.val_samples = {s.val_samples} leaves client {cid} (with {len(rows)} "
                                      "samples) nothing to train on; lower it or use fewer clients")
                perm = numpy_rng(cfg.seed, "split-val", cid).permutation(len(rows))
                val_rows[cid] = sorted(rows[i] for i in perm[: s.val_samples])
                rows = sorted(rows[i] for i in perm[s.val_samples:])
            streams.append(SampleStream(rows, cfg.seed, cid))
        return streams, val_rows

    def client_private_state(self, cid: int) -> dict:
        return {"stream": self.streams[cid].state_dict()}

    # -- one client's round -------------------------------------------------------------------
    def _job(self, round: int, cid: int, cut: Cut) -> ClientJob:
        t = self.trainer
        download = t.download_coder.encode("client_adapter", self.global_state, t.client_keys(cut))
        return ClientJob(round, cid, download,
                         {"stream": self.streams[cid].state_dict(), "cut": cut.head,
                          "steps": local_steps(self.ctx.cfg, len(self.streams[cid].indices)),
                          "samples": local_samples(self.ctx.cfg, len(self.streams[cid].indices)),
                          "thetas": dict(self.channels.thetas)})

    def _session(self, round: int, cid: int, server_body: TensorDict) -> Session:
        ctx, L = self.ctx, self.trainer.num_layers
        cut = Cut(self.cuts[cid], self.tail)
        self.channels.start_session()
        job = self._job(round, cid, cut)
        body = {k: server_body.get(k, self.global_state[k]) for k in self.trainer.keys(set(cut.body(L)))}
        ctx.progress.start_steps(f"round {round} client {cid} (cut {cut.head})", job.state["steps"])

        def drive(client, server):
            return drive_session(client, server, steps=job.state["steps"], cut=cut, num_layers=L, cost=ctx.cost,
                                 on_step=ctx.progress.step)

        try:
            run, client_end, server_end = ctx.backend.split_turn(self.trainer, job, body, drive)
        except ClientLost as exc:  # a worker or SuperNode died or was late: this turn is lost, the round goes on
            return Session(None, None, float("nan"), 0, 0, 0, 0, lost=str(exc))
        caches = {}
        for side, report in (("client", client_end.report), ("server", server_end.report)):
            if report is not None:  # the side ran in a worker's copy: count now, merge its caches with the round
                self.channels.count(report.sends)
                if report.caches is not None:  # None: a deployed client keeps its caches on its machine
                    caches[side] = report.caches
        sampled = ctx.cfg.federation.sampled
        self._sessions_done += 1
        progress = (round - 1 + self._sessions_done / sampled) / ctx.cfg.federation.rounds
        self.channels.end_session(round, cid, run.mean_loss if run.losses else float("inf"), progress, ctx.ledger)
        stats = dict(client_flops=run.client_flops, server_flops=run.server_flops, stream=client_end.stream,
                     client_memory=client_end.peak_memory, server_memory=server_end.peak_memory, caches=caches)
        if client_end.upload.kind == "client_failure":
            return Session(None, None, run.mean_loss, failure=client_end.upload.meta["reason"], **stats)
        failure = _body_failure(server_end.body, body, ctx.cfg.train.max_update_ratio)
        if failure:
            return Session(None, None, run.mean_loss, failure=failure, **stats)
        return Session(self._uploaded(client_end.upload, cut), server_end.body, run.mean_loss, **stats)

    def _uploaded(self, upload: Message, cut: Cut) -> TensorDict:
        """The client's LoRA weights its upload stands for (a coded upload is its change from its download)."""
        t, keys = self.trainer, self.trainer.client_keys(cut)
        if not t.upload_coder.active:
            return upload.tensors
        start = t.download_coder.roundtrip(self.global_state, keys)
        return t.upload_coder.decode(upload, self.global_state, keys, start)

    # -- the round ----------------------------------------------------------------------------
    def run_round(self, round: int) -> RoundResult:
        saved = self.channels.round_state()
        self._counts_before = {n: (self.channels[n].counts.sent, self.channels[n].counts.total)
                               for n in self.channels.controllers}
        try:
            return self._round(round)
        except RoundAbortedError:  # the run stops at the last complete round: leave the channels as they were
            self.channels.load_round_state(saved)
            raise

    def _sessions(self, round: int, clients: list[int]) -> tuple[dict[int, Session], dict[int, str], dict[int, str],
                                                                 TensorDict]:
        """Every sampled client's session (lost ones retried while too few replied): (sessions that arrived,
        lost turns, turns lost and then retried successfully, the shared server body at the end of the round (V2;
        empty for V1))."""
        cfg = self.ctx.cfg
        shared = cfg.split.server_adapter == "shared"
        server_body: TensorDict = {}  # V2: the shared body adapter as it evolves through the round
        sessions: dict[int, Session] = {}

        def attempt(cids: list[int]) -> dict[int, str]:
            lost = {}
            for cid in cids:
                session = self._session(round, cid, server_body if shared else {})
                if session.lost:
                    lost[cid] = session.lost
                    continue
                sessions[cid] = session
                if shared and not session.failure:
                    server_body.update(session.body_state)
            return lost

        def on_retry(lost: dict[int, str]) -> None:
            self.ctx.progress.log(f"[yellow]round {round}: retrying the lost sessions of clients {sorted(lost)}")

        need = min(cfg.federation.min_clients, len(clients))
        retried: dict[int, str] = {}
        lost = with_quorum(round, clients, need, cfg.runtime.max_retries, attempt, on_retry, retried)
        return sessions, lost, retried, server_body

    def _round(self, round: int) -> RoundResult:
        cfg = self.ctx.cfg
        clients = sample_clients(cfg, round)
        self._sessions_done = 0
        out = RoundResult(train_loss=None, clients=clients)
        sessions, lost, retried, server_body = self._sessions(round, clients)
        out.rejected.extend(lost_records(lost, retried))  # retried ones marked "retried": their session arrived
        trained = {}
        for cid, session in sessions.items():
            self.streams[cid].load_state_dict(session.stream)
            for side, state in session.caches.items():
                self.channels.update_caches(side, state)
            out.client_flops[cid] = session.client_flops
            out.client_peak_memory[cid] = session.client_memory
            out.server_flops += session.server_flops
            out.server_peak_memory = max(out.server_peak_memory, session.server_memory)
            if session.failure:
                out.rejected.append({"client": cid, "reason": session.failure})
                self.ctx.progress.log(f"[yellow]round {round}: client {cid} rejected: {session.failure}")
            else:
                trained[cid] = session
        if trained:
            self._aggregate(trained, server_body if cfg.split.server_adapter == "shared" else None)
            total = sum(len(self.streams[c].indices) for c in trained)
            out.train_loss = sum(s.loss * len(self.streams[c].indices) for c, s in trained.items()) / total
        out.extra.update(self._round_extra(round, clients))
        if cfg.split.adaptive and trained:
            self._adapt(sorted(trained))
        for c in range(len(self.ctx.partitions)):
            self.cut_history[c].append(self.cuts[c])
        return out

    def _round_extra(self, round: int, clients: list[int]) -> dict:
        extra = {"cuts": {str(c): self.cuts[c] for c in clients}}
        if self.channels.controllers:
            extra["thresholds"] = {n: [t[2] for t in traj if t[0] == round]
                                   for n, traj in self.channels.trajectory.items()}
            counts = {n: self.channels[n].counts for n in self.channels.controllers}
            before = {n: self._counts_before.get(n, (0, 0)) for n in counts}
            extra["upload_ratio_round"] = {n: (c.sent - before[n][0]) / (c.total - before[n][1])
                                           if c.total > before[n][1] else 1.0 for n, c in counts.items()}
            extra["upload_ratio_cumulative"] = {n: c.ratio for n, c in counts.items()}
        return extra

    def _aggregate(self, sessions: dict[int, Session], shared_body: TensorDict | None) -> None:
        weights = {c: float(len(self.streams[c].indices)) for c in sessions}
        self.global_state = aggregate_blocks(
            self.global_state, self.trainer.key_block, {c: s.client_state for c, s in sessions.items()},
            {c: s.body_state for c, s in sessions.items()}, weights, shared_body)

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
                                    num_layers=self.trainer.num_layers, max_blocks=self.max_blocks))

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
        ledger, cfg = self.ctx.ledger, self.ctx.cfg
        compression = self.channels.summary(ledger)
        exchange = (sum(ledger.bytes(kind=k, direction=UP) for k in ("activations", "tail_gradients"))
                    + sum(ledger.bytes(kind=k, direction=DOWN) for k in ("gradients", "body_output")))
        return {
            "compression": compression["compression"],
            "comm": {
                **compression["comm"],
                "activation_uplink_bytes": ledger.bytes(kind="activations", direction=UP),
                "gradient_downlink_bytes": ledger.bytes(kind="gradients", direction=DOWN),
                "body_output_downlink_bytes": ledger.bytes(kind="body_output", direction=DOWN),
                "tail_gradient_uplink_bytes": ledger.bytes(kind="tail_gradients", direction=UP),
                "adapter_bytes": ledger.bytes(kind="client_adapter"),
                "exchange_bytes": exchange,
            },
            "clients": {c: {"cut_layer": h} for c, h in self.cut_history.items()},
            "split": {"ushape": bool(self.tail), "tail": self.tail, "num_layers": self.trainer.num_layers,
                      "server_adapter": cfg.split.server_adapter, "adaptive": cfg.split.adaptive,
                      "cut_policy": cfg.split.cut_policy, **self.placement},
        }
