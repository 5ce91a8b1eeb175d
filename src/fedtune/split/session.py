"""The two halves of one client's split training session, and the in-process link between them.

:class:`ClientSide` and :class:`ServerSide` each run on a model holding their blocks: the run's one shared model
in process, or a Ray worker's own copy. Between the activation upload and the gradient reply the client keeps the
autograd graph of its head blocks (and the open step of its memory meter), the server the graph from the received
activations to the loss (standard) or to the body output (U-shape).

The calls of a step and the messages between them are :mod:`fedtune.split.protocol`'s; every message crosses the
run's transport and the driver only relays. The order of forward passes (which is the order of dropout draws) is
the same in process and on Ray, where the random generator's state is handed from side to side with the messages
(:func:`rng_state`), so both give one result.

Compression: each side sends with the thresholds the driver's controllers chose for the session, through its copy
of the run's channels. In process those are the driver's own; a side run in a worker's copy hands back a
:class:`~fedtune.split.protocol.SideReport` (its reuse counts, the cache entries it touched) for the driver's
channels. A side sees the run only through its :class:`~fedtune.split.trainer.SplitTrainer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedtune.comm.messages import Message
from fedtune.core.seeding import seed_torch
from fedtune.models.lora import adapter_state, load_adapter_state
from fedtune.models.memory import MemoryMeter
from fedtune.split.cut import Cut
from fedtune.split.leakage import noise_generator, noisy_activations
from fedtune.split.protocol import ClientResult, ServerResult, SideReport, StepInfo, TensorDict, step_failure
from fedtune.split.trainer import SplitTrainer
from fedtune.training.steps import all_finite, make_optimizer, update_norm_failure
from fedtune.training.streams import SampleStream


def rng_state(device: torch.device) -> dict:
    """The global generator state a side hands on (CPU, plus CUDA when the model runs there)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict | None, device: torch.device) -> None:
    if state is None:
        return
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def load_blocks(model, tensors: TensorDict) -> None:
    """Load the LoRA weights of some blocks (the rest keep their values); keys and shapes are checked."""
    load_adapter_state(model, {**adapter_state(model), **tensors})


@dataclass
class _Pending:
    act: torch.Tensor
    meter_step: Any
    mask: torch.Tensor
    cpu_mask: torch.Tensor
    labels: torch.Tensor
    rows: list[int]
    epoch: int
    tail_input: torch.Tensor | None = None


class _Side:
    side = ""  # "client" or "server"

    def __init__(self, trainer: SplitTrainer, cid: int, thetas: dict[str, float]) -> None:
        self.t, self.cid, self.thetas = trainer, cid, thetas
        self.ctx = trainer.ctx
        self.device = trainer.ctx.device
        self.L = trainer.num_layers
        self.sends: list[tuple[str, int, int, int]] = []
        self.samples: set[int] = set()  # the sample ids this session touched

    def _send(self, name: str, x: torch.Tensor, rows: list[int], mask: torch.Tensor, epoch: int,
              extra: dict | None = None) -> tuple[Message, Message]:
        iface = self.t.channels[name]
        sent = iface.counts.sent
        out = iface.send(self.cid, rows, x, mask, extra or {}, self.thetas.get(name, 1.0), epoch)
        self.sends.append((name, iface.counts.sent - sent, len(rows), epoch))
        return out

    def report(self) -> SideReport:
        """This session's sends and the cache entries it touched (for a driver that keeps them)."""
        return SideReport(self.sends, self.t.channels.export_caches(self.side, self.cid, self.samples))


