"""Error feedback for an interface sent every step (the gradients): the sender keeps, per (client, sample), what
the codec dropped the last time it sent that sample, and adds it to the next send of the sample.

This is error-feedback compression as in data-parallel gradient compression (EF-SGD, PowerSGD): a biased low-bit
codec then drops nothing for good, its error is delivered late instead. Interfaces with reuse do not need it: a
residual against the receiver's held copy (``residual = true``) carries the held copy's error by construction.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedtune.compression.store import TensorStore

Key = tuple[int, int]  # (client, sample id)


class ErrorFeedback:
    def __init__(self, spill_dir: Path) -> None:
        self.store = TensorStore(torch.float32, None, spill_dir)

    def corrected(self, key: Key, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` plus what the codec dropped when ``key`` was last sent."""
        return rows.float() + self.store.get(key) if key in self.store else rows.float()

    def keep(self, key: Key, sent: torch.Tensor, received: torch.Tensor) -> None:
        """Remember what this send dropped: what was meant (``sent``) less what the receiver decodes."""
        self.store.put(key, sent.float() - received.float())

    def state_dict(self) -> dict:
        return self.store.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.store.load_state_dict(state)
