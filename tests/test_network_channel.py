"""The wireless channel: Shannon rate and its inverse, path loss, seeded fading, downlink, [network] config."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import TINY

from fedtune.config import load_config
from fedtune.core.errors import ConfigError
from fedtune.network.channel import Channel, dbm_to_w, path_loss_db, rate_slope, share_for_rate, uplink_rate


def test_rate_matches_hand_computation():
    # B = 10 MHz, share 1/4, p = 0.2 W, g = 1e-10, N0 = -174 dBm/Hz
    bandwidth, share, power, gain = 10e6, 0.25, 0.2, 1e-10
    n0 = 10 ** (-174 / 10) / 1000  # W/Hz
    assert dbm_to_w(-174) == pytest.approx(n0, rel=1e-12)
    by_hand = share * bandwidth * math.log2(1 + power * gain / (share * bandwidth * n0))
    assert by_hand == pytest.approx(27.43e6, rel=1e-3)  # 2.5 MHz x log2(1 + 2009.6)
    snr = power * gain / (bandwidth * n0)
    assert uplink_rate(np.array([share]), bandwidth, np.array([snr]))[0] == pytest.approx(by_hand, rel=1e-12)
    assert uplink_rate(np.array([0.0]), bandwidth, np.array([snr]))[0] == 0.0


@pytest.mark.parametrize("snr", [1e-4, 1e-2, 1.0, 30.0, 1e4, 1e8])
def test_rate_is_increasing_concave_and_inverted_exactly(snr):
    shares = np.linspace(1e-4, 1.0, 400)
    rates = uplink_rate(shares, 20e6, np.full_like(shares, snr))
    assert np.all(np.diff(rates) > 0)
    assert np.all(np.diff(rates, 2) < 1e-6 * rates.max())  # concave
    back = share_for_rate(rates, 20e6, np.full_like(shares, snr))
    np.testing.assert_allclose(uplink_rate(back, 20e6, snr), rates, rtol=1e-10)
    np.testing.assert_allclose(back, shares, rtol=1e-6)  # at -40 dB the rate hardly depends on the share
    # the slope is the derivative
    h = 1e-6 * shares
    numeric = (uplink_rate(shares + h, 20e6, snr) - uplink_rate(shares - h, 20e6, snr)) / (2 * h)
    np.testing.assert_allclose(rate_slope(shares, 20e6, snr), numeric, rtol=1e-4)


def test_rates_beyond_the_wideband_limit_have_no_share():
    snr = np.array([10.0])
    limit = 20e6 * snr / math.log(2)  # b B log2(1 + snr/b) -> B snr / ln 2 as b grows
    assert np.isinf(share_for_rate(limit * 1.01, 20e6, snr)[0])
    assert share_for_rate(np.array([0.0]), 20e6, snr)[0] == 0.0


def test_path_loss_is_the_3gpp_urban_macro_model_by_default():
    net = load_config(TINY, ["network.planner=equal"]).network
    pl = path_loss_db(np.array([1000.0, 100.0]), net.path_loss_ref_db, net.path_loss_ref_m, net.path_loss_exponent)
    np.testing.assert_allclose(pl, [128.1, 128.1 - 37.6])


def _channel(*overrides, clients=4, seed=0):
    cfg = load_config(TINY, ["network.planner=equal", f"federation.num_clients={clients}", *overrides])
    return Channel(cfg.network, clients, seed)


def test_fading_is_a_function_of_seed_and_round_only():
    a, b = _channel(), _channel()
    everyone = [0, 1, 2, 3]
    np.testing.assert_array_equal(a.draw(3, everyone).gain, b.draw(3, everyone).gain)
    b.draw(1, everyone)  # history does not matter
    np.testing.assert_array_equal(a.draw(5, everyone).gain, b.draw(5, everyone).gain)
    assert not np.array_equal(a.draw(1, everyone).gain, a.draw(2, everyone).gain)
    assert not np.array_equal(a.draw(1, everyone).gain, _channel(seed=1).draw(1, everyone).gain)
    # a client's channel does not depend on which others were sampled
    assert a.draw(2, [1, 3]).gain[1] == a.draw(2, everyone).gain[3]


def test_distances_are_drawn_once_in_the_ring_or_taken_from_config():
    ch = _channel(clients=50)
    assert np.all((ch.distance_m >= 50) & (ch.distance_m <= 500))
    np.testing.assert_array_equal(ch.distance_m, _channel(clients=50).distance_m)
    np.testing.assert_array_equal(ch.draw(1, [0]).distance_m, ch.draw(9, [0]).distance_m)
    fixed = _channel("network.distances_m=[100, 200, 300, 400]")
    np.testing.assert_array_equal(fixed.distance_m, [100, 200, 300, 400])
    np.testing.assert_array_equal(_channel("network.distances_m=[250]").distance_m, [250] * 4)


def test_rayleigh_power_gain_is_exponential_with_mean_one_and_none_is_path_loss_only():
    ch = _channel(clients=1)
    fading = np.array([ch.draw(r, [0]).fading[0] for r in range(1, 4001)])
    assert fading.mean() == pytest.approx(1.0, abs=0.06)
    assert np.mean(fading < 1.0) == pytest.approx(1 - math.exp(-1), abs=0.03)  # P(|h|^2 < 1) of Exp(1)
    flat = _channel("network.fading=none", "network.distances_m=[1000]")
    state = flat.draw(7, [0, 1])
    np.testing.assert_allclose(state.gain_db, [-128.1, -128.1])


def test_downlink_broadcast_runs_at_the_worst_receivers_rate():
    ch = _channel()
    net = ch.net
    gains = np.array([1e-9, 3e-12, 5e-11])
    worst = net.bandwidth_hz * math.log2(1 + net.server_tx_power_w * 3e-12
                                         / (net.bandwidth_hz * dbm_to_w(net.noise_dbm_per_hz)))
    assert ch.downlink_rate(gains) == pytest.approx(worst, rel=1e-12)


def test_setting_only_the_planner_gives_a_working_network():
    cfg = load_config(TINY, ["network.planner=jcpba"])
    assert cfg.network.enabled and not load_config(TINY).network.enabled
    assert cfg.network.fading == "rayleigh" and cfg.network.deadline_s is None


@pytest.mark.parametrize(
    "override, expected",
    [
        ("network.planner=fastest", ["unknown planner 'fastest'", "none", "jcpba", "equal", "bandwidth_only",
                                     "pruning_only", "uniform_pruning"]),
        ("network.fading=rician", ["unknown fading model 'rician'", "rayleigh", "none"]),
        ("network.distances_m=[10, 20]", ["network.distances_m has 2 entries", "num_clients = 3"]),
        ("network.distances_m=[-5]", ["must be > 0"]),
        ("network.min_distance_m=600", ["min_distance_m (600.0) must be below", "max_distance_m (500.0)"]),
        ("network.rho_max=0.95", ["network.rho_max", "less than or equal to 0.9"]),
        ("network.deadline_s=0", ["network.deadline_s", "greater than 0"]),
        ("network.bandwidth=1", ["unknown key 'network.bandwidth'", "bandwidth_hz"]),
    ],
)
def test_bad_network_settings_name_the_key_and_what_is_allowed(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["network.planner=jcpba", override])
    for text in expected:
        assert text in str(err.value), (text, str(err.value))
