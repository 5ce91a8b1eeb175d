"""Sample-level DP-SGD of a client's local LoRA training through Opacus (``[privacy] sample_dp``).

Opacus's ``GradSampleModule`` computes per-sample gradients of the trainable (LoRA) weights only, the base model
being frozen; its ``DPOptimizer`` clips each to ``sample_clip_norm``, sums them, adds Gaussian noise of std
``sample_noise_multiplier x sample_clip_norm`` and steps the client's AdamW. The loss is the per-sample mean
(:func:`fedtune.training.steps.sample_mean_loss`), so each sample's gradient depends on it alone.

Accounting: each step is a Poisson-subsampled Gaussian of rate batch / client samples, composed over the steps a
client ran (Renyi DP accountant of dp-accounting, add/remove-one sample), the run's epsilon the largest client's.
fedtune's batches are shuffled passes of a fixed size rather than Poisson samples: this is the approximation
Opacus's own accountant makes for such loaders, said here rather than hidden.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Iterator

import dp_accounting
import torch
from dp_accounting.rdp import RdpAccountant

from fedtune.config import RunConfig
from fedtune.core.seeding import derive_seed

DESCRIPTION = ("Renyi DP accountant of dp-accounting; neighbouring: one sample added or removed; each step "
               "Poisson-subsampled at batch / client samples (fedtune's batches are shuffled passes)")


def sample_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon at ``delta`` of ``steps`` DP-SGD steps (0 for none; inf without noise)."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(min(sample_rate, 1.0), dp_accounting.GaussianDpEvent(noise_multiplier))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(accountant.get_epsilon(delta))


class SampleDP:
    """The run's DP-SGD settings and each client's steps so far (for its epsilon)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg, self.seed, self.batch_size = cfg.privacy, cfg.seed, cfg.train.batch_size
        self.steps: dict[int, int] = {}
        self.samples: dict[int, int] = {}

    @contextmanager
    def training(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, round: int,
                 cid: int) -> Iterator[tuple[torch.nn.Module, torch.optim.Optimizer]]:
        """(model to run, optimizer to step) with per-sample clipping and noise; the hooks go on leaving."""
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        with warnings.catch_warnings():  # Opacus warns that secure_mode is off (fedtune's noise is seeded)
            warnings.simplefilter("ignore")
            wrapped = GradSampleModule(model)
            private = DPOptimizer(optimizer, noise_multiplier=self.cfg.sample_noise_multiplier,
                                  max_grad_norm=self.cfg.sample_clip_norm, expected_batch_size=self.batch_size,
                                  generator=torch.Generator().manual_seed(derive_seed(self.seed, "dp-sgd", round,
                                                                                      cid)))
        try:
            with warnings.catch_warnings():  # the frozen embeddings' outputs need no gradient: benign
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                yield wrapped, private
        finally:
            wrapped._close()  # removes Opacus's hooks and per-sample gradients from the shared model

    def observe(self, cid: int, steps: int, num_samples: int) -> None:
        """The server learns a client's steps (from its reply) and data size."""
        self.steps[cid] = self.steps.get(cid, 0) + steps
        self.samples[cid] = num_samples

    def epsilon(self) -> float:
        return max((sample_epsilon(self.cfg.sample_noise_multiplier, self.batch_size / self.samples[c], n,
                                   self.cfg.delta) for c, n in self.steps.items()), default=0.0)

    def summary(self) -> dict:
        return {"epsilon": self.epsilon(), "delta": self.cfg.delta, "noise_multiplier": self.cfg.sample_noise_multiplier,
                "clip_norm": self.cfg.sample_clip_norm, "max_steps": max(self.steps.values(), default=0),
                "accountant": DESCRIPTION}

    def state_dict(self) -> dict:
        return {"steps": dict(self.steps), "samples": dict(self.samples)}

    def load_state_dict(self, state: dict) -> None:
        self.steps = {int(c): int(n) for c, n in state["steps"].items()}
        self.samples = {int(c): int(n) for c, n in state["samples"].items()}
