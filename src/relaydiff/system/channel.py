"""Wireless link model: path loss, Rayleigh fading, thermal noise and Shannon rate.

The downlink is one carrier of ``bandwidth_hz`` shared by the admitted users in fractions b_i;
the base station transmits at a constant power spectral density, so a user's SNR (and hence
spectral efficiency r_i = log2(1 + SNR_i), bit/s/Hz) does not depend on its share, and its rate
is b_i * B * r_i. Path loss follows the 3GPP macro-cell model of TR 36.814 (Table A.2.1.1.2-3):
PL(dB) = 128.1 + 37.6 log10(d / 1 km); fading power |h|^2 ~ Exp(1) (Rayleigh); thermal noise
-174 dBm/Hz plus the receiver's noise figure.
"""

from __future__ import annotations

import numpy as np

THERMAL_NOISE_DBM_HZ = -174.0


def path_loss_db(distance_m: np.ndarray, pl_1km_db: float = 128.1, exponent: float = 3.76) -> np.ndarray:
    """Macro-cell path loss in dB at ``distance_m`` meters."""
    d_km = np.maximum(np.asarray(distance_m, dtype=float), 1.0) / 1000.0
    return pl_1km_db + 10.0 * exponent * np.log10(d_km)


def snr_linear(
    distance_m: np.ndarray,
    fading_power: np.ndarray,
    tx_power_dbm: float,
    bandwidth_hz: float,
    noise_figure_db: float,
    pl_1km_db: float = 128.1,
    exponent: float = 3.76,
) -> np.ndarray:
    """Received SNR (linear) over ``bandwidth_hz`` for a transmitter of ``tx_power_dbm``."""
    noise_dbm = THERMAL_NOISE_DBM_HZ + noise_figure_db + 10.0 * np.log10(bandwidth_hz)
    rx_dbm = tx_power_dbm - path_loss_db(distance_m, pl_1km_db, exponent)
    return np.asarray(fading_power, dtype=float) * 10.0 ** ((rx_dbm - noise_dbm) / 10.0)


def spectral_efficiency(snr: np.ndarray) -> np.ndarray:
    """Shannon spectral efficiency log2(1 + SNR) in bit/s/Hz."""
    return np.log2(1.0 + np.asarray(snr, dtype=float))


def rayleigh_power(rng: np.random.Generator, size: int) -> np.ndarray:
    """Fading power gains |h|^2 of a unit-mean Rayleigh channel."""
    return rng.exponential(1.0, size=size)


def transfer_time_s(payload_bytes: float, share: np.ndarray, bandwidth_hz: float, spectral_eff: np.ndarray) -> np.ndarray:
    """Seconds to send ``payload_bytes`` at rate share * B * r (inf where the share is 0)."""
    rate = np.asarray(share, dtype=float) * bandwidth_hz * np.asarray(spectral_eff, dtype=float)
    with np.errstate(divide="ignore"):
        return np.where(rate > 0, 8.0 * payload_bytes / np.where(rate > 0, rate, 1.0), np.inf)