class ClientSide(_Side):
    """A client's half: its blocks' optimizer and memory meter, its data stream, its pending activation graph."""

    side = "client"

    def __init__(self, trainer: SplitTrainer, round: int, cid: int, cut: Cut, adapter: TensorDict,
                 stream: SampleStream, steps: int, thetas: dict[str, float], samples: int | None = None) -> None:
        super().__init__(trainer, cid, thetas)
        cfg = self.ctx.cfg
        self.cut, self.stream = cut, stream
        blocks = set(cut.client_blocks(self.L))
        self.keys = trainer.keys(blocks)
        load_blocks(self.ctx.model, adapter)
        self.start = adapter  # what the client downloaded: its update's norm is measured against it
        seed_torch(cfg.seed, "split-train", round, cid)
        self.opt = make_optimizer(trainer.params(blocks), cfg.train.lr, cfg.train.weight_decay)
        self.meter = MemoryMeter(self.device, by_tensors=True)
        self.batches = self.ctx.indexed_batches(stream, steps, samples)
        self.pending: _Pending | None = None
        self.ctx.model.train()
        self.noise_keys = (cfg.seed, "activation-noise", round, cid)
        self.steps_sent = 0

    def _noised(self, act: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The activations as uploaded: with ``privacy.activation_noise``, plus this step's noise (no draw at 0)."""
        step, self.steps_sent = self.steps_sent, self.steps_sent + 1
        ratio = self.ctx.cfg.privacy.activation_noise
        return noisy_activations(act.detach(), mask, ratio, noise_generator(*self.noise_keys, step)) if ratio else act

    def forward(self) -> tuple[Message, Message, StepInfo]:
        """The next batch through the head blocks: (activation message, its uncompressed equivalent, info)."""
        rows, batch = next(self.batches)
        self.samples.update(rows)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        cpu_mask = mask.cpu()
        step = self.meter.step()
        step.__enter__()
        act = self.t.split.run(0, self.cut.head, input_ids=ids, attention_mask=mask)
        extra = {"attention_mask": cpu_mask.bool()}
        if not self.cut.tail:
            extra["labels"] = labels.cpu().to(torch.int32)
        epoch = self.stream.epoch
        message, baseline = self._send("activations", self._noised(act, mask), rows, cpu_mask, epoch, extra)
        self.pending = _Pending(act, step, mask, cpu_mask, labels, rows, epoch)
        return message, baseline, {"tokens": ids.numel(), "seq": ids.shape[1], "rows": rows, "epoch": epoch}

    def tail(self, body: Message) -> tuple[Message, Message | None, float]:
        """U-shape: the body output through the tail blocks, norm, LM head and loss; back-propagate to the body
        output and return its gradient (a step failure if the loss is not finite)."""
        pd, L = self.pending, self.L
        t = self.t.channels["body_output"].receive(self.cid, body, pd.cpu_mask).to(self.device).requires_grad_()
        out = self.t.split.run(L - self.cut.tail, L, hidden=t, attention_mask=pd.mask, labels=pd.labels)
        loss = out.loss
        if not torch.isfinite(loss):
            return step_failure("non-finite loss"), None, float(loss.item())
        loss.backward()
        message, baseline = self._send("tail_gradients", t.grad, pd.rows, pd.cpu_mask, pd.epoch)
        return message, baseline, float(loss.item())

    def backward(self, grads: Message) -> Message | None:
        """The cut-layer gradient through the head blocks; one client optimizer step (a step failure instead if
        the gradient norm is not finite)."""
        pd, self.pending = self.pending, None
        pd.meter_step.__exit__(None, None, None)
        pd.act.backward(self.t.channels["gradients"].receive(self.cid, grads, pd.cpu_mask).to(self.device))
        failure = self.t.step(self.opt)
        self.meter.observe(self.t.client_modules(self.cut), self.opt)
        return step_failure(failure) if failure else None

    def abort(self) -> None:
        """Drop a step whose loss was not finite."""
        if self.pending is not None:
            self.pending.meter_step.__exit__(None, None, None)
            self.pending = None
        self.opt.zero_grad(set_to_none=True)

    def finish(self, failure: str | None, mean_loss: float) -> tuple[Message, int, dict]:
        """The session's last upload (the client's blocks, or a failure notice), its peak memory, its stream."""
        self.abort()
        state = adapter_state(self.ctx.model)
        client_state = {k: state[k] for k in self.keys}
        if failure is None and not all_finite(client_state):
            failure = "non-finite client adapter weights"
        failure = failure or update_norm_failure(client_state, self.start, self.ctx.cfg.train.max_update_ratio)
        if failure:
            message = Message("client_failure", meta={"reason": failure})
        else:
            message = self.t.upload_coder.encode("client_adapter", state, self.keys, {
                "num_samples": len(self.stream.indices), "train_loss": mean_loss}, start=self.start)
        return message, self.meter.peak_bytes, self.stream.state_dict()


class ServerSide(_Side):
    """The server's half for one client's session: the body blocks' optimizer and meter, its pending graph."""

    side = "server"

    def __init__(self, trainer: SplitTrainer, round: int, cid: int, cut: Cut, body: TensorDict,
                 thetas: dict[str, float]) -> None:
        super().__init__(trainer, cid, thetas)
        cfg = self.ctx.cfg
        self.cut = cut
        blocks = set(cut.body(self.L))
        self.keys = trainer.keys(blocks)
        load_blocks(self.ctx.model, body)
        self.opt = make_optimizer(trainer.params(blocks), cfg.train.lr, cfg.train.weight_decay)
        self.meter = MemoryMeter(self.device, by_tensors=True)
        self.pending: tuple | None = None
        self.ctx.model.train()

    def _receive(self, up: Message, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, Message]:
        """The received activations, the attention mask, and the upload as sent (with the labels, standard split)."""
        self.samples.update(rows)
        iface = self.t.channels["activations"]
        up = iface.open(up)
        mask = up.tensors["attention_mask"].long()
        h = iface.receive(self.cid, up, mask).to(self.device).requires_grad_()
        return h, mask, up

    def _observe(self) -> None:
        self.meter.observe(self.t.server_modules(self.cut), self.opt)

    def step(self, up: Message, rows: list[int], epoch: int) -> tuple[Message, Message | None, float]:
        """Standard split: body, norm, LM head and loss on the activations; back-propagate, step, and return the
        cut-layer gradient (a step failure if the loss or the gradient norm is not finite)."""
        with self.meter.step():
            h, mask, up = self._receive(up, rows)
            out = self.t.split.run(self.cut.head, self.L, hidden=h, attention_mask=mask.to(self.device),
                                   labels=up.tensors["labels"].to(self.device).long())
        loss = out.loss
        if not torch.isfinite(loss):
            return step_failure("non-finite loss"), None, float(loss.item())
        loss.backward()
        failure = self.t.step(self.opt)
        if failure:
            return step_failure(failure), None, float(loss.item())
        message, baseline = self._send("gradients", h.grad, rows, mask, epoch)
        self._observe()
        return message, baseline, float(loss.item())

    def forward(self, up: Message, rows: list[int], epoch: int) -> tuple[Message, Message]:
        """U-shape: the body blocks on the activations; returns the body output (kept: its graph waits)."""
        with self.meter.step():
            h, mask, _ = self._receive(up, rows)
            body = self.t.split.run(self.cut.head, self.L - self.cut.tail, hidden=h, attention_mask=mask.to(self.device))
        self.pending = (h, body, mask, rows, epoch)
        return self._send("body_output", body, rows, mask, epoch)

    def backward(self, tail_grads: Message) -> tuple[Message, Message | None]:
        """U-shape: the tail gradient through the body blocks; one server step; the cut-layer gradient (a step
        failure if the gradient norm is not finite)."""
        (h, body, mask, rows, epoch), self.pending = self.pending, None
        body.backward(self.t.channels["tail_gradients"].receive(self.cid, tail_grads, mask).to(self.device))
        failure = self.t.step(self.opt)
        if failure:
            return step_failure(failure), None
        message, baseline = self._send("gradients", h.grad, rows, mask, epoch)
        self._observe()
        return message, baseline

    def abort(self) -> None:
        self.pending = None
        self.opt.zero_grad(set_to_none=True)

    def finish(self) -> tuple[TensorDict, int]:
        """The body blocks' weights after this session, and the server's peak memory in it."""
        self.abort()
        state = adapter_state(self.ctx.model)
        return {k: state[k] for k in self.keys}, self.meter.peak_bytes


# ---------------------------------------------------------------------------------------------------------------
# The in-process endpoints: both sides on the run's model, every message through the run's transport.


@dataclass
class LocalClient:
    """:class:`~fedtune.split.protocol.ClientEndpoint` in this process."""

    side: ClientSide
    transport: Any
    round: int
    cid: int

    def _up(self, message: Message, baseline: Message | None = None) -> Message:
        return self.transport.upload(message, round=self.round, client=self.cid, baseline=baseline)

    def forward(self) -> tuple[Message, StepInfo]:
        message, baseline, info = self.side.forward()
        return self._up(message, baseline), info

    def tail(self, body: Message) -> tuple[Message, float]:
        message, baseline, loss = self.side.tail(body)
        return self._up(message, baseline), loss

    def backward(self, grads: Message) -> Message | None:
        failure = self.side.backward(grads)
        return None if failure is None else self._up(failure)

    def abort(self) -> None:
        self.side.abort()

    def finish(self, failure: str | None, mean_loss: float) -> ClientResult:
        """No report: the side counted and cached in the driver's own channels."""
        message, memory, stream = self.side.finish(failure, mean_loss)
        return ClientResult(self._up(message), memory, stream)


@dataclass
class LocalServer:
    """:class:`~fedtune.split.protocol.ServerEndpoint` in this process."""

    side: ServerSide
    transport: Any
    round: int
    cid: int

    def _down(self, message: Message, baseline: Message | None = None) -> Message:
        return self.transport.download(message, round=self.round, client=self.cid, baseline=baseline)

    def step(self, up: Message, info: StepInfo) -> tuple[Message, float]:
        message, baseline, loss = self.side.step(up, info["rows"], info["epoch"])
        return self._down(message, baseline), loss

    def forward(self, up: Message, info: StepInfo) -> Message:
        return self._down(*self.side.forward(up, info["rows"], info["epoch"]))

    def backward(self, tail_grads: Message) -> Message:
        return self._down(*self.side.backward(tail_grads))

    def abort(self, lost: bool = False) -> None:
        self.side.abort()

    def finish(self) -> ServerResult:
        state, memory = self.side.finish()
        return ServerResult(state, memory)


def open_client_side(trainer: SplitTrainer, job) -> ClientSide:
    """The client's half of a session from its job (``download``: its blocks; ``state``: stream position, cut, steps,
    samples, thresholds)."""
    state = job.state
    cut = trainer.cut(state["cut"])
    adapter = trainer.download_coder.decode(job.download, adapter_state(trainer.ctx.model), trainer.client_keys(cut))
    return ClientSide(trainer, job.round, job.client, cut, adapter, trainer.stream(job.client, state["stream"]),
                      state["steps"], state["thetas"], state.get("samples"))


def open_server_side(trainer: SplitTrainer, job, body: TensorDict) -> ServerSide:
    """The server's half of a session: ``body`` holds the weights its blocks start from."""
    return ServerSide(trainer, job.round, job.client, trainer.cut(job.state["cut"]), body, job.state["thetas"])
