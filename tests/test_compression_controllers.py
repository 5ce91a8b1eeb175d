"""SplitCom threshold controllers: fixed, bang-bang, DDPG and budget."""

from __future__ import annotations

import io

import pytest
import torch

from fedtune.compression.controllers import (
    CONTROLLERS,
    BangBangSettings,
    DDPGController,
    DDPGHyper,
    DDPGSettings,
    SessionObservation,
    ThresholdController,
    make_controller,
)
from fedtune.core.errors import ConfigError


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def toy_obs(theta: float, cfg: DDPGSettings, step: int, total: int) -> SessionObservation:
    """Uploads grow linearly with theta over [theta_min, theta_max]; the loss barely moves."""
    ratio = (theta - cfg.theta_min) / (cfg.theta_max - cfg.theta_min)
    return SessionObservation(train_loss=2.0 - 0.1 * ratio, upload_ratio=ratio,
                              bytes_sent=int(1000 * ratio), bytes_full=1000, progress=step / total)


def drive(ctrl: ThresholdController, cfg: DDPGSettings, start: int, stop: int, total: int) -> list[float]:
    thetas = []
    for step in range(start, stop):
        theta = ctrl.start_session()
        thetas.append(theta)
        ctrl.end_session(toy_obs(theta, cfg, step, total))
    return thetas


def test_registry_names_and_unknown():
    assert {"fixed", "bangbang", "ddpg"} <= set(CONTROLLERS.names())
    with pytest.raises(ConfigError, match="bangbang"):
        make_controller("nope", 0.999, seed=0)


def test_fixed_is_constant():
    ctrl = make_controller("fixed", 0.995, seed=0)
    for i in range(5):
        assert ctrl.start_session() == 0.995
        ctrl.end_session(SessionObservation(1.0 + i, 0.5, 10, 20, i / 5))
        ctrl.observe_eval(10.0 * (i + 1))
    assert ctrl.theta == 0.995
    again = make_controller("fixed", 0.999, seed=1)
    again.load_state_dict(roundtrip(ctrl.state_dict()))
    assert again.theta == 0.995


def test_bangbang_switches_on_ppl_rise_and_back():
    cfg = BangBangSettings(theta_low=0.99, theta_high=0.9999, tolerance=0.01)
    ctrl = make_controller("bangbang", 0.999, seed=0, settings=cfg)
    assert ctrl.start_session() == 0.99
    ctrl.observe_eval(100.0)  # first eval only records
    assert ctrl.theta == 0.99
    ctrl.observe_eval(100.5)  # +0.5 %: within tolerance
    assert ctrl.theta == 0.99
    ctrl.observe_eval(102.0)  # +1.5 %: strict
    assert ctrl.start_session() == 0.9999
    resumed = make_controller("bangbang", 0.999, seed=0, settings=cfg)
    resumed.load_state_dict(roundtrip(ctrl.state_dict()))
    for c in (ctrl, resumed):
        c.observe_eval(101.0)  # fell: lax again
        assert c.theta == 0.99
        c.observe_eval(float("nan"))  # diverged: strict
        assert c.theta == 0.9999


def test_ddpg_actions_in_range_and_learns_low_bytes():
    cfg = DDPGSettings(theta_min=0.9, theta_max=1.0, ddpg_lambda=10.0, ddpg_sigma=0.3)
    ctrl = DDPGController(0.999, cfg, seed=3, hyper=DDPGHyper(actor_lr=3e-3, critic_lr=3e-3, batch_size=8,
                                                             updates_per_session=4))
    total = 80
    thetas = drive(ctrl, cfg, 0, total, total)
    assert all(cfg.theta_min <= t <= cfg.theta_max for t in thetas)
    first, last = sum(thetas[:10]) / 10, sum(thetas[-10:]) / 10
    assert last < first - 0.02, (first, last)
    assert last < 0.95  # most of the (log-scaled) range lies above this


