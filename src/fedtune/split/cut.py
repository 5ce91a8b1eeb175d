"""Cut any Hugging Face decoder-only LM into head | body | tail by slicing its block list.

No per-family copy of a model's forward: the model's own forward runs with its block list temporarily
replaced by a slice, and two hooks make the cut explicit:

- a forward pre-hook on the slice's first block swaps the incoming hidden states for the tensor that
  crossed the cut (the activation from the client, or the body output in a U-shape);
- a forward hook on the slice's last block stops the forward there and hands its output back, unless the
  slice reaches the end of the model, in which case the model's final norm, LM head and loss run.

What crosses the cut is therefore exactly: hidden states (B, T, d) and the 2-D attention mask; position ids
are the model's default ``arange(T)`` on both sides and rotary/positional embeddings and the causal mask are
recomputed by the receiving side from them. Token ids stay where the embeddings are (the client), and in a
U-shape the labels stay with the LM head (the client too).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from fedtune.core.errors import ConfigError


class CutError(ConfigError):
    """An impossible cut (no client block, no server block, head and tail overlapping)."""


@dataclass(frozen=True)
class Cut:
    """Client head = blocks [0, head); server body = [head, L - tail); client tail = [L - tail, L) + norm + LM head."""

    head: int
    tail: int = 0

    def check(self, num_layers: int) -> "Cut":
        if self.head < 1:
            raise CutError(f"cut after block {self.head}: the client must keep at least 1 block (allowed 1..{num_layers - 1})")
        if self.head >= num_layers:
            raise CutError(f"cut after block {self.head}: the model has {num_layers} blocks, so the server would run "
                           f"none (allowed 1..{num_layers - 1})")
        if self.tail < 0:
            raise CutError(f"U-shape tail of {self.tail} blocks: must be >= 0")
        if self.head + self.tail >= num_layers:
            raise CutError(f"head {self.head} + tail {self.tail} blocks leave the server none of the {num_layers} blocks "
                           "(head and tail overlap or touch); need head + tail < number of blocks")
        return self

    def body(self, num_layers: int) -> range:
        return range(self.head, num_layers - self.tail)

    def client_blocks(self, num_layers: int) -> list[int]:
        return [*range(self.head), *range(num_layers - self.tail, num_layers)]


class _Stop(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("forward stopped at the cut")
        self.hidden = hidden


def _hidden_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def find_blocks(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList, str]:
    """(parent, attribute, block list, qualified name) of the model's transformer blocks, found generically
    as the ModuleList of ``config.num_hidden_layers`` modules."""
    n_layers = model.config.num_hidden_layers
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n_layers:
                return parent, name, child, f"{parent_name}.{name}" if parent_name else name
    raise CutError(f"no list of {n_layers} transformer blocks found in {type(model).__name__}")


class SplitModel:
    """Runs slices of one causal LM (plain or PEFT-wrapped); see the module docstring."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._parent, self._attr, self.blocks, self.blocks_name = find_blocks(model)
        self.num_layers = len(self.blocks)

    @contextmanager
    def _slice(self, start: int, stop: int, hidden: torch.Tensor | None) -> Iterator[None]:
        blocks = list(self.blocks)
        handles = []
        if hidden is not None:
            def swap_input(module, args, kwargs):
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden}

            handles.append(blocks[start].register_forward_pre_hook(swap_input, with_kwargs=True))
        if stop < self.num_layers:
            def stop_forward(module, args, output):
                raise _Stop(_hidden_of(output))

            handles.append(blocks[stop - 1].register_forward_hook(stop_forward))
        setattr(self._parent, self._attr, nn.ModuleList(blocks[start:stop]))
        try:
            yield
        finally:
            setattr(self._parent, self._attr, self.blocks)
            for handle in handles:
                handle.remove()

    def run(self, start: int, stop: int, *, attention_mask: torch.Tensor, input_ids: torch.Tensor | None = None,
            hidden: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        """Run blocks [start, stop).

        ``start == 0`` embeds ``input_ids``; otherwise ``hidden`` enters block ``start``. If ``stop`` is the
        number of blocks the model's norm, head (and loss, given ``labels``) run and the model output is
        returned; otherwise the hidden states leaving block ``stop - 1`` are returned.
        """
        if not 0 <= start < stop <= self.num_layers:
            raise CutError(f"block slice [{start}, {stop}) is not inside [0, {self.num_layers})")
        if (start == 0) != (input_ids is not None) or (start > 0) != (hidden is not None):
            raise ValueError("give input_ids for a slice starting at block 0, hidden states otherwise")
        kwargs = {"attention_mask": attention_mask, "use_cache": False}
        if labels is not None:
            kwargs["labels"] = labels
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        else:
            # The embeddings computed from these zeros are replaced at block `start` by `hidden`.
            kwargs["inputs_embeds"] = torch.zeros_like(hidden)
        with self._slice(start, stop, hidden if start > 0 else None):
            try:
                return self.model(**kwargs)
            except _Stop as stop_signal:
                return stop_signal.hidden
