"""SplitCom threshold controllers: fixed, bang-bang on validation perplexity, and DDPG.

A controller picks the similarity threshold ``theta`` (higher = stricter = more uploads) for each
decision interval, one client's local session: ``start_session`` returns the theta to use,
``end_session`` reports what the session cost, ``observe_eval`` reports validation perplexity.
State dicts hold only tensors and plain Python values (``torch.load(weights_only=True)`` safe) and
make a resumed controller behave bit-identically to an uninterrupted one. No controller call
consumes or changes the global torch RNG.

Each controller declares the ``[compression]`` keys it reads in its own ``Settings`` table (beyond ``theta``, the
fixed or starting threshold every controller gets); config validation finds them through :data:`CONTROLLERS`, so
a new controller with new settings is one module and one registry line (see the README's "Extending fedtune").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import nn

from fedtune.config.base import Section
from fedtune.core.registry import Registry


@dataclass
class SessionObservation:
    """What one local session did: its loss, share of samples uploaded, and bytes."""

    train_loss: float
    upload_ratio: float  # fraction of samples uploaded in the session, 0..1
    bytes_sent: int
    bytes_full: int  # what the same session would have sent without compression
    progress: float  # 0..1 share of the run done


class NoSettings(Section):
    """A controller that reads no ``[compression]`` key but ``theta``."""


class ThresholdController:
    """Base class: a constant theta; subclasses override the hooks they need."""

    #: The ``[compression]`` keys this controller reads (a table of its own; every field is a config key).
    Settings: ClassVar[type[Section]] = NoSettings

    def __init__(self, theta: float, settings: Section, seed: int) -> None:
        self.cfg = settings
        self.seed = seed
        self._theta = float(theta)

    @property
    def theta(self) -> float:
        """The theta last chosen (or the starting one)."""
        return self._theta

    def start_session(self) -> float:
        """Theta to use for the next decision interval (one client's local session)."""
        return self._theta

    def end_session(self, obs: SessionObservation) -> None:
        """Report what the session started by :meth:`start_session` did."""

    def observe_eval(self, eval_ppl: float) -> None:
        """Report a validation perplexity."""

    def state_dict(self) -> dict[str, Any]:
        return {"theta": self._theta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._theta = float(state["theta"])


CONTROLLERS: Registry[type[ThresholdController]] = Registry("threshold controller")


def make_controller(name: str, theta: float, seed: int, settings: Section | None = None) -> ThresholdController:
    """Build the controller ``name`` (unknown names raise ConfigError) with its settings (default: its defaults)."""
    cls = CONTROLLERS.get(name)
    return cls(theta, settings if settings is not None else cls.Settings(), seed)


@CONTROLLERS.register("fixed")
class FixedController(ThresholdController):
    """theta = settings.theta, always."""


class BangBangSettings(Section):
    theta_low: float = Field(0.99, ge=0, le=1, description="Bang-bang lax threshold (used while perplexity does not rise).")
    theta_high: float = Field(0.9999, ge=0, le=1, description="Bang-bang strict threshold (after perplexity rose).")
    tolerance: float = Field(0.01, ge=0, description="Bang-bang: relative perplexity rise that triggers the strict "
                             "threshold.")


@CONTROLLERS.register("bangbang")
class BangBangController(ThresholdController):
    """Strict (theta_high) after a validation-perplexity rise beyond ``tolerance``, else lax (theta_low).

    The first evaluation only records. A non-finite perplexity counts as a rise.
    """

    Settings = BangBangSettings

    def __init__(self, theta: float, settings: BangBangSettings, seed: int) -> None:
        super().__init__(theta, settings, seed)
        self._theta = float(settings.theta_low)
        self._last_ppl: float | None = None

    def observe_eval(self, eval_ppl: float) -> None:
        ppl = float(eval_ppl)
        if self._last_ppl is not None:
            rose = not math.isfinite(ppl) or ppl > self._last_ppl * (1.0 + self.cfg.tolerance)
            self._theta = float(self.cfg.theta_high if rose else self.cfg.theta_low)
        self._last_ppl = ppl

    def state_dict(self) -> dict[str, Any]:
        return {"theta": self._theta, "last_ppl": self._last_ppl}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._theta = float(state["theta"])
        last = state["last_ppl"]
        self._last_ppl = None if last is None else float(last)


STATE_DIM = 5


def _mlp(n_in: int, n_out: int, hidden: int = 32) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, hidden, dtype=torch.float32), nn.ReLU(),
        nn.Linear(hidden, hidden, dtype=torch.float32), nn.ReLU(),
        nn.Linear(hidden, n_out, dtype=torch.float32),
    )


