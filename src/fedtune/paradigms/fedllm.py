"""FedLLM: clients train LoRA adapters locally; the server aggregates them (FedAvg by default).

Per round: sample clients; send each the global adapter (downlink); it trains for its local steps
and returns its adapter (uplink); the strategy aggregates the updates that arrived finite.
"""

from __future__ import annotations

import torch

from fedtune.comm.messages import Message
from fedtune.engine.client_data import SampleStream
from fedtune.engine.seeding import seed_torch
from fedtune.engine.training import all_finite, make_optimizer, train_steps
from fedtune.federated.sampling import local_steps, sample_clients
from fedtune.federated.strategies import STRATEGIES, ClientUpdate
from fedtune.models.lora import adapter_state, load_adapter_state, trainable_parameters
from fedtune.paradigms.base import PARADIGMS, Paradigm, RoundResult



@PARADIGMS.register("fedllm")
class FedLLM(Paradigm):
    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg
        self.strategy = STRATEGIES.get(cfg.federation.strategy)(cfg.federation)
        self.global_state = adapter_state(ctx.model)
        self.streams = [SampleStream(part, cfg.seed, cid) for cid, part in enumerate(ctx.partitions)]

    def train_client(self, round: int, cid: int) -> tuple[ClientUpdate | None, dict]:
        """Download the global adapter, train locally, upload. Returns (update or None, stats)."""
        ctx, cfg = self.ctx, self.ctx.cfg
        down = ctx.transport.download(Message("global_adapter", self.global_state), round=round, client=cid)
        load_adapter_state(ctx.model, down.tensors)
        seed_torch(cfg.seed, "client-train", round, cid)
        params = trainable_parameters(ctx.model)
        anchors = [p.detach().clone() for p in params]
        optimizer = make_optimizer(params, cfg.train.lr, cfg.train.weight_decay)
        steps = local_steps(cfg, len(self.streams[cid].indices))
        ctx.progress.start_steps(f"round {round} client {cid}", steps)
        result = train_steps(
            ctx.model, optimizer, ctx.batches(self.streams[cid], steps),
            cost=ctx.cost, device=ctx.device, max_grad_norm=cfg.train.max_grad_norm,
            regularizer=lambda: self.strategy.regularizer(params, anchors), on_step=ctx.progress.step,
        )
        stats = {"flops": result.flops, "peak_memory": result.peak_memory_bytes}
        update = adapter_state(ctx.model)
        failure = result.failure or (None if all_finite(update) else "non-finite adapter weights")
        if failure:
            ctx.transport.upload(Message("client_failure", meta={"reason": failure}), round=round, client=cid)
            return None, {**stats, "failure": failure}
        meta = {"num_samples": len(self.streams[cid].indices), "train_loss": result.mean_loss}
        up = ctx.transport.upload(Message("client_update", update, meta), round=round, client=cid)
        return ClientUpdate(cid, up.meta["num_samples"], up.tensors, up.meta["train_loss"]), stats

    def run_round(self, round: int) -> RoundResult:
        clients = sample_clients(self.ctx.cfg, round)
        out = RoundResult(train_loss=None, clients=clients)
        updates: list[ClientUpdate] = []
        for cid in clients:
            update, stats = self.train_client(round, cid)
            out.client_flops[cid] = stats["flops"]
            out.client_peak_memory[cid] = stats["peak_memory"]
            if update is None:
                out.rejected.append({"client": cid, "reason": stats["failure"]})
                self.ctx.progress.log(f"[yellow]round {round}: client {cid} update rejected: {stats['failure']}")
            else:
                updates.append(update)
        if updates:
            self.global_state = self.strategy.aggregate(self.global_state, updates)
            total = sum(u.num_samples for u in updates)
            out.train_loss = sum(u.train_loss * u.num_samples for u in updates) / total
        return out

    def load_global(self) -> None:
        load_adapter_state(self.ctx.model, self.global_state)

    def state_dict(self) -> dict:
        return {
            "global_state": self.global_state,
            "strategy": self.strategy.state_dict(),
            "streams": [s.state_dict() for s in self.streams],
        }

    def load_state_dict(self, state: dict) -> None:
        self.global_state = dict(state["global_state"])
        load_adapter_state(self.ctx.model, self.global_state)  # checks keys and shapes
        self.strategy.load_state_dict(state["strategy"])
        for stream, s in zip(self.streams, state["streams"], strict=True):
            stream.load_state_dict(s)
