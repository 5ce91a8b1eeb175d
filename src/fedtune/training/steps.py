"""Local training steps shared by every paradigm's client (and the centralized reference)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from fedtune.models.flops import ModelCost, train_flops
from fedtune.models.memory import MemoryMeter


@dataclass
class TrainResult:
    """What a run of local steps did: losses, compute, memory, and why it stopped early if it did."""

    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    flops: int = 0
    peak_memory_bytes: int = 0
    failure: str | None = None

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite (an update with NaN/inf is never aggregated)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def update_ratio(new: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """||new - start|| / ||start||, each norm over all of ``start``'s tensors together, in float64 (``new`` holds
    the same keys): how far an update moved from the weights it started from. inf if ``start`` is all zero and
    ``new`` is not."""
    moved = size = 0.0
    for key, s in start.items():
        s64 = s.detach().to("cpu", torch.float64)
        moved += float((new[key].detach().to("cpu", torch.float64) - s64).square().sum())
        size += float(s64.square().sum())
    if size == 0.0:
        return 0.0 if moved == 0.0 else math.inf
    return math.sqrt(moved / size)


def update_norm_failure(new: dict[str, torch.Tensor], start: dict[str, torch.Tensor],
                        max_ratio: float | None) -> str | None:
    """Why an update is rejected for moving too far (``train.max_update_ratio``: ||new - start|| > max_ratio *
    ||start||, see :func:`update_ratio`), or None (within the bound, or ``max_ratio`` None: no bound)."""
    if max_ratio is None:
        return None
    ratio = update_ratio(new, start)
    if ratio <= max_ratio:
        return None
    return f"update norm {ratio:.3g} x its starting weights' (train.max_update_ratio = {max_ratio:g})"


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat CPU tensors keyed ``"<parameter index>.<name>"`` (AdamW: step,
    exp_avg, exp_avg_sq): what a client keeps from one turn to its next."""
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            out[f"{index}.{name}"] = torch.as_tensor(value).detach().to("cpu", copy=True)
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> bool:
    """Load what :func:`optimizer_tensors` saved. False, loading nothing, when it does not fit the parameters (a
    pruned client whose rate changed trains differently shaped LoRA weights)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    fits = all(0 <= i < len(params) and all(name == "step" or value.shape == params[i].shape
                                            for name, value in s.items()) for i, s in state.items())
    if fits:
        optimizer.load_state_dict({**optimizer.state_dict(), "state": state})
    return fits


def guarded_step(optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> str | None:
    """Clip the gradients to ``max_grad_norm`` (when set) and take the optimizer step, unless their norm is not
    finite: then the step is skipped and the reason returned (the caller zeroes the gradients either way)."""
    if max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if not math.isfinite(float(norm)):
            return "non-finite gradient norm"
    optimizer.step()
    return None


def sample_mean_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token loss averaged per sample, then over the batch: each sample's term depends on it alone (the
    model's own loss divides by the batch's token count, which ties every sample to the others)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), labels, reduction="none")
    kept = (labels != -100).float()
    return ((per_token * kept).sum(1) / kept.sum(1).clamp(min=1)).mean()


def train_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    cost: ModelCost,
    device: torch.device,
    max_grad_norm: float | None,
    regularizer: Callable[[], torch.Tensor | None] | None = None,
    before_step: Callable[[], None] | None = None,
    on_step: Callable[[float], None] | None = None,
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> TrainResult:
    """One optimizer step per batch. Stops at the first non-finite loss or gradient and says so. ``before_step``
    runs after each backward pass, before clipping and the step (it may read and change the gradients);
    ``loss_fn(model, batch)`` replaces the model's own loss (the token mean over the batch)."""
    result = TrainResult()
    meter = MemoryMeter(device)
    model.train()
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with meter.step():
            loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
            if not torch.isfinite(loss):
                result.failure = f"non-finite loss ({loss.item()}) at step {result.steps + 1}"
                optimizer.zero_grad(set_to_none=True)
                break
            total = loss
            extra = regularizer() if regularizer else None
            if extra is not None:
                total = loss + extra
            total.backward()
        if before_step:
            before_step()
        failure = guarded_step(optimizer, max_grad_norm)
        if failure:
            result.failure = f"{failure} at step {result.steps + 1}"
            optimizer.zero_grad(set_to_none=True)
            break
        meter.observe(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        batch_size, seq_len = batch["input_ids"].shape
        result.tokens += batch_size * seq_len
        result.flops += train_flops(cost, tokens=batch_size * seq_len, seq_len=seq_len)
        result.losses.append(float(loss.item()))
        if on_step:
            on_step(result.losses[-1])
    result.peak_memory_bytes = meter.peak_bytes
    return result
