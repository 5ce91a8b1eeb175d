"""FedLLM: clients train LoRA adapters locally; the server aggregates them (FedAvg by default).

Per round: sample clients; send each the global adapter (downlink); it trains for its local steps
and returns its adapter (uplink); the strategy aggregates the updates that arrived finite.

Client-specific pruning (``[pruning]``, or per round from the simulated network's plan): a client with rate rho > 0
receives the global adapter sliced to its pruned model, trains on that smaller copy of the base model and
uploads its smaller adapter; the server maps it back to full size and averages every coordinate over the
clients that kept it (:func:`fedtune.federated.masked.masked_fedavg`), then applies the strategy. The mask is the
server's (calibrated on its samples) and travels with the turn as an instruction, like the rate: deployed, a client
builds the model the server planned without the calibration samples (it is in the Flower messages' measured bytes,
not among the ledger's payloads, exactly as in simulation).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace

import torch

from fedtune.comm.messages import Message
from fedtune.core.errors import ConfigError, FedtuneError
from fedtune.core.seeding import numpy_rng, seed_torch
from fedtune.data.formatting import collate
from fedtune.federated.masked import masked_fedavg
from fedtune.federated.ranks import (
    RANK_AGGREGATIONS,
    client_rank,
    client_ranks,
    from_global,
    into_container,
    out_of_container,
    upload_at_own_rank,
)
from fedtune.federated.sampling import local_samples, local_steps, sample_clients
from fedtune.federated.strategies import EXTRA, STRATEGIES, ClientUpdate, needs_whole_updates
from fedtune.models.flops import train_flops
from fedtune.models.lora import adapter_parameters, adapter_state, load_adapter_state, trainable_parameters
from fedtune.models.pruning import MAX_RATE, PruneMask, Pruner, expand_adapter, slice_adapter, state_bytes
from fedtune.paradigms.base import PARADIGMS, Paradigm, RoundResult
from fedtune.paradigms.fedllm_checks import check_fedllm_config
from fedtune.privacy.run_privacy import RunPrivacy
from fedtune.runtime.base import Capabilities, ClientJob, ClientReply
from fedtune.training.steps import (
    all_finite,
    load_optimizer_tensors,
    make_optimizer,
    optimizer_tensors,
    sample_mean_loss,
    train_steps,
    update_norm_failure,
)
from fedtune.training.streams import SampleStream


@PARADIGMS.register("fedllm")
class FedLLM(Paradigm):
    capabilities = Capabilities(client_jobs=True, prunes_clients=True, drops_stragglers=True)
    private_state = ("stream", "optimizer", "strategy")
    exclusive_settings = {"pruning.rates applies to paradigm 'fedllm'": lambda cfg: any(cfg.pruning.rates),
                          "train.keep_optimizer_state applies to paradigm 'fedllm'":
                              lambda cfg: cfg.train.keep_optimizer_state,
                          "federation.lora_aggregation applies to paradigm 'fedllm'":
                              lambda cfg: cfg.federation.lora_aggregation != "factors",
                          "lora.ranks and lora.profile_ranks apply to paradigm 'fedllm'":
                              lambda cfg: bool(cfg.lora.ranks or cfg.lora.profile_ranks),
                          "deploy.secure_aggregation applies to paradigm 'fedllm'":
                              lambda cfg: cfg.deploy.secure_aggregation}
    own_sections = ("pruning",)
    own_keys = ("federation.strategy", "federation.lora_aggregation", "federation.proximal_mu", "federation.server_lr",
                "federation.server_momentum", "federation.server_betas", "federation.server_eps",
                "train.keep_optimizer_state", "lora.ranks", "lora.profile_ranks", "lora.rank_aggregation",
                "lora.self_prune_share")

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        check_fedllm_config(cfg)

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg
        self.strategy = STRATEGIES.get(cfg.federation.strategy)(cfg.federation)
        self.global_state = adapter_state(ctx.model)
        self.streams = [SampleStream(part, cfg.seed, cid) for cid, part in enumerate(ctx.partitions)]
        self.pruner = Pruner(ctx.model, method=cfg.pruning.method, targets=cfg.pruning.targets, seed=cfg.seed,
                             calibration=self._calibration_batches, compensate=cfg.pruning.compensate)
        self.pruning_history: dict[int, list[list[float]]] = {}  # client -> [[round, rate], ...] (rounds with pruning)
        self.optimizer_states: dict[int, dict[str, torch.Tensor]] = {}  # train.keep_optimizer_state: client -> state
        self.client_strategy_states: dict[int, dict[str, torch.Tensor]] = {}  # e.g. SCAFFOLD's c_i, per client
        self.initial_ranks = client_ranks(cfg)
        self.ranks = list(self.initial_ranks)  # a hetlora client may prune its own rank
        self.heterogeneous = any(r != cfg.lora.r for r in self.ranks)
        self.privacy = RunPrivacy(cfg)

    def _calibration_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The pruning calibration set: ``pruning.calibration_samples`` training samples drawn with the run's seed."""
        ctx, cfg = self.ctx, self.ctx.cfg
        n = len(ctx.train_samples)
        rows = numpy_rng(cfg.seed, "pruning-calibration").choice(n, size=min(cfg.pruning.calibration_samples, n),
                                                                 replace=False)
        samples = [ctx.train_samples[int(i)] for i in sorted(rows)]
        size = cfg.eval.batch_size
        for start in range(0, len(samples), size):
            batch = collate(samples[start : start + size], ctx.pad_token_id)
            yield {k: batch[k].to(ctx.device) for k in ("input_ids", "attention_mask")}

    def pruning_rate(self, round: int, cid: int) -> float:
        """rho of client ``cid`` in ``round``: the simulated network's plan when the run has one (its planner's rate,
        0 from planners that do not prune), else ``[pruning] rates`` (one for all or one per client); 0 = no
        pruning."""
        network = self.ctx.network
        rates = network.pruning_rates(round) if network is not None and network.prunes else self.ctx.cfg.pruning.rates
        if isinstance(rates, Mapping):
            rate = rates.get(cid, 0.0)
        else:
            rate = 0.0 if len(rates) == 0 else rates[0] if len(rates) == 1 else rates[cid]
        rate = float(rate)
        if not 0.0 <= rate <= MAX_RATE:
            raise FedtuneError(f"pruning rate of client {cid} in round {round} is {rate}; allowed: [0, {MAX_RATE}]")
        return rate

    def _client_mask(self, rate: float) -> PruneMask | None:
        """The pruning mask of a client at ``rate``; None for the full model (rate 0, or too few units to drop)."""
        mask = self.pruner.mask(rate) if rate > 0 else None
        return None if mask is None or mask.is_full else mask

    def client_private_state(self, cid: int) -> dict:
        return {"stream": self.streams[cid].state_dict()}  # a client's copy cannot plan its turn (no calibration)

    def client_job(self, round: int, cid: int) -> ClientJob:
        """Server side of a client's turn: the global adapter it downloads (sliced to its pruned model if it has
        one) and its private state (stream position, pruning rate)."""
        rate = self.pruning_rate(round, cid)
        mask = self._client_mask(rate)
        state = {"stream": self.streams[cid].state_dict(), "rate": rate}
        if cid in self.optimizer_states:
            state["optimizer"] = self.optimizer_states[cid]
        if cid in self.client_strategy_states:
            state["strategy"] = self.client_strategy_states[cid]
        rank, global_rank = self.ranks[cid], self.ctx.cfg.lora.r
        if self.heterogeneous:
            state["rank"] = rank
        state.update(self.privacy.instruction())
        if rank < global_rank:
            down = Message("global_adapter", from_global(self.global_state, rank, global_rank), {"rank": rank})
        elif mask is None:
            down = Message("global_adapter", {**self.global_state, **self.strategy.download_extra(self.global_state)})
        else:
            down = Message("global_adapter", slice_adapter(self.global_state, mask), {"pruning_rate": rate})
            state["mask"] = mask.to_json()  # an instruction, like the rate: a deployed client cannot calibrate
        return ClientJob(round, cid, down, state)

    def run_client(self, job: ClientJob) -> ClientReply:
        """Client side: train locally from the downloaded adapter and return the upload. Reads only the job, the
        config and the model, so it runs in-process or on a Ray worker with the same result.

        With a pruning rate > 0 the client trains its pruned copy of the base model: the adapter it downloads and
        uploads is the pruned one, and FLOPs and memory are those of the pruned model."""
        ctx, cfg, round, cid = self.ctx, self.ctx.cfg, job.round, job.client
        rate = job.state["rate"]
        if "mask" in job.state:
            self.pruner.adopt(PruneMask.from_json(job.state["mask"]))
        mask = self._client_mask(rate)
        stream = SampleStream(self.streams[cid].indices, cfg.seed, cid)
        stream.load_state_dict(job.state["stream"])
        if mask is None:
            model, cost = ctx.model, ctx.cost
        else:
            model, cost = self.pruner.build(rate), self.pruner.cost(rate)
        download = {k: v for k, v in job.download.tensors.items() if not k.startswith(EXTRA)}
        extra = {k: v for k, v in job.download.tensors.items() if k.startswith(EXTRA)}
        rank = job.state.get("rank", cfg.lora.r)
        load_adapter_state(model, into_container(download, cfg.lora.r) if rank < cfg.lora.r else download)
        seed_torch(cfg.seed, "client-train", round, cid)
        params = trainable_parameters(model)
        anchors = [p.detach().clone() for p in params]
        optimizer = make_optimizer(params, cfg.train.lr, cfg.train.weight_decay)
        keep = cfg.train.keep_optimizer_state
        if keep and job.state.get("optimizer"):
            load_optimizer_tensors(optimizer, job.state["optimizer"])  # a pruned client whose rate changed: fresh
        steps, samples = local_steps(cfg, len(stream.indices)), local_samples(cfg, len(stream.indices))
        side = self.strategy.client_side(extra, job.state.get("strategy"), adapter_parameters(model))
        ctx.progress.start_steps(f"round {round} client {cid}", steps)
        with client_rank(model, rank), self.privacy.training(model, optimizer, round, cid) as (run, step):  # DP-SGD
            result = train_steps(
                run, step, ctx.batches(stream, steps, samples),
                cost=cost, device=ctx.device, max_grad_norm=cfg.train.max_grad_norm,
                regularizer=lambda: self.strategy.regularizer(params, anchors),
                before_step=side.before_step if side else None, on_step=ctx.progress.step,
                loss_fn=sample_mean_loss if cfg.privacy.sample_dp else None,
            )
        stats = {"flops": result.flops, "peak_memory": result.peak_memory_bytes, "rate": rate, "steps": result.steps}
        update = adapter_state(model)
        if rank < cfg.lora.r:
            update = out_of_container(update, rank)
        state = {"stream": stream.state_dict(), **({"optimizer": optimizer_tensors(optimizer)} if keep else {})}
        upload_extra: dict[str, torch.Tensor] = {}
        if side is not None:
            upload_extra, state["strategy"] = side.finish()
        del model, params, anchors, optimizer, side  # a pruned copy is not kept
        failure = result.failure or (None if all_finite(update) else "non-finite adapter weights")
        failure = failure or update_norm_failure(update, download, cfg.train.max_update_ratio)
        if failure:
            return ClientReply(cid, Message("client_failure", meta={"reason": failure}), state,
                               {**stats, "failure": failure})
        update, dp_meta = self.privacy.client_upload(update, download, job.state, round, cid)  # adaptive's bit
        meta = {"num_samples": len(stream.indices), "train_loss": result.mean_loss, **dp_meta}
        if "rank" in job.state:
            update, meta["rank"] = upload_at_own_rank(update, rank, cfg.lora)
        if mask is not None:
            meta["pruning_rate"] = rate
        return ClientReply(cid, Message("client_update", {**update, **upload_extra}, meta), state, stats)

    def _accept(self, reply: ClientReply) -> tuple[ClientUpdate | None, dict]:
        """Driver side of a reply: the client's new state, and its update (None with stats["failure"] if rejected)."""
        cid, up = reply.client, reply.upload
        self.streams[cid].load_state_dict(reply.state["stream"])
        if "optimizer" in reply.state:
            self.optimizer_states[cid] = reply.state["optimizer"]
        if "strategy" in reply.state:
            self.client_strategy_states[cid] = reply.state["strategy"]
        stats = {**reply.stats, "mask": self._client_mask(reply.stats["rate"])}
        if up.kind == "client_failure":
            return None, {**stats, "failure": up.meta["reason"]}
        if "rank" in up.meta:
            self.ranks[cid] = int(up.meta["rank"])
        stats["dp"] = {k: v for k, v in up.meta.items() if k.startswith("dp_")}
        if self.privacy.sample is not None:
            self.privacy.sample.observe(cid, reply.stats.get("steps", 0), len(self.streams[cid].indices))
        return ClientUpdate(cid, up.meta["num_samples"], up.tensors, up.meta["train_loss"]), stats

    def train_client(self, round: int, cid: int) -> tuple[ClientUpdate | None, dict]:
        """One client's whole turn (download, local training, upload) through the run's backend.
        Returns (update or None, stats); ``stats["mask"]`` is its pruning mask (None: full model)."""
        replies = self.ctx.backend.run_clients(self, [self.client_job(round, cid)])
        if cid not in replies.replies:
            return None, {"flops": 0, "peak_memory": 0, "rate": 0.0, "mask": None, "failure": replies.lost[cid]}
        return self._accept(replies.replies[cid])

    def round_clients(self, round: int) -> list[int]:
        """The clients asked in ``round``: the sampled ones the simulated network can reach."""
        left_out = self.ctx.network.left_out(round) if self.ctx.network is not None else []
        return [cid for cid in sample_clients(self.ctx.cfg, round) if cid not in left_out]

    def run_round(self, round: int) -> RoundResult:
        network = self.ctx.network
        left_out = network.left_out(round) if network is not None else []
        clients = self.round_clients(round)
        out = RoundResult(train_loss=None, clients=clients)
        for cid in left_out:  # could not meet network.deadline_s even alone on the whole band: not asked
            out.rejected.append({"client": cid, "reason": "out_of_reach"})
            self.ctx.progress.log(f"[yellow]round {round}: client {cid} cannot meet network.deadline_s this round "
                                  "(out of reach): left out")
        updates: list[ClientUpdate] = []
        masks: dict[int, PruneMask] = {}
        dp_meta: dict[int, dict] = {}
        jobs = [self.client_job(round, cid) for cid in clients]
        rates: list[float] = [job.state["rate"] for job in jobs]
        if self.ctx.cfg.deploy.secure_aggregation:  # the uploads carry no tensors: only their mean arrives
            replies, mean = self.ctx.backend.run_clients_securely(self, jobs, self.global_state)
        else:
            replies, mean = self.ctx.backend.run_clients(self, jobs), None
        out.rejected.extend(replies.lost_records())  # turns lost to a dead or late worker (Ray backend)
        for cid in clients:
            if cid not in replies.replies:
                continue
            update, stats = self._accept(replies.replies[cid])
            if stats["mask"] is not None:
                masks[cid] = stats["mask"]
            out.client_flops[cid] = stats["flops"]
            out.client_peak_memory[cid] = stats["peak_memory"]
            if update is None:
                out.rejected.append({"client": cid, "reason": stats["failure"]})
                self.ctx.progress.log(f"[yellow]round {round}: client {cid} update rejected: {stats['failure']}")
            elif self._straggler(round, cid, stats):
                out.rejected.append({"client": cid, "reason": "straggler"})
                self.ctx.progress.log(f"[yellow]round {round}: client {cid} missed network.deadline_s (straggler)")
            else:
                updates.append(update)
                dp_meta[cid] = stats.get("dp", {})
        if updates:
            self.global_state = self._new_global(round, updates, masks, mean, dp_meta)
            total = sum(u.num_samples for u in updates)
            out.train_loss = sum(u.train_loss * u.num_samples for u in updates) / total
        out.extra.update(self.privacy.record())
        if any(rates):
            out.extra["pruning_rates"] = rates
            for cid, rate in zip(clients, rates):
                self.pruning_history.setdefault(cid, []).append([round, rate])
        return out

    def _new_global(self, round: int, updates: list[ClientUpdate], masks: dict[int, PruneMask],
                    secure_mean: dict[str, torch.Tensor] | None, dp_meta: dict[int, dict]) -> dict[str, torch.Tensor]:
        """The next global adapter: the strategy's step to the mean (secure, pruned, private, mixed-rank or plain)."""
        if masks:
            return self._aggregate_pruned(updates, masks)
        if secure_mean is not None:
            mean = secure_mean
        elif self.privacy.client is not None:
            mean = self.privacy.client.private_mean([u.tensors for u in updates], [dp_meta[u.client] for u in updates],
                                                    round, [u.client for u in updates])
        elif self.heterogeneous:
            lora = self.ctx.cfg.lora
            mean = RANK_AGGREGATIONS.get(lora.rank_aggregation)(
                self.global_state, [(u, self.ranks[u.client]) for u in updates], lora.r, lora.alpha)
        else:
            return self.strategy.aggregate(self.global_state, updates)
        total = sum(u.num_samples for u in updates)
        return self.strategy.aggregate(self.global_state, [ClientUpdate(-1, total, mean, float("nan"))])

    def _straggler(self, round: int, cid: int, stats: dict) -> bool:
        """Whether the simulated network (if any) says this client's finished turn missed the round deadline."""
        network = self.ctx.network
        return network is not None and network.straggler(round, cid, stats["flops"], stats.get("rate", 0.0))

    def _aggregate_pruned(self, updates: list[ClientUpdate], masks: dict[int, PruneMask]) -> dict[str, torch.Tensor]:
        """Expand pruned adapters to full size, average each coordinate over the clients that kept it, then let the
        strategy step from the global state to that mean (FedAvg: the mean itself; FedAdam: its server step).
        Memory can force pruning under any planner, so a strategy that needs whole updates is refused here too."""
        needs = (needs_whole_updates(self.ctx.cfg.federation) or (self.heterogeneous and "per-client LoRA ranks")
                 or (self.privacy.client is not None and "client-level DP (privacy.client_dp)"))
        if needs:
            raise ConfigError(f"{needs} needs each client's whole update, but clients {sorted(masks)} train pruned "
                              "models (their memory is below the model's); use federation.strategy 'fedavg' with "
                              "lora_aggregation 'factors', or profiles with more memory")
        shapes = {key: tuple(t.shape) for key, t in self.global_state.items()}
        pairs = []
        for u in updates:
            mask = masks.get(u.client)
            if mask is None:
                pairs.append((u, None))
            else:
                full, coverage = expand_adapter(u.tensors, mask, shapes)
                pairs.append((replace(u, tensors=full), coverage))
        mean = masked_fedavg(self.global_state, pairs)
        total = sum(u.num_samples for u in updates)
        return self.strategy.aggregate(self.global_state, [ClientUpdate(-1, total, mean, float("nan"))])

    def summary_extra(self) -> dict:
        """With pruning: each client's rates per round, and per rate the measured adapter bytes, block weights,
        LoRA weights and training FLOPs per token (at ``data.max_length``) of the model a client trains."""
        extra: dict = {}
        if self.heterogeneous:
            extra["clients"] = {cid: {"lora_rank": r, "lora_rank_final": self.ranks[cid]}
                                for cid, r in enumerate(self.initial_ranks)}
            lora = self.ctx.cfg.lora
            extra["lora_ranks"] = {"aggregation": lora.rank_aggregation, "global_rank": lora.r}
        if self.privacy.summary():
            extra["privacy"] = self.privacy.summary()
        if not self.pruning_history:
            return extra
        seq = self.ctx.cfg.data.max_length
        by_rate = {}
        for rate in sorted({0.0} | {r for h in self.pruning_history.values() for _, r in h}):
            if rate == 0:
                state, cost = self.global_state, self.ctx.cost
            else:
                state, cost = slice_adapter(self.global_state, self.pruner.mask(rate)), self.pruner.cost(rate)
            by_rate[f"{rate:g}"] = {
                "adapter_bytes": state_bytes(state), "block_params": sum(cost.block_frozen),
                "lora_params": sum(cost.block_trainable), "train_flops_per_token": train_flops(cost, 1, seq),
            }
        cfg = self.ctx.cfg.pruning
        return {**extra, "pruning": {"method": cfg.method, "targets": cfg.targets, "by_rate": by_rate},
                "clients": {cid: {"pruning_rates": h} for cid, h in self.pruning_history.items()}}

    def load_global(self) -> None:
        load_adapter_state(self.ctx.model, self.global_state)

    def state_dict(self) -> dict:
        return {
            "global_state": self.global_state,
            "strategy": self.strategy.state_dict(),
            "streams": [s.state_dict() for s in self.streams],
            **({"pruning_history": self.pruning_history} if self.pruning_history else {}),
            **({"optimizer_states": self.optimizer_states} if self.optimizer_states else {}),
            **({"client_strategy_states": self.client_strategy_states} if self.client_strategy_states else {}),
            **({"ranks": self.ranks} if self.heterogeneous else {}),
            "privacy": self.privacy.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.global_state = dict(state["global_state"])
        load_adapter_state(self.ctx.model, self.global_state)  # checks keys and shapes
        self.strategy.load_state_dict(state["strategy"])
        for stream, s in zip(self.streams, state["streams"], strict=True):
            stream.load_state_dict(s)
        self.pruning_history = {int(c): [list(x) for x in h] for c, h in state.get("pruning_history", {}).items()}
        self.optimizer_states = {int(c): dict(s) for c, s in state.get("optimizer_states", {}).items()}
        self.client_strategy_states = {int(c): dict(s) for c, s in state.get("client_strategy_states", {}).items()}
        self.ranks = [int(r) for r in state.get("ranks", self.initial_ranks)]
        if "privacy" in state:
            self.privacy.load_state_dict(state["privacy"])

    def stop_before(self, round: int) -> str | None:
        sizes = [len(stream.indices) for stream in self.streams]
        return self.privacy.stop_reason(self.round_clients(round), lambda c: local_steps(self.ctx.cfg, sizes[c]),
                                        sizes.__getitem__)