class _Actor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp(STATE_DIM, 1)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(s))


class _Critic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp(STATE_DIM + 1, 1)

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([s, a], dim=-1))


class DDPGSettings(Section):
    theta_min: float = Field(0.95, ge=0, le=1, description="DDPG action range, lower end.")
    theta_max: float = Field(0.99999, ge=0, le=1, description="DDPG action range, upper end.")
    ddpg_lambda: float = Field(1.0, ge=0, description="DDPG reward weight of bytes: r = -loss - lambda * bytes_sent / "
                               "bytes_full.")
    ddpg_sigma: float = Field(0.1, ge=0, description="DDPG Gaussian exploration noise (in the [-1, 1] action space).")

    @model_validator(mode="after")
    def _range(self) -> "DDPGSettings":
        if not self.theta_min < self.theta_max:
            raise ValueError(f"compression.theta_min ({self.theta_min}) must be below compression.theta_max "
                             f"({self.theta_max})")
        return self


@dataclass(frozen=True)
class DDPGHyper:
    """The learner's own hyperparameters (not config keys)."""

    sigma_decay: float = 1.0  # sigma is multiplied by this after each session
    gamma: float = 0.9
    tau: float = 0.05
    actor_lr: float = 1e-3
    critic_lr: float = 1e-3
    buffer_size: int = 1000
    batch_size: int = 8
    updates_per_session: int = 4


