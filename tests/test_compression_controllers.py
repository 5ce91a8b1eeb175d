"""SplitCom threshold controllers: fixed, bang-bang and DDPG."""

from __future__ import annotations

import io

import pytest
import torch

from fedtune.compression.controllers import (
    CONTROLLERS,
    ControllerSettings,
    SessionObservation,
    ThresholdController,
    make_controller,
)
from fedtune.errors import ConfigError


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def toy_obs(theta: float, cfg: ControllerSettings, step: int, total: int) -> SessionObservation:
    """Uploads grow linearly with theta over [theta_min, theta_max]; the loss barely moves."""
    ratio = (theta - cfg.theta_min) / (cfg.theta_max - cfg.theta_min)
    return SessionObservation(train_loss=2.0 - 0.1 * ratio, upload_ratio=ratio,
                              bytes_sent=int(1000 * ratio), bytes_full=1000, progress=step / total)


def drive(ctrl: ThresholdController, cfg: ControllerSettings, start: int, stop: int, total: int) -> list[float]:
    thetas = []
    for step in range(start, stop):
        theta = ctrl.start_session()
        thetas.append(theta)
        ctrl.end_session(toy_obs(theta, cfg, step, total))
    return thetas


def test_registry_names_and_unknown():
    assert {"fixed", "bangbang", "ddpg"} <= set(CONTROLLERS.names())
    with pytest.raises(ConfigError, match="bangbang"):
        make_controller(ControllerSettings(name="nope"), seed=0)


def test_fixed_is_constant():
    cfg = ControllerSettings(name="fixed", theta=0.995)
    ctrl = make_controller(cfg, seed=0)
    for i in range(5):
        assert ctrl.start_session() == 0.995
        ctrl.end_session(SessionObservation(1.0 + i, 0.5, 10, 20, i / 5))
        ctrl.observe_eval(10.0 * (i + 1))
    assert ctrl.theta == 0.995
    again = make_controller(cfg, seed=1)
    again.load_state_dict(roundtrip(ctrl.state_dict()))
    assert again.theta == 0.995


def test_bangbang_switches_on_ppl_rise_and_back():
    cfg = ControllerSettings(name="bangbang", theta_low=0.99, theta_high=0.9999, tolerance=0.01)
    ctrl = make_controller(cfg, seed=0)
    assert ctrl.start_session() == 0.99
    ctrl.observe_eval(100.0)  # first eval only records
    assert ctrl.theta == 0.99
    ctrl.observe_eval(100.5)  # +0.5 %: within tolerance
    assert ctrl.theta == 0.99
    ctrl.observe_eval(102.0)  # +1.5 %: strict
    assert ctrl.start_session() == 0.9999
    resumed = make_controller(cfg, seed=0)
    resumed.load_state_dict(roundtrip(ctrl.state_dict()))
    for c in (ctrl, resumed):
        c.observe_eval(101.0)  # fell: lax again
        assert c.theta == 0.99
        c.observe_eval(float("nan"))  # diverged: strict
        assert c.theta == 0.9999


def test_ddpg_actions_in_range_and_learns_low_bytes():
    cfg = ControllerSettings(name="ddpg", theta_min=0.9, theta_max=1.0, lam=10.0, sigma=0.3,
                             actor_lr=3e-3, critic_lr=3e-3, batch_size=8, updates_per_session=4)
    ctrl = make_controller(cfg, seed=3)
    total = 80
    thetas = drive(ctrl, cfg, 0, total, total)
    assert all(cfg.theta_min <= t <= cfg.theta_max for t in thetas)
    first, last = sum(thetas[:10]) / 10, sum(thetas[-10:]) / 10
    assert last < first - 0.02, (first, last)
    assert last < 0.95  # most of the (log-scaled) range lies above this


def test_ddpg_resume_is_bit_identical():
    cfg = ControllerSettings(name="ddpg", buffer_size=16, batch_size=4, updates_per_session=2)
    total = 30
    straight = make_controller(cfg, seed=7)
    expected = drive(straight, cfg, 0, total, total)

    first = make_controller(cfg, seed=7)
    head = drive(first, cfg, 0, 20, total)  # the buffer has wrapped around by now
    theta = first.start_session()  # checkpoint mid-session too
    resumed = make_controller(cfg, seed=99)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    assert resumed.theta == theta
    resumed.end_session(toy_obs(theta, cfg, 20, total))
    tail = drive(resumed, cfg, 21, total, total)
    assert head + [theta] + tail == expected


def test_ddpg_seeded_and_global_rng_untouched():
    cfg = ControllerSettings(name="ddpg", batch_size=2)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    a = make_controller(cfg, seed=5)
    run_a = drive(a, cfg, 0, 6, 6)
    a.observe_eval(12.0)
    a.load_state_dict(roundtrip(a.state_dict()))
    assert torch.equal(torch.get_rng_state(), before)
    b = make_controller(cfg, seed=5)
    assert drive(b, cfg, 0, 6, 6) == run_a
    c = make_controller(cfg, seed=6)
    assert drive(c, cfg, 0, 6, 6) != run_a
    assert torch.equal(torch.get_rng_state(), before)


def test_ddpg_end_without_start_fails():
    ctrl = make_controller(ControllerSettings(name="ddpg"), seed=0)
    with pytest.raises(RuntimeError):
        ctrl.end_session(SessionObservation(1.0, 1.0, 1, 1, 0.0))
