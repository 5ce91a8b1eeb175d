"""Client-level differential privacy of uploads (``[privacy] client_dp``), as Flower's DP strategies and mods do.

Each client clips its update ``u - d`` (its upload minus what it downloaded) to L2 norm ``C`` over all its tensors
and uploads ``d + clip(u - d)``; in ``local`` mode it also adds Gaussian noise of std ``z C`` itself. In
``central`` mode the server takes the unweighted mean of the round's m uploads (a sample-weighted mean would let a
large client's weight grow its sensitivity) and adds noise of std ``z C / m``. Adaptive clipping (Andrew et al.
2021, central only) moves ``C`` each round towards the ``target_quantile`` of the update norms from the noised
count of clients under the bound; the update's noise multiplier is then ``(z^-2 - (2 sigma_b)^-2)^-1/2``, so the
round spends what a fixed bound with ``z`` would. Noise comes from generators derived from the run's seed, the
round and the client, so a resumed run draws the same noise.
"""

from __future__ import annotations

import math

import torch

from fedtune.config import RunConfig
from fedtune.core.errors import ConfigError
from fedtune.core.seeding import derive_seed
from fedtune.privacy.accountant import DESCRIPTION, ClientAccountant

TensorDict = dict[str, torch.Tensor]


def update_norm(upload: TensorDict, download: TensorDict) -> float:
    """L2 norm of ``upload - download`` over every tensor (float64)."""
    total = sum(float((upload[k].double() - download[k].double()).pow(2).sum()) for k in sorted(upload))
    return math.sqrt(total)


def clip_upload(upload: TensorDict, download: TensorDict, bound: float) -> tuple[TensorDict, float]:
    """``download + clip(upload - download)`` to L2 norm ``bound`` (the upload itself when it is within), and the
    norm before clipping."""
    norm = update_norm(upload, download)
    if norm <= bound:
        return upload, norm
    scale = bound / norm
    clipped = {k: (download[k].double() + (upload[k].double() - download[k].double()) * scale).to(upload[k].dtype)
               for k in upload}
    return clipped, norm


def add_gaussian(state: TensorDict, std: float, seed: int) -> TensorDict:
    """``state`` plus N(0, std^2) per coordinate from a generator seeded ``seed`` (keys in sorted order)."""
    if std == 0:
        return state
    generator = torch.Generator().manual_seed(seed)
    return {k: state[k] + std * torch.randn(state[k].shape, generator=generator, dtype=torch.float32).to(
        state[k].dtype) for k in sorted(state)}


def _std(z: float, bound: float) -> float:
    """Noise std ``z x bound``; none without noise, even for an infinite bound."""
    return z * bound if z else 0.0


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Unweighted mean accumulated in float64 as FedAvg does (``+= t * (1 / m)``), so that with every client's
    weight equal it is FedAvg's mean bit for bit."""
    acc = torch.zeros_like(tensors[0], dtype=torch.float64)
    for tensor in tensors:
        acc += tensor.to(torch.float64) * (1 / len(tensors))
    return acc.to(tensors[0].dtype)