def test_ddpg_resume_is_bit_identical():
    cfg, hyper = DDPGSettings(), DDPGHyper(buffer_size=16, batch_size=4, updates_per_session=2)
    total = 30
    straight = DDPGController(0.999, cfg, seed=7, hyper=hyper)
    expected = drive(straight, cfg, 0, total, total)

    first = DDPGController(0.999, cfg, seed=7, hyper=hyper)
    head = drive(first, cfg, 0, 20, total)  # the buffer has wrapped around by now
    theta = first.start_session()  # checkpoint mid-session too
    resumed = DDPGController(0.999, cfg, seed=99, hyper=hyper)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    assert resumed.theta == theta
    resumed.end_session(toy_obs(theta, cfg, 20, total))
    tail = drive(resumed, cfg, 21, total, total)
    assert head + [theta] + tail == expected


def test_ddpg_seeded_and_global_rng_untouched():
    cfg, hyper = DDPGSettings(), DDPGHyper(batch_size=2)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    a = DDPGController(0.999, cfg, seed=5, hyper=hyper)
    run_a = drive(a, cfg, 0, 6, 6)
    a.observe_eval(12.0)
    a.load_state_dict(roundtrip(a.state_dict()))
    assert torch.equal(torch.get_rng_state(), before)
    b = DDPGController(0.999, cfg, seed=5, hyper=hyper)
    assert drive(b, cfg, 0, 6, 6) == run_a
    c = DDPGController(0.999, cfg, seed=6, hyper=hyper)
    assert drive(c, cfg, 0, 6, 6) != run_a
    assert torch.equal(torch.get_rng_state(), before)


def test_ddpg_end_without_start_fails():
    ctrl = make_controller("ddpg", 0.999, seed=0)
    with pytest.raises(RuntimeError):
        ctrl.end_session(SessionObservation(1.0, 1.0, 1, 1, 0.0))


def test_controller_settings_are_validated_by_their_controller(tiny_config):
    """Each controller's keys live in [compression], validated by the controller's own table."""
    cfg = tiny_config("paradigm=split", "compression.method=splitcom", "compression.controller=ddpg",
                      "compression.ddpg_sigma=0.2")
    assert cfg.compression.controller_settings() == DDPGSettings(ddpg_sigma=0.2)
    assert cfg.compression.model_dump()["theta_low"] == BangBangSettings().theta_low  # every default is dumped
    with pytest.raises(ConfigError, match=r"compression.theta_min \(0.9\) must be below compression.theta_max"):
        tiny_config("compression.theta_min=0.9", "compression.theta_max=0.8")
    with pytest.raises(ConfigError, match=r"compression.ddpg_sigma: Input should be greater than or equal to 0"):
        tiny_config("compression.ddpg_sigma=-1")
    with pytest.raises(ConfigError, match=r"unknown key 'compression.sigma'; valid keys in \[compression\]: method, "
                                          r".*theta_low, theta_high, tolerance, .*theta_min"):
        tiny_config("compression.sigma=0.2")


def test_budget_controller_settles_at_the_byte_share_it_is_given():
    """A toy interface whose byte share after the first epoch is proportional to log10 of 1 - theta's inverse:
    the controller ends within a few per cent of the budget, from either side, and ignores an all-new session."""
    import math

    from fedtune.compression.budget import BudgetSettings

    def share(theta: float) -> float:  # stricter (theta nearer 1) sends more: 0.2 % at 0.99, 2 % at 0.9999999
        return 0.002 * 10 ** ((-math.log10(1 - theta) - 2) / 5)

    for start in (0.99, 0.9999999):
        ctrl = make_controller("budget", start, seed=0, settings=BudgetSettings(byte_budget=0.005))
        ctrl.end_session(SessionObservation(2.0, 1.0, 1000, 1000, 0.0))  # the first epoch: everything new
        assert ctrl.theta == start
        for step in range(40):
            theta = ctrl.start_session()
            ctrl.end_session(SessionObservation(2.0, 0.1, int(share(theta) * 1e6), 1_000_000, step / 40))
        assert share(ctrl.theta) == pytest.approx(0.005, rel=0.05)
        resumed = make_controller("budget", start, seed=0, settings=BudgetSettings(byte_budget=0.005))
        resumed.load_state_dict(roundtrip(ctrl.state_dict()))
        assert resumed.theta == ctrl.theta
