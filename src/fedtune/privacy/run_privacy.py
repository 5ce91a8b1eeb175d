"""A run's privacy mechanisms together: client-level DP of the uploads and sample-level DP-SGD, as the paradigm
sees them (one object whose parts may each be off)."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch

from fedtune.config import RunConfig
from fedtune.privacy.client_dp import ClientDP, TensorDict
from fedtune.privacy.dp_sgd import SampleDP, sample_epsilon


class RunPrivacy:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg.privacy
        self.client = ClientDP(cfg) if cfg.privacy.client_level else None
        self.sample = SampleDP(cfg) if cfg.privacy.sample_dp else None

    @classmethod
    def of(cls, cfg: RunConfig) -> "RunPrivacy | None":
        return cls(cfg) if cfg.privacy.client_level or cfg.privacy.sample_dp else None

    def instruction(self) -> dict:
        return self.client.instruction() if self.client else {}

    def client_upload(self, upload: TensorDict, download: TensorDict, state: dict, round: int,
                      cid: int) -> tuple[TensorDict, dict]:
        """The upload as privacy sends it, and the meta the server may see (adaptive clipping's bit)."""
        if self.client is None:
            return upload, {}
        return self.client.client_upload(upload, download, state, round, cid)

    @contextmanager
    def training(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, round: int,
                 cid: int) -> Iterator[tuple[torch.nn.Module, torch.optim.Optimizer]]:
        with (self.sample.training(model, optimizer, round, cid) if self.sample
              else nullcontext((model, optimizer))) as pair:
            yield pair

    def stop_reason(self, clients: list[int], steps_of: Callable[[int], int], samples_of: Callable[[int], int],
                    ) -> str | None:
        if self.client is not None:
            return self.client.stop_reason(clients)
        target = self.cfg.target_epsilon
        if target is None or self.sample is None:
            return None
        s = self.sample
        after = max((sample_epsilon(self.cfg.sample_noise_multiplier, s.batch_size / samples_of(c),
                                    s.steps.get(c, 0) + steps_of(c), self.cfg.delta) for c in clients), default=0.0)
        if after > target * (1 + 1e-9):
            return (f"the next round's DP-SGD steps would spend epsilon {after:.4g} > privacy.target_epsilon "
                    f"{target:g} (delta {self.cfg.delta:g}); now {s.epsilon():.4g}")
        return None

    def record(self) -> dict:
        return {**(self.client.record() if self.client else {}),
                **({"sample_epsilon": self.sample.epsilon()} if self.sample else {})}

    def summary(self) -> dict:
        return {**(self.client.summary() if self.client else {}),
                **({"sample_dp": self.sample.summary()} if self.sample else {})}

    def state_dict(self) -> dict:
        return {"client": self.client.state_dict() if self.client else None,
                "sample": self.sample.state_dict() if self.sample else None}

    def load_state_dict(self, state: dict) -> None:
        if self.client:
            self.client.load_state_dict(state["client"])
        if self.sample:
            self.sample.load_state_dict(state["sample"])