class ClientDP:
    """The run's client-level DP: the clip bound, the noise multiplier, the accountant and the rounds spent."""

    def __init__(self, cfg: RunConfig) -> None:
        p, fed = cfg.privacy, cfg.federation
        self.cfg, self.seed, self.local = p, cfg.seed, p.client_dp == "local"
        self.accountant = ClientAccountant(fed.num_clients, fed.sampled, p.delta, local=self.local)
        self.calibrated = p.noise_multiplier is None
        self.z = self.accountant.calibrate(p.target_epsilon, fed.rounds) if self.calibrated else p.noise_multiplier
        self.count_std = (p.clipped_count_stddev or fed.sampled / 20) if p.adaptive_clip else 0.0
        self.z_update = self._update_multiplier()
        self.clip = p.clip_norm
        self.rounds = 0  # rounds accounted (central)
        self.participation: dict[int, int] = {}  # local: rounds each client took part in

    def _update_multiplier(self) -> float:
        if not self.cfg.adaptive_clip or self.z == 0:
            return self.z
        if self.z >= 2 * self.count_std:
            raise ConfigError(f"privacy.adaptive_clip: noise_multiplier {self.z:.4g} must stay below 2 x "
                              f"clipped_count_stddev ({2 * self.count_std:.4g}) for the count's share of the noise; "
                              "raise privacy.clipped_count_stddev")
        return (self.z ** -2 - (2 * self.count_std) ** -2) ** -0.5

    # -- the client's side ------------------------------------------------------------------
    def instruction(self) -> dict:
        """What a client's turn needs from the server: the round's clip bound."""
        return {"dp_clip_norm": self.clip}

    def client_upload(self, upload: TensorDict, download: TensorDict, instruction: dict, round: int,
                      cid: int) -> tuple[TensorDict, dict]:
        """The private upload (clipped; noised in local mode) and the meta the server may see: with adaptive
        clipping, whether the update was under the bound (the bit the server's noised count sums); else none."""
        bound = float(instruction["dp_clip_norm"])
        clipped, norm = clip_upload(upload, download, bound)
        if self.local:
            clipped = add_gaussian(clipped, _std(self.z, bound), derive_seed(self.seed, "dp-noise", round, cid))
        return clipped, {"dp_under_clip": float(norm <= bound)} if self.cfg.adaptive_clip else {}

    # -- the server's side ------------------------------------------------------------------
    def private_mean(self, uploads: list[TensorDict], metas: list[dict], round: int,
                     clients: list[int]) -> TensorDict:
        """The unweighted mean of the uploads with central noise, and the next round's bound (adaptive)."""
        m = len(uploads)
        mean = {k: _mean([u[k] for u in uploads]) for k in uploads[0]}
        if not self.local:
            mean = add_gaussian(mean, _std(self.z_update, self.clip / m), derive_seed(self.seed, "dp-noise", round))
            self.rounds += 1
        else:
            for cid in clients:
                self.participation[cid] = self.participation.get(cid, 0) + 1
        if self.cfg.adaptive_clip:
            under = sum(meta["dp_under_clip"] for meta in metas)
            noise = torch.randn((), generator=torch.Generator().manual_seed(
                derive_seed(self.seed, "dp-clip-count", round)), dtype=torch.float64)
            share = (under + self.count_std * float(noise)) / m
            self.clip *= math.exp(-self.cfg.clip_lr * (share - self.cfg.target_quantile))
        return mean

    # -- accounting -------------------------------------------------------------------------
    def epsilon(self, extra_round: list[int] | None = None) -> float:
        """Epsilon at delta spent so far (``extra_round``: as if those clients took one more round)."""
        if not self.local:
            return self.accountant.epsilon(self.z, self.rounds + (extra_round is not None))
        counts = dict(self.participation)
        for cid in extra_round or []:
            counts[cid] = counts.get(cid, 0) + 1
        return max((self.accountant.epsilon(self.z, n) for n in counts.values()), default=0.0)

    def stop_reason(self, clients: list[int]) -> str | None:
        """Why the round with these clients may not run: it would spend more than ``target_epsilon``."""
        target = self.cfg.target_epsilon
        if target is None:
            return None
        after = self.epsilon(clients)
        if after > target * (1 + 1e-9):
            return (f"the next round would spend epsilon {after:.4g} > privacy.target_epsilon {target:g} "
                    f"(delta {self.cfg.delta:g}); now {self.epsilon():.4g}")
        return None

    def record(self) -> dict:
        """This round's line in metrics.jsonl."""
        return {"epsilon": self.epsilon(), "dp_clip_norm": self.clip}

    def summary(self) -> dict:
        return {"client_dp": self.cfg.client_dp, "epsilon": self.epsilon(), "delta": self.cfg.delta,
                "noise_multiplier": self.z, "noise_multiplier_calibrated": self.calibrated,
                "update_noise_multiplier": self.z_update, "clip_norm_final": self.clip,
                "adaptive_clip": self.cfg.adaptive_clip, "target_epsilon": self.cfg.target_epsilon,
                "rounds_accounted": self.rounds if not self.local else max(self.participation.values(), default=0),
                "accountant": DESCRIPTION}

    def state_dict(self) -> dict:
        return {"clip": self.clip, "rounds": self.rounds, "participation": dict(self.participation), "z": self.z}

    def load_state_dict(self, state: dict) -> None:
        self.clip, self.rounds = float(state["clip"]), int(state["rounds"])
        self.z = float(state["z"])  # calibrated for the first target: a resume with a larger one keeps the noise
        self.z_update = self._update_multiplier()
        self.participation = {int(c): int(n) for c, n in state["participation"].items()}
