"""The water-filling optimum: the closed-form reference of the power-allocation check task.

Maximize sum_i log2(1 + g_i p_i / N0) over p_i >= 0, sum_i p_i = P. The KKT conditions give
p_i = max(0, mu - N0 / g_i) with the water level mu set so that the powers sum to P (Boyd and
Vandenberghe, Convex Optimization, example 5.2). GDMOPT (HongyangDu/GDMOPT) scores its diffusion
actor on this task; relaydiff uses it to check that both RL actors reach the optimum before their
QoE numbers are trusted.
"""

from __future__ import annotations

import numpy as np


def water_filling(gains: np.ndarray, total_power: float, noise: float = 1.0) -> np.ndarray:
    """Optimal powers p_i = max(0, mu - noise / g_i), sum p_i = total_power, exact in O(n log n)."""
    g = np.asarray(gains, dtype=float)
    if g.ndim != 1 or g.size == 0:
        raise ValueError(f"gains must be a non-empty 1-D array, got shape {g.shape}")
    if np.any(g <= 0) or not np.all(np.isfinite(g)):
        raise ValueError("gains must be finite and > 0")
    if total_power <= 0 or noise <= 0:
        raise ValueError("total_power and noise must be > 0")
    floor = noise / g  # the "bottom of the vessel" under each channel
    order = np.argsort(floor)
    f = floor[order]
    # With the m best channels active, mu = (P + sum of their floors) / m; take the largest m
    # whose worst active channel still sits below the water level.
    m = np.arange(1, g.size + 1)
    mu = (total_power + np.cumsum(f)) / m
    active = int(np.max(np.flatnonzero(mu > f))) + 1
    return np.maximum(0.0, mu[active - 1] - floor)


def sum_rate(gains: np.ndarray, powers: np.ndarray, noise: float = 1.0) -> float:
    """Sum capacity sum_i log2(1 + g_i p_i / noise) in bit/s/Hz."""
    return float(np.sum(np.log2(1.0 + np.asarray(gains, dtype=float) * np.asarray(powers, dtype=float) / noise)))


__all__ = ["sum_rate", "water_filling"]
