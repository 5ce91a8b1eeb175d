"""Centralized reference: the same model, data and total samples, trained on the pooled data.

Each round trains as many steps as the clients sampled by FedLLM in that round would, with one
persistent optimizer. Pooling is not free: in round 1 every client uploads its tokenized training
samples, and the ledger counts those bytes.
"""

from __future__ import annotations

import math

import torch

from fedtune.comm.messages import Message
from fedtune.core.errors import TrainingError
from fedtune.core.seeding import seed_torch
from fedtune.federated.sampling import local_samples, local_steps, sample_clients
from fedtune.models.lora import adapter_state, load_adapter_state, trainable_parameters
from fedtune.paradigms.base import PARADIGMS, Paradigm, RoundResult
from fedtune.runtime.base import Capabilities
from fedtune.training.steps import make_optimizer, train_steps
from fedtune.training.streams import SampleStream


def _pack_samples(samples: list[dict]) -> dict[str, torch.Tensor]:
    """A client's tokenized samples as flat int32 tensors plus their lengths (what it must upload)."""
    ids = [t for s in samples for t in s["input_ids"]]
    labels = [t for s in samples for t in s["labels"]]
    lengths = [len(s["input_ids"]) for s in samples]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.int32),
        "labels": torch.tensor(labels, dtype=torch.int32),
        "lengths": torch.tensor(lengths, dtype=torch.int32),
    }


@PARADIGMS.register("centralized")
class Centralized(Paradigm):
    capabilities = Capabilities(federated=False)

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        pooled = sorted(i for part in ctx.partitions for i in part)
        self.stream = SampleStream(pooled, ctx.cfg.seed, "centralized")
        self.params = trainable_parameters(ctx.model)
        self.optimizer = make_optimizer(self.params, ctx.cfg.train.lr, ctx.cfg.train.weight_decay)

    def _pool_data(self, round: int) -> None:
        for cid, part in enumerate(self.ctx.partitions):
            payload = _pack_samples([self.ctx.train_samples[i] for i in part])
            self.ctx.transport.upload(Message("raw_data", payload), round=round, client=cid)

    def run_round(self, round: int) -> RoundResult:
        ctx, cfg = self.ctx, self.ctx.cfg
        if round == 1:
            self._pool_data(round)
        sizes = [len(ctx.partitions[c]) for c in sample_clients(cfg, round)]
        # The round's clients' steps pooled; with local_epochs their samples pooled, in full batches but the last.
        samples = None if cfg.train.local_epochs is None else sum(local_samples(cfg, n) for n in sizes)
        batch = cfg.train.batch_size
        steps = sum(local_steps(cfg, n) for n in sizes) if samples is None else math.ceil(samples / batch)
        seed_torch(cfg.seed, "centralized-train", round)
        ctx.progress.start_steps(f"round {round} centralized", steps)
        result = train_steps(
            ctx.model, self.optimizer, ctx.batches(self.stream, steps, samples), cost=ctx.cost, device=ctx.device,
            max_grad_norm=cfg.train.max_grad_norm, on_step=ctx.progress.step,
        )
        out = RoundResult(train_loss=result.mean_loss if result.losses else None, clients=[],
                          server_flops=result.flops, server_peak_memory=result.peak_memory_bytes)
        if result.failure:
            raise TrainingError(f"centralized training diverged in round {round}: {result.failure}")
        return out

    def load_global(self) -> None:
        pass  # the model itself is the global model

    def state_dict(self) -> dict:
        return {"adapter": adapter_state(self.ctx.model), "optimizer": self.optimizer.state_dict(),
                "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        load_adapter_state(self.ctx.model, state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["stream"])
