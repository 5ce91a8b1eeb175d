"""KD-FedLLM: clients keep their own LoRA adapters and share knowledge only through logits on a public set.

Setup: ``kd.public_samples`` training rows (a seeded choice) form the public (proxy) prompt set and are removed
from every client's partition. Its response positions (labels != -100, shifted as in next-token prediction: the
logits at t predict labels[t + 1]) form one fixed, flattened list of P positions that aligns all clients.

Per round, for each sampled client (its own adapter loaded into the shared model):

1. if soft labels from the previous round exist, they are downloaded ("soft_labels"); the client runs
   ``kd.distill_steps`` pure distillation steps on public batches, then ``local_steps`` steps of
   ``CE(private batch) + beta * T^2 * KL(soft || own)`` (each step pairs a private batch with a public batch).
   Without soft labels (round 1) it trains plain CE;
2. it computes logits on the public set (eval mode, no grad), keeps the top-k per position (fp16 values, int32
   indices; k = 0: the full vocabulary in fp16) and uploads them ("public_logits").

The server turns the uploads into soft labels (:func:`fedtune.kd.aggregation.aggregate_logits`) for the next round;
with ``kd.server_model`` it also distils its own adapter from them (``kd.distill_steps`` steps).

Clients may run different models (``kd.client_models`` naming ``[kd.models.NAME]`` sections, e.g. a smaller model
for weak devices): logits align because every model must share the main model's tokenizer and output vocabulary
(:mod:`fedtune.kd.client_models` refuses others); each model is in memory once and its FLOPs are its own.

There is no parameter averaging, so there is no single global model. The evaluated (and saved) model is the
server's adapter with ``kd.server_model``, else the adapter of the client with the most training samples (lowest
id on ties; deployed, that client sends its adapter to the server with each reply: ``DISCLOSE``). Every round each client's own eval loss goes to the round record (``client_eval_loss``), and their
mean to the summary (``kd.mean_client_eval_loss``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fedtune.comm.messages import Message
from fedtune.core.errors import ConfigError
from fedtune.core.seeding import numpy_rng, seed_torch
from fedtune.data.formatting import collate
from fedtune.federated.sampling import local_samples, local_steps, sample_clients
from fedtune.kd.aggregation import SoftLabels, aggregate_logits, private_soft_labels
from fedtune.kd.client_models import ClientModel, build_client_models
from fedtune.kd.distill import distill_loss
from fedtune.kd.public_outputs import public_outputs
from fedtune.models.flops import train_flops
from fedtune.models.lora import adapter_state, load_adapter_state, trainable_parameters
from fedtune.paradigms.base import PARADIGMS, Paradigm, RoundResult
from fedtune.paradigms.client_eval import ClientEvaluations, largest_client
from fedtune.paradigms.kd_checks import check_kd_config
from fedtune.privacy.client_dp import ClientDP
from fedtune.runtime.base import DISCLOSE, Capabilities, ClientJob, ClientReply
from fedtune.training.steps import all_finite, guarded_step, make_optimizer, train_steps, update_norm_failure
from fedtune.training.streams import SampleStream


def _response_count(sample: dict) -> int:
    """Positions of ``sample`` that predict a labelled token (labels shifted by one)."""
    return sum(1 for label in sample["labels"][1:] if label != -100)


@PARADIGMS.register("kd")
class KDFed(Paradigm):
    capabilities = Capabilities(client_jobs=True, client_adapters=True, public_set=True)
    private_state = ("adapter", "stream", "public_stream")
    exclusive_settings = {"kd.client_models applies to paradigm 'kd'": lambda cfg: bool(cfg.kd.client_models)}
    own_sections = ("kd",)

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        check_kd_config(cfg)

    @classmethod
    def reserved_rows(cls, cfg, num_train: int) -> list[int]:
        """The public (proxy) set: ``kd.public_samples`` training rows, a seeded choice, held out of every client."""
        kd = cfg.kd
        if kd.public_samples >= num_train:
            raise ConfigError(f"kd.public_samples ({kd.public_samples}) must be smaller than the {num_train} "
                              "training samples")
        rng = numpy_rng(cfg.seed, "kd-public")
        return sorted(int(i) for i in rng.choice(num_train, size=kd.public_samples, replace=False))

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        cfg, kd = ctx.cfg, ctx.cfg.kd
        self.public_ids = ctx.public_rows  # reserved_rows, left out of the partitions by the context
        empty = [cid for cid, part in enumerate(ctx.partitions) if not part]
        if empty:
            raise ConfigError(f"kd.public_samples = {kd.public_samples} leaves client(s) {empty} with no private "
                              "training samples; lower kd.public_samples or use fewer clients")
        parts = ctx.partitions
        self.public = [ctx.train_samples[i] for i in self.public_ids]
        counts = [_response_count(s) for s in self.public]
        self.offsets = [sum(counts[:j]) for j in range(len(counts))]
        self.counts = counts
        self.num_positions = sum(counts)
        if self.num_positions == 0:
            raise ConfigError("the KD public set has no response tokens")
        self.vocab_size = int(ctx.model.get_output_embeddings().weight.shape[0])
        self.models, self.model_names = build_client_models(ctx)
        self.client_states = [adapter_state(self.models[name].model) for name in self.model_names]
        self.server_state = adapter_state(ctx.model) if kd.server_model else None
        self.soft: SoftLabels | None = None
        self.dp = ClientDP(cfg) if cfg.privacy.client_level else None
        self.candidates: torch.Tensor | None = None  # DP: the tokens whose probabilities clients share (server's)
        self.streams = [SampleStream(part, cfg.seed, cid) for cid, part in enumerate(ctx.partitions)]
        public_range = list(range(len(self.public)))
        self.public_streams = [SampleStream(public_range, cfg.seed, f"kd-public-{cid}") for cid in range(len(parts))]
        self.server_stream = SampleStream(public_range, cfg.seed, "kd-public-server")
        self.client_eval = ClientEvaluations()
        sizes = self.client_sizes()
        main_clients = {c: n for c, n in sizes.items() if self.model_names[c] == "main"}
        if not main_clients and not kd.server_model:
            raise ConfigError("no client runs the main model, so none can be the evaluated model; set "
                              "kd.server_model = true (the server's adapter on [model] is then evaluated)")
        self.largest = largest_client(main_clients) if main_clients else None

    def client_model(self, cid: int) -> ClientModel:
        """The model client ``cid`` runs (the main one unless ``kd.client_models`` says otherwise)."""
        return self.models[self.model_names[cid]]

    # -- public set ----------------------------------------------------------------------------
    def _public_batch(self, stream: SampleStream) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """A collated public batch and the flat soft-label positions of its response tokens (in row order)."""
        rows = stream.take(self.ctx.cfg.train.batch_size)
        batch = collate([self.public[j] for j in rows], self.ctx.pad_token_id)
        positions = torch.cat([torch.arange(self.offsets[j], self.offsets[j] + self.counts[j]) for j in rows])
        return batch, positions

    def _distill_term(self, cm: ClientModel, stream: SampleStream, soft: SoftLabels, record: dict) -> torch.Tensor:
        """Forward a public batch through the (training) model and return ``T^2 * KL(soft || own)`` on it."""
        ctx, kd = self.ctx, self.ctx.cfg.kd
        batch, positions = self._public_batch(stream)
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        logits = cm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = batch["labels"][:, 1:] != -100
        student = logits[:, :-1][mask]
        idx = None if soft.indices is None else soft.indices[positions].to(ctx.device)
        loss = distill_loss(student, idx, soft.probs[positions].to(ctx.device), soft.mask[positions].to(ctx.device),
                            kd.temperature)
        bsz, seq = batch["input_ids"].shape
        record["flops"] += train_flops(cm.cost, tokens=bsz * seq, seq_len=seq)
        record["losses"].append(float(loss.detach()))
        return loss

    def _distill_only(self, cm: ClientModel, params, stream: SampleStream, soft: SoftLabels, steps: int,
                      weight: float) -> dict:
        """``steps`` optimizer steps of ``weight * distill`` on public batches (no private data)."""
        record = {"flops": 0, "losses": [], "failure": None}
        if steps == 0 or weight == 0:
            return record
        cfg = self.ctx.cfg
        optimizer = make_optimizer(params, cfg.train.lr, cfg.train.weight_decay)
        cm.model.train()
        for step in range(steps):
            loss = weight * self._distill_term(cm, stream, soft, record)
            if not torch.isfinite(loss):
                record["failure"] = f"non-finite distillation loss at step {step + 1}"
                break
            loss.backward()
            failure = guarded_step(optimizer, cfg.train.max_grad_norm)
            optimizer.zero_grad(set_to_none=True)
            if failure:
                record["failure"] = f"{failure} at distillation step {step + 1}"
                break
        return record

    def public_logits(self, cm: ClientModel, candidates: torch.Tensor | None = None,
                      private: bool = False) -> tuple[Message, int]:
        """``cm``'s top-k logits on every public position (DP: its probabilities at ``candidates``), and FLOPs."""
        kd = self.ctx.cfg.kd
        tensors, flops = public_outputs(cm, self.public, self.ctx, kd.topk, candidates=candidates, private=private,
                                        temperature=kd.temperature)
        return Message("public_logits", tensors, {"topk": kd.topk, "num_positions": self.num_positions}), flops

    # -- a client's turn -----------------------------------------------------------------------
    def client_job(self, round: int, cid: int) -> ClientJob:
        """Server side of a client's turn: the soft labels it downloads (from round 2 on) and its private state
        (its own adapter and its private and public stream positions)."""
        down = None
        soft = self.soft.tensors() if self.soft is not None else {}
        if self.dp is not None and self.candidates is not None:
            soft["dp_candidates"] = self.candidates
        if soft:
            down = Message("soft_labels", soft, {"round": round - 1})
        state = {"adapter": self.client_states[cid], "stream": self.streams[cid].state_dict(),
                 "public_stream": self.public_streams[cid].state_dict(),
                 **(self.dp.instruction() if self.dp is not None else {})}
        if self.server_state is None and cid == self.largest:  # its adapter is the evaluated model
            state[DISCLOSE] = ["adapter"]
        return ClientJob(round, cid, down, state)

    def run_client(self, job: ClientJob) -> ClientReply:
        """Client side: distil and train from the job, then upload top-k logits on the public set. Reads only the
        job, the config, the model and the public set, so it runs in-process or on a Ray worker alike."""
        ctx, cfg, kd = self.ctx, self.ctx.cfg, self.ctx.cfg.kd
        round, cid = job.round, job.client
        stream = replace(self.streams[cid], **job.state["stream"])
        public = replace(self.public_streams[cid], **job.state["public_stream"])
        cm = self.client_model(cid)
        load_adapter_state(cm.model, job.state["adapter"])
        got = dict(job.download.tensors) if job.download is not None else {}
        candidates = got.pop("dp_candidates", None)
        soft = SoftLabels.from_tensors(got) if got else None
        seed_torch(cfg.seed, "kd-client-train", round, cid)
        params = trainable_parameters(cm.model)
        steps, samples = local_steps(cfg, len(stream.indices)), local_samples(cfg, len(stream.indices))
        record = {"flops": 0, "losses": [], "failure": None}
        if soft is not None:
            record = self._distill_only(cm, params, public, soft, kd.distill_steps, kd.beta)
        regularizer = None
        if soft is not None and kd.beta > 0 and record["failure"] is None:
            regularizer = lambda: kd.beta * self._distill_term(cm, public, soft, record)  # noqa: E731
        ctx.progress.start_steps(f"round {round} client {cid}", steps)
        result = None
        if record["failure"] is None:
            optimizer = make_optimizer(params, cfg.train.lr, cfg.train.weight_decay)
            result = train_steps(
                cm.model, optimizer, ctx.batches(stream, steps, samples),
                cost=cm.cost, device=ctx.device, max_grad_norm=cfg.train.max_grad_norm,
                regularizer=regularizer, on_step=ctx.progress.step,
            )
        stats = {
            "flops": record["flops"] + (result.flops if result else 0),
            "peak_memory": result.peak_memory_bytes if result else 0,
            "train_loss": result.mean_loss if result else float("nan"),
            "distill_loss": sum(record["losses"]) / len(record["losses"]) if record["losses"] else None,
        }
        positions = {"stream": stream.state_dict(), "public_stream": public.state_dict()}
        state = adapter_state(cm.model)
        failure = record["failure"] or (result.failure if result else None)
        failure = failure or (None if all_finite(state) else "non-finite adapter weights")
        failure = failure or update_norm_failure(state, job.state["adapter"], cfg.train.max_update_ratio)
        if failure:  # keep the adapter it had before this round; it shares no logits
            load_adapter_state(cm.model, job.state["adapter"])
            return ClientReply(cid, Message("client_failure", meta={"reason": failure}), positions,
                               {**stats, "failure": failure})
        message, fwd = self.public_logits(cm, candidates, private=self.dp is not None)
        if self.dp is not None:  # clipped (and, local DP, noised) on the client; zeros: no download to subtract
            probs, meta = self.dp.client_upload(message.tensors, {"probs": torch.zeros_like(message.tensors["probs"])},
                                                job.state, round, cid)
            message = Message("public_probs", probs, {**message.meta, **meta})
        stats["flops"] += fwd
        if ctx.client_side:  # deployed: only this machine holds the adapter, so it evaluates it (client_eval_loss)
            stats["eval_loss"] = self.client_eval.evaluate(ctx, cm.model)
        return ClientReply(cid, message, {**positions, "adapter": state}, stats)

    def _accept(self, reply: ClientReply) -> tuple[Message | None, dict]:
        """Driver side of a reply: the client's new state; its logits (None with stats["failure"] if rejected)."""
        cid = reply.client
        self.streams[cid].load_state_dict(reply.state["stream"])
        self.public_streams[cid].load_state_dict(reply.state["public_stream"])
        if "adapter" in reply.state:
            self.client_states[cid] = reply.state["adapter"]
        if reply.upload.kind == "client_failure":
            return None, {**reply.stats, "failure": reply.upload.meta["reason"]}
        return reply.upload, reply.stats

    def train_client(self, round: int, cid: int) -> tuple[Message | None, dict]:
        """One client's whole turn through the run's backend: (uploaded logits or None, stats)."""
        replies = self.ctx.backend.run_clients(self, [self.client_job(round, cid)])
        if cid not in replies.replies:
            return None, {"flops": 0, "peak_memory": 0, "train_loss": float("nan"), "distill_loss": None,
                          "failure": replies.lost[cid]}
        return self._accept(replies.replies[cid])

    def _server_distill(self, round: int) -> int:
        """Distil the server's adapter from the current soft labels; returns its FLOPs."""
        ctx, kd = self.ctx, self.ctx.cfg.kd
        load_adapter_state(ctx.model, self.server_state)
        seed_torch(ctx.cfg.seed, "kd-server-distill", round)
        main = self.models["main"]
        record = self._distill_only(main, trainable_parameters(ctx.model), self.server_stream, self.soft,
                                    kd.distill_steps, 1.0)
        state = adapter_state(ctx.model)
        failure = record["failure"] or (None if all_finite(state) else "non-finite")
        failure = failure or update_norm_failure(state, self.server_state, ctx.cfg.train.max_update_ratio)
        if failure is None:
            self.server_state = state
        else:
            ctx.progress.log(f"[yellow]round {round}: server distillation dropped: {failure}")
        return record["flops"]

    def run_round(self, round: int) -> RoundResult:
        ctx, kd = self.ctx, self.ctx.cfg.kd
        clients = sample_clients(ctx.cfg, round)
        out = RoundResult(train_loss=None, clients=clients)
        uploads, losses, distill, metas = [], [], [], []
        if self.dp is not None:
            out.server_flops += self._choose_candidates()
        replies = ctx.backend.run_clients(self, [self.client_job(round, cid) for cid in clients])
        out.rejected.extend(replies.lost_records())  # turns lost to a dead or late worker (Ray backend)
        for cid in clients:
            if cid not in replies.replies:
                continue
            message, stats = self._accept(replies.replies[cid])
            if "eval_loss" in stats:  # a deployed client's own evaluation of its adapter
                self.client_eval.loss[cid] = stats["eval_loss"]
            out.client_flops[cid] = stats["flops"]
            out.client_peak_memory[cid] = stats["peak_memory"]
            if stats["distill_loss"] is not None:
                distill.append(stats["distill_loss"])
            if message is None:
                out.rejected.append({"client": cid, "reason": stats["failure"]})
                ctx.progress.log(f"[yellow]round {round}: client {cid} rejected: {stats['failure']}")
                continue
            uploads.append(message.tensors if self.dp is not None else (message.tensors["values"],
                                                                          message.tensors.get("indices")))
            metas.append(message.meta)
            losses.append((stats["train_loss"], len(self.streams[cid].indices)))
        if uploads and self.dp is not None:
            mean = self.dp.private_mean(uploads, metas, round, [c for c in clients if c in replies.replies])
            self.soft = private_soft_labels(mean["probs"], self.candidates)
        elif uploads:
            self.soft = aggregate_logits(uploads, temperature=kd.temperature, topk=kd.topk,
                                         vocab_size=self.vocab_size, method=kd.aggregation)
        if uploads:
            if self.server_state is not None:
                out.server_flops += self._server_distill(round)
            total = sum(n for _, n in losses)
            out.train_loss = sum(l * n for l, n in losses) / total
        reported = [c for c in clients if c in replies.replies and "eval_loss" in replies.replies[c].stats]
        self.client_eval.refresh(ctx, self.client_states, [c for c in clients if c not in reported],
                                 model_of=lambda c: self.client_model(c).model)
        out.extra["client_eval_loss"] = self.client_eval.by_client()
        out.extra["mean_client_eval_loss"] = self.client_eval.mean()
        out.extra["distill_loss"] = sum(distill) / len(distill) if distill else None
        out.extra.update(self.dp.record() if self.dp is not None else {})
        out.extra["soft_label_positions"] = int(self.soft.mask.sum()) if self.soft is not None else 0
        return out

    # -- the runner's interface ----------------------------------------------------------------
    def load_global(self) -> None:
        state = self.server_state if self.server_state is not None else self.client_states[self.largest]
        load_adapter_state(self.ctx.model, state)

    def summary_extra(self) -> dict:
        kd = self.ctx.cfg.kd
        return {
            "kd": {
                "mean_client_eval_loss": self.client_eval.mean(),
                "client_eval_loss": self.client_eval.by_client(),
                "evaluated_model": "server" if self.server_state is not None else f"client {self.largest}",
                "client_models": list(self.model_names),
                "topk": kd.topk, "temperature": kd.temperature, "beta": kd.beta, "aggregation": kd.aggregation,
                "distill_steps": kd.distill_steps, "public_samples": len(self.public),
                "public_positions": self.num_positions,
            },
            "clients": {c: {"eval_loss": v} for c, v in self.client_eval.loss.items()},
            **({"privacy": self.dp.summary()} if self.dp is not None else {}),
        }

    def state_dict(self) -> dict:
        return {
            "client_states": self.client_states,
            "server_state": self.server_state,
            "soft": None if self.soft is None else self.soft.tensors(),
            "streams": [s.state_dict() for s in self.streams],
            "public_streams": [s.state_dict() for s in self.public_streams],
            "server_stream": self.server_stream.state_dict(),
            "client_eval": self.client_eval.state_dict(),
            "public_ids": list(self.public_ids),
            **({"privacy": self.dp.state_dict()} if self.dp is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state["public_ids"]) != self.public_ids:
            raise ValueError("the checkpoint's KD public set differs from this run's")
        if len(state["client_states"]) != len(self.client_states):
            raise ValueError(f"checkpoint has {len(state['client_states'])} KD clients, this run {len(self.client_states)}")
        for cid, s in enumerate(state["client_states"]):
            load_adapter_state(self.client_model(cid).model, s)  # checks keys and shapes
        self.client_states = [dict(s) for s in state["client_states"]]
        if (state["server_state"] is None) != (self.server_state is None):
            raise ValueError("kd.server_model differs from the checkpoint's")
        if state["server_state"] is not None:
            load_adapter_state(self.ctx.model, state["server_state"])
            self.server_state = dict(state["server_state"])
        self.soft = None if state["soft"] is None else SoftLabels.from_tensors(state["soft"])
        for stream, s in zip(self.streams, state["streams"], strict=True):
            stream.load_state_dict(s)
        for stream, s in zip(self.public_streams, state["public_streams"], strict=True):
            stream.load_state_dict(s)
        self.server_stream.load_state_dict(state["server_stream"])
        self.client_eval.load_state_dict(state["client_eval"])
        if self.dp is not None:
            self.dp.load_state_dict(state["privacy"])
        self.load_global()

    def stop_before(self, round: int) -> str | None:
        return None if self.dp is None else self.dp.stop_reason(sample_clients(self.ctx.cfg, round))

    def _choose_candidates(self) -> int:
        """DP: the tokens clients report probabilities for, the server model's top-k on each public position
        (public: that model learnt only from noised soft labels); None = every token (kd.topk 0). Its FLOPs."""
        if not self.ctx.cfg.kd.topk:
            return 0
        load_adapter_state(self.ctx.model, self.server_state)
        message, flops = self.public_logits(self.models["main"])
        self.candidates = message.tensors["indices"]
        return flops
