"""KD-FedLLM client models: clients may run different (e.g. smaller) models that share the main tokenizer.

One model per distinct name lives in memory (clients are state, as everywhere); ``main`` is the run's model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtune.core.errors import ConfigError
from fedtune.kd.distill import check_tokenizers
from fedtune.models.flops import ModelCost, model_cost
from fedtune.models.loading import load_model
from fedtune.models.lora import attach_lora


@dataclass
class ClientModel:
    name: str
    model: torch.nn.Module  # with LoRA attached
    cost: ModelCost


def build_client_models(ctx) -> tuple[dict[str, ClientModel], list[str]]:
    """({name: ClientModel}, model name per client) from ``[kd] client_models`` / ``[kd.models]``.

    Raises :class:`ConfigError` when a model's tokenizer or output vocabulary differs from the main model's:
    logit-level distillation needs one token -> id map.
    """
    cfg, kd = ctx.cfg, ctx.cfg.kd
    n = len(ctx.partitions)
    names = kd.client_models * n if len(kd.client_models) == 1 else list(kd.client_models) or ["main"] * n
    models = {"main": ClientModel("main", ctx.model, ctx.cost)}
    vocab = ctx.model.get_output_embeddings().weight.shape[0]
    for name in sorted(set(names) - {"main"}):
        base, tokenizer = load_model(kd.models[name], ctx.device)
        try:
            check_tokenizers([ctx.tokenizer, tokenizer])
        except ConfigError as exc:
            raise ConfigError(f"kd.models.{name}: {exc}") from None
        own = base.get_output_embeddings().weight.shape[0]
        if own != vocab:
            raise ConfigError(f"kd.models.{name}: its output vocabulary has {own} entries, the main model's {vocab}; "
                              "logits cannot be aligned")
        model = attach_lora(base, cfg.lora, seed=cfg.seed)
        models[name] = ClientModel(name, model, model_cost(model))
    return models, names
