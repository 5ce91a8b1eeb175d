"""Shared builders for the model tests (tiny models, trained tokenizer cached per session)."""

from __future__ import annotations

import torch

from fedtune.config import ModelConfig
from fedtune.models.loading import load_model

ARCHS = ("llama", "gpt2", "qwen2")


def tiny(arch: str = "llama", **fields):
    """A tiny random model and its tokenizer on CPU (cache from the session's FEDTUNE_CACHE)."""
    cfg = ModelConfig(source="tiny", tiny={"arch": arch, **fields})
    return load_model(cfg, torch.device("cpu"))
