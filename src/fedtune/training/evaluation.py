"""Held-out evaluation: token-weighted mean loss over response tokens, and perplexity."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedtune.data.formatting import collate


@dataclass
class EvalResult:
    loss: float
    tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.loss < 50 else float("inf")


@torch.no_grad()
def evaluate(model: torch.nn.Module, samples: list[dict], *, batch_size: int, pad_token_id: int,
             device: torch.device) -> EvalResult:
    """Mean next-token NLL over every labelled token of ``samples`` (dicts with input_ids, labels)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        batch = collate(samples[start : start + batch_size], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        logits = logits[:, :-1].float()
        mask = labels != -100
        nll = F.cross_entropy(logits[mask], labels[mask], reduction="sum")
        total += float(nll)
        count += int(mask.sum())
    if count == 0:
        raise ValueError("the eval split has no labelled tokens")
    return EvalResult(loss=total / count, tokens=count)


def task_metrics(ctx) -> dict[str, float] | None:
    """The configured task metric of ``ctx.model`` by greedy generation on the held-out metric prompts."""
    from fedtune.metrics.task import resolve_metric, score
    from fedtune.models.generation import generate_answers

    cfg = ctx.cfg
    name = resolve_metric(cfg.eval.metric, cfg.data.dataset)
    if name == "none" or not ctx.metric_prompts:
        return None
    answers = generate_answers(ctx.model, ctx.tokenizer, ctx.metric_prompts, cfg.eval.max_new_tokens,
                               batch_size=cfg.eval.batch_size)
    return score(name, answers, ctx.metric_references)