@CONTROLLERS.register("ddpg")
class DDPGController(ThresholdController):
    """DDPG actor-critic choosing theta once per session.

    State (5 floats, all roughly in [-1, 1]): the previous theta mapped to action units,
    ``loss / (1 + |loss|)``, ``tanh(loss - previous loss)``, the upload ratio, and progress. Before the
    first session: ``(settings.theta, 0, 0, 1, 0)``. Action: ``a`` in [-1, 1] (actor's tanh plus
    Gaussian noise, clipped), ``theta = theta_min + (a + 1) / 2 * (theta_max - theta_min)``.
    Reward: ``-train_loss - lam * bytes_sent / bytes_full`` (raw loss, as in the paper's design).
    One transition per session; ``updates_per_session`` minibatch updates once the replay buffer
    holds ``batch_size`` transitions; soft target updates with ``tau``. All randomness (network init,
    noise, minibatches) comes from the seed, never from the global torch RNG.
    """

    Settings = DDPGSettings

    def __init__(self, theta: float, settings: DDPGSettings, seed: int, hyper: DDPGHyper = DDPGHyper()) -> None:
        super().__init__(theta, settings, seed)
        if hyper.buffer_size < 1 or hyper.batch_size < 1:
            raise ValueError("buffer_size and batch_size must be at least 1")
        self.hyper = hyper
        self._theta = min(max(float(theta), settings.theta_min), settings.theta_max)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.actor, self.critic = _Actor(), _Critic()
            self.actor_target, self.critic_target = _Actor(), _Critic()
        self.actor_target.load_state_dict(self.actor.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=hyper.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=hyper.critic_lr)
        self.gen = torch.Generator().manual_seed(seed + 1)
        cap = int(hyper.buffer_size)
        self._buf = {
            k: torch.zeros(cap, width, dtype=torch.float32)
            for k, width in (("s", STATE_DIM), ("a", 1), ("r", 1), ("s2", STATE_DIM))
        }
        self._size = 0
        self._ptr = 0
        self._sigma = float(settings.ddpg_sigma)
        self._prev_loss: float | None = None
        self._state = self._make_state(self._theta, 0.0, 0.0, 1.0, 0.0)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- mapping ---------------------------------------------------------------------------------
    # Actions map linearly onto log10(1 - theta): the useful thresholds crowd just below 1 (measured
    # similarities are 0.9997-0.99999), so a linear map of [theta_min, theta_max] would waste the range.
    def _log_gap(self, theta: float) -> float:
        return math.log10(max(1.0 - theta, 1e-12))

    def _to_theta(self, a: float) -> float:
        lo, hi = self._log_gap(self.cfg.theta_min), self._log_gap(self.cfg.theta_max)
        theta = 1.0 - 10.0 ** (lo + (a + 1.0) / 2.0 * (hi - lo))
        return min(max(theta, self.cfg.theta_min), self.cfg.theta_max)

    def _to_action(self, theta: float) -> float:
        lo, hi = self._log_gap(self.cfg.theta_min), self._log_gap(self.cfg.theta_max)
        return 2.0 * (self._log_gap(theta) - lo) / (hi - lo) - 1.0

    def _make_state(self, theta: float, loss_f: float, dloss_f: float, upload: float,
                    progress: float) -> torch.Tensor:
        return torch.tensor([self._to_action(theta), loss_f, dloss_f, upload, progress],
                            dtype=torch.float32)

    # --- protocol --------------------------------------------------------------------------------
    def start_session(self) -> float:
        s = self._state.clone()
        with torch.no_grad():
            mu = float(self.actor(s.unsqueeze(0))[0, 0])
        noise = float(torch.randn((), generator=self.gen)) * self._sigma
        a = min(max(mu + noise, -1.0), 1.0)
        self._pending = (s, torch.tensor([a], dtype=torch.float32))
        self._theta = self._to_theta(a)
        return self._theta

    def end_session(self, obs: SessionObservation) -> None:
        if self._pending is None:
            raise RuntimeError("DDPGController.end_session called without start_session")
        s, a = self._pending
        self._pending = None
        loss = float(obs.train_loss)
        ratio = obs.bytes_sent / obs.bytes_full if obs.bytes_full > 0 else 0.0
        reward = -loss - self.cfg.ddpg_lambda * ratio
        dloss = 0.0 if self._prev_loss is None else math.tanh(loss - self._prev_loss)
        self._prev_loss = loss
        s2 = self._make_state(self._theta, loss / (1.0 + abs(loss)), dloss,
                              float(obs.upload_ratio), float(obs.progress))
        self._state = s2
        self._push(s, a, reward, s2)
        if self._size >= self.hyper.batch_size:
            with torch.inference_mode(False), torch.enable_grad():
                for _ in range(self.hyper.updates_per_session):
                    self._update()
        self._sigma *= self.hyper.sigma_decay

    def _push(self, s: torch.Tensor, a: torch.Tensor, r: float, s2: torch.Tensor) -> None:
        i = self._ptr
        self._buf["s"][i] = s
        self._buf["a"][i] = a
        self._buf["r"][i, 0] = r
        self._buf["s2"][i] = s2
        self._ptr = (i + 1) % self._buf["s"].shape[0]
        self._size = min(self._size + 1, self._buf["s"].shape[0])

    def _update(self) -> None:
        idx = torch.randint(self._size, (self.hyper.batch_size,), generator=self.gen)
        s, a, r, s2 = (self._buf[k][idx] for k in ("s", "a", "r", "s2"))
        with torch.no_grad():
            y = r + self.hyper.gamma * self.critic_target(s2, self.actor_target(s2))
        critic_loss = nn.functional.mse_loss(self.critic(s, a), y)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        actor_loss = -self.critic(s, self.actor(s)).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        with torch.no_grad():
            for net, target in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
                for p, tp in zip(net.parameters(), target.parameters()):
                    tp.lerp_(p, self.hyper.tau)

    # --- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        n = self._size
        return {
            "theta": self._theta,
            "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
            "actor_target": self.actor_target.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
            "rng": self.gen.get_state(),
            "buffer": {k: v[:n].clone() for k, v in self._buf.items()},
            "ptr": self._ptr, "sigma": self._sigma, "prev_loss": self._prev_loss,
            "state": self._state.clone(),
            "pending": None if self._pending is None else [t.clone() for t in self._pending],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._theta = float(state["theta"])
        for name in ("actor", "critic", "actor_target", "critic_target", "actor_opt", "critic_opt"):
            getattr(self, name).load_state_dict(state[name])
        self.gen.set_state(state["rng"])
        buf = state["buffer"]
        n = int(buf["s"].shape[0])
        if n > self._buf["s"].shape[0]:
            raise ValueError(f"replay buffer of {n} transitions exceeds buffer_size {self.hyper.buffer_size}")
        for k, v in self._buf.items():
            v.zero_()
            v[:n] = buf[k]
        self._size = n
        self._ptr = int(state["ptr"])
        self._sigma = float(state["sigma"])
        self._prev_loss = None if state["prev_loss"] is None else float(state["prev_loss"])
        self._state = state["state"].clone().to(torch.float32)
        pending = state["pending"]
        self._pending = None if pending is None else (pending[0].clone(), pending[1].clone())
