"""LoRA adapters via PEFT: deterministic attachment, and the adapter state exchanged between clients and server."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedtune.config import LoraConfig
from fedtune.core.errors import FedtuneError
from fedtune.core.files import atomic_write

if TYPE_CHECKING:
    from peft import PeftModel


def _has_conv1d(model: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(module, Conv1D) for module in model.modules())


def attach_lora(model: torch.nn.Module, cfg: LoraConfig, seed: int,
                rank_pattern: dict[str, int] | None = None) -> "PeftModel":
    """Wrap ``model`` with LoRA adapters (only they are trainable).

    The random init of the A matrices is seeded by ``seed`` inside a forked RNG, so it is reproducible and the
    global RNG state is left untouched. GPT-2 style ``Conv1D`` layers get ``fan_in_fan_out=True``.
    ``rank_pattern`` maps module-name regexes to ranks other than ``cfg.r`` (PEFT semantics).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules) if cfg.target_modules else None,
        fan_in_fan_out=_has_conv1d(model),
        rank_pattern=dict(rank_pattern or {}),
    )
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, peft_cfg)
        except ValueError as exc:  # e.g. target modules not found in the model
            raise FedtuneError(f"cannot attach LoRA: {exc}") from None


def adapter_state(model: "PeftModel") -> dict[str, torch.Tensor]:
    """Detached CPU copies of the LoRA weights, keys sorted (adapter name stripped, as PEFT saves them)."""
    state = _peft_state(model)
    return {key: state[key].detach().to("cpu", copy=True) for key in sorted(state)}


def _peft_state(model: "PeftModel") -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def load_adapter_state(model: "PeftModel", state: dict[str, torch.Tensor]) -> None:
    """Load LoRA weights into ``model``; keys and shapes must match exactly (else :class:`FedtuneError`)."""
    from peft import set_peft_model_state_dict

    expected = {key: tuple(t.shape) for key, t in _peft_state(model).items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{key} {tuple(state[key].shape)} != {shape}"
        for key, shape in expected.items()
        if key in state and tuple(state[key].shape) != shape
    ]
    if missing or unexpected or wrong:
        problems = (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
        parts = [f"{name} ({len(k)}): {', '.join(k[:3])}{' ...' * (len(k) > 3)}" for name, k in problems if k]
        raise FedtuneError("adapter state does not match the model's LoRA adapters: " + "; ".join(parts))
    set_peft_model_state_dict(model, state)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters with ``requires_grad`` (the LoRA weights after :func:`attach_lora`)."""
    return [p for p in model.parameters() if p.requires_grad]


def adapter_parameters(model: "PeftModel") -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA parameters keyed as :func:`adapter_state` keys their values (the adapter's name dropped)."""
    active = model.active_adapter
    name = active if isinstance(active, str) else active[0]
    keys = set(_peft_state(model))
    named = {full.replace(f".{name}", ""): p for full, p in model.named_parameters() if p.requires_grad}
    return {key: p for key, p in named.items() if key in keys}


def save_adapter(model: "PeftModel", folder: Path) -> None:
    """The adapter in PEFT format (``PeftModel.from_pretrained(base, folder)``), its config written with the module
    names sorted: PEFT keeps them in a set, whose order differs from process to process."""
    model.save_pretrained(folder)
    config_file = Path(folder) / "adapter_config.json"
    config = json.loads(config_file.read_text())
    for key in ("target_modules", "modules_to_save", "layers_to_transform"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    atomic_write(config_file, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
