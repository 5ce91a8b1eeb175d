"""Local-only baseline: every client trains its own adapter on its own data; nothing is ever exchanged.

The floor any federated paradigm has to beat. Clients are sampled and train exactly as in FedLLM (same steps, same
data order, same seeds), but each keeps its adapter between rounds and nothing crosses the transport, so the ledger
stays empty. As in KD-FedLLM there is no global model: the evaluated (and saved) model is the adapter of the client
with the most training samples; every client's own eval loss goes to the round record and its mean to the summary.
"""

from __future__ import annotations

from fedtune.core.seeding import seed_torch
from fedtune.federated.sampling import local_samples, local_steps, sample_clients
from fedtune.models.lora import adapter_state, load_adapter_state, trainable_parameters
from fedtune.paradigms.base import PARADIGMS, Paradigm, RoundResult
from fedtune.paradigms.client_eval import ClientEvaluations, largest_client
from fedtune.runtime.base import Capabilities
from fedtune.training.steps import all_finite, make_optimizer, train_steps, update_norm_failure
from fedtune.training.streams import SampleStream


@PARADIGMS.register("local")
class LocalOnly(Paradigm):
    capabilities = Capabilities(client_adapters=True)

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        initial = adapter_state(ctx.model)
        self.client_states = [dict(initial) for _ in ctx.partitions]
        self.streams = [SampleStream(part, ctx.cfg.seed, cid) for cid, part in enumerate(ctx.partitions)]
        self.client_eval = ClientEvaluations()
        self.largest = largest_client(self.client_sizes())

    def train_client(self, round: int, cid: int) -> dict:
        ctx, cfg = self.ctx, self.ctx.cfg
        load_adapter_state(ctx.model, self.client_states[cid])
        seed_torch(cfg.seed, "client-train", round, cid)
        params = trainable_parameters(ctx.model)
        n = len(self.streams[cid].indices)
        steps, samples = local_steps(cfg, n), local_samples(cfg, n)
        ctx.progress.start_steps(f"round {round} client {cid}", steps)
        result = train_steps(ctx.model, make_optimizer(params, cfg.train.lr, cfg.train.weight_decay),
                             ctx.batches(self.streams[cid], steps, samples), cost=ctx.cost, device=ctx.device,
                             max_grad_norm=cfg.train.max_grad_norm, on_step=ctx.progress.step)
        state = adapter_state(ctx.model)
        failure = result.failure or (None if all_finite(state) else "non-finite adapter weights")
        failure = failure or update_norm_failure(state, self.client_states[cid], cfg.train.max_update_ratio)
        if failure is None:
            self.client_states[cid] = state
        return {"flops": result.flops, "peak_memory": result.peak_memory_bytes, "loss": result.mean_loss,
                "failure": failure}

    def run_round(self, round: int) -> RoundResult:
        clients = sample_clients(self.ctx.cfg, round)
        out = RoundResult(train_loss=None, clients=clients)
        losses = []
        for cid in clients:
            stats = self.train_client(round, cid)
            out.client_flops[cid] = stats["flops"]
            out.client_peak_memory[cid] = stats["peak_memory"]
            if stats["failure"]:  # the client keeps the adapter it had before this round
                out.rejected.append({"client": cid, "reason": stats["failure"]})
                self.ctx.progress.log(f"[yellow]round {round}: client {cid} update dropped: {stats['failure']}")
            else:
                losses.append((stats["loss"], len(self.streams[cid].indices)))
        if losses:
            out.train_loss = sum(l * n for l, n in losses) / sum(n for _, n in losses)
        self.client_eval.refresh(self.ctx, self.client_states, clients)
        out.extra["client_eval_loss"] = self.client_eval.by_client()
        out.extra["mean_client_eval_loss"] = self.client_eval.mean()
        return out

    def load_global(self) -> None:
        load_adapter_state(self.ctx.model, self.client_states[self.largest])

    def summary_extra(self) -> dict:
        return {"local": {"mean_client_eval_loss": self.client_eval.mean(),
                          "client_eval_loss": self.client_eval.by_client(),
                          "evaluated_model": f"client {self.largest}"},
                "clients": {c: {"eval_loss": v} for c, v in self.client_eval.loss.items()}}

    def state_dict(self) -> dict:
        return {"client_states": self.client_states, "streams": [s.state_dict() for s in self.streams],
                "client_eval": self.client_eval.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if len(state["client_states"]) != len(self.client_states):
            raise ValueError(f"checkpoint has {len(state['client_states'])} clients, this run {len(self.client_states)}")
        for s in state["client_states"]:
            load_adapter_state(self.ctx.model, s)  # checks keys and shapes
        self.client_states = [dict(s) for s in state["client_states"]]
        for stream, s in zip(self.streams, state["streams"], strict=True):
            stream.load_state_dict(s)
        self.client_eval.load_state_dict(state["client_eval"])
        self.load_global()
