"""The wireless channel: path loss, block fading redrawn each round, Shannon rates up and down.

Uplink (FDMA): client k gets a share ``b_k`` of the band ``B`` and transmits at power ``p_k``;
``R_k = b_k B log2(1 + p_k g_k / (b_k B N0))`` with channel gain ``g_k = 10^(-PL(d_k)/10) |h_k|^2``,
path loss ``PL(d) = PL(d_ref) + 10 n log10(d / d_ref)`` dB and fading ``|h_k|^2`` drawn per round.
Downlink: the server broadcasts over the whole band at its power; a broadcast is received by every client
only at the rate of the worst receiver among the round's clients.

Every draw comes from a generator derived from (seed, purpose, round), so a resumed run sees the channels an
uninterrupted run saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.optimize import brentq
from scipy.special import lambertw

from fedtune.core.registry import Registry
from fedtune.core.seeding import numpy_rng

LN2 = float(np.log(2.0))

#: Small-scale fading: ``(rng, n) -> |h|^2`` for n clients (mean 1).
Fading = Callable[[np.random.Generator, int], np.ndarray]
FADING: Registry[Fading] = Registry("fading model")


@FADING.register("rayleigh")
def _rayleigh(rng: np.random.Generator, n: int) -> np.ndarray:
    """Rayleigh block fading: ``h ~ CN(0, 1)``, so the power gain ``|h|^2 ~ Exp(1)``."""
    return rng.exponential(1.0, size=n)


@FADING.register("none")
def _no_fading(rng: np.random.Generator, n: int) -> np.ndarray:
    """Path loss only: ``|h|^2 = 1``."""
    return np.ones(n)


def dbm_to_w(dbm: float) -> float:
    return 10.0 ** (dbm / 10.0) / 1000.0


def path_loss_db(distance_m: np.ndarray, ref_db: float, ref_distance_m: float, exponent: float) -> np.ndarray:
    """Log-distance path loss in dB (e.g. 3GPP urban macro: 128.1 + 37.6 log10(d / 1 km))."""
    return ref_db + 10.0 * exponent * np.log10(np.asarray(distance_m, float) / ref_distance_m)


def uplink_rate(share: np.ndarray, bandwidth_hz: float, snr: np.ndarray) -> np.ndarray:
    """Shannon rate (bit/s) of shares ``b`` of the band; ``snr = p g / (B N0)`` is the SNR over the whole band.

    ``R = b B log2(1 + snr / b)``, which is ``b B log2(1 + p g / (b B N0))``; 0 for a zero share.
    """
    share = np.asarray(share, float)
    snr = np.broadcast_to(np.asarray(snr, float), share.shape)
    safe = np.where(share > 0, share, 1.0)
    return np.where(share > 0, safe * bandwidth_hz * np.log1p(snr / safe) / LN2, 0.0)


def share_for_rate(rate_bps: np.ndarray, bandwidth_hz: float, snr: np.ndarray) -> np.ndarray:
    """The smallest share ``b`` with ``uplink_rate(b) = rate`` (inverse of :func:`uplink_rate`).

    The rate is increasing and concave in ``b`` and tends to ``B snr / ln 2`` as ``b`` grows; rates at or above
    that limit get ``inf``. Closed form via the Lambert W function's lower branch, with ``brentq`` where it
    loses precision (SNR per share far below 0 dB).
    """
    rate = np.asarray(rate_bps, float)
    snr = np.broadcast_to(np.asarray(snr, float), rate.shape).copy()
    q = rate * LN2 / (bandwidth_hz * snr)  # b ln(1 + snr/b) = snr q; solvable iff q < 1
    out = np.full(rate.shape, np.inf)
    out[rate <= 0] = 0.0
    ok = (rate > 0) & (q < 1)
    if ok.any():
        qo = q[ok]
        w = -np.real(lambertw(-qo * np.exp(-qo), k=-1)) - qo  # w = ln(1 + snr/b)
        out[ok] = snr[ok] / np.expm1(w)
        got = uplink_rate(out, bandwidth_hz, snr)
        bad = ok & ~(np.abs(got - rate) <= 1e-10 * np.maximum(rate, 1e-300))
        for i in zip(*np.nonzero(bad)):
            f = lambda b, i=i: b * bandwidth_hz * np.log1p(snr[i] / b) / LN2 - rate[i]  # noqa: E731
            hi = 1.0
            while f(hi) < 0:
                hi *= 2.0
            out[i] = brentq(f, hi * 1e-300, hi, xtol=1e-300, rtol=1e-14)
    return out


def rate_slope(share: np.ndarray, bandwidth_hz: float, snr: np.ndarray) -> np.ndarray:
    """dR/db of :func:`uplink_rate` (positive, decreasing in b)."""
    share = np.asarray(share, float)
    return bandwidth_hz * (np.log1p(snr / share) - snr / (share + snr)) / LN2


@dataclass(frozen=True)
class ChannelState:
    """One round's channel for a list of clients."""

    clients: list[int]
    distance_m: np.ndarray
    gain: np.ndarray  # linear power gain g_k (path loss x fading)
    fading: np.ndarray  # |h_k|^2

    @property
    def gain_db(self) -> np.ndarray:
        return 10.0 * np.log10(self.gain)


class Channel:
    """Distances (fixed for the run) and per-round fading for ``num_clients`` clients; see the module doc."""

    def __init__(self, net, num_clients: int, seed: int) -> None:
        self.net = net
        self.seed = seed
        self.fading = FADING.get(net.fading)
        if net.distances_m:
            d = list(net.distances_m)
            self.distance_m = np.asarray(d * num_clients if len(d) == 1 else d, float)
        else:  # drawn once, uniformly over the area of an annulus (users spread evenly over a cell)
            rng = numpy_rng(seed, "network-distances")
            lo, hi = net.min_distance_m, net.max_distance_m
            self.distance_m = np.sqrt(rng.uniform(lo**2, hi**2, size=num_clients))
        self.noise_w_per_hz = dbm_to_w(net.noise_dbm_per_hz)
        self.path_gain = 10.0 ** (-path_loss_db(self.distance_m, net.path_loss_ref_db, net.path_loss_ref_m,
                                                  net.path_loss_exponent) / 10.0)

    def draw(self, round: int, clients: list[int]) -> ChannelState:
        """The channel of ``round`` for ``clients``: fading drawn for every client from (seed, round), then
        selected, so a client's channel does not depend on which others were sampled."""
        fading = self.fading(numpy_rng(self.seed, "network-fading", round), len(self.distance_m))
        idx = np.asarray(clients, int)
        return ChannelState(list(clients), self.distance_m[idx], self.path_gain[idx] * fading[idx], fading[idx])

    def snr(self, tx_power_w: np.ndarray, gain: np.ndarray) -> np.ndarray:
        """SNR over the whole band: ``p g / (B N0)``."""
        return np.asarray(tx_power_w, float) * gain / (self.net.bandwidth_hz * self.noise_w_per_hz)

    def downlink_rate(self, gain: np.ndarray) -> float:
        """Broadcast rate (bit/s): whole band, server power, the worst receiver's gain."""
        if len(gain) == 0:
            return float("inf")
        snr = self.net.server_tx_power_w * float(np.min(gain)) / (self.net.bandwidth_hz * self.noise_w_per_hz)
        return float(self.net.bandwidth_hz * np.log2(1.0 + snr))
