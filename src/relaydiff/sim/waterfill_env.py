"""GDMOPT's check task as a Gymnasium env: split a power budget over fading channels.

Each episode is one step (a fresh draw of channel gains, like GDMOPT's toy task): the observation
is the gains g_i = |N(mean_i, std_i)|^2 (per-channel mean and std drawn once per env from its
seed), the action a in [-1, 1]^n maps to powers p = P (a + 1) / sum(a + 1) (all -1: equal split),
and the reward is the sum rate sum_i log2(1 + g_i p_i) (noise 1). ``info`` carries the water-filling
optimum (:func:`relaydiff.system.waterfill.water_filling`) and the ratio to it.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from relaydiff.system.waterfill import sum_rate, water_filling


def powers_from_action(action: np.ndarray, total_power: float) -> np.ndarray:
    """p = P (a + 1) / sum(a + 1), the equal split when every entry is -1."""
    w = np.clip(np.asarray(action, dtype=float), -1.0, 1.0) + 1.0
    s = w.sum()
    return np.full(w.shape, total_power / w.size) if s <= 1e-12 else total_power * w / s


MAX_GAIN = 100.0  # gains are clipped here (a draw above it is ~10 std out for the default layouts)


class WaterFillingEnv(gym.Env):
    """One-step power allocation over ``n_channels`` channels; reward = sum rate (bit/s/Hz)."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, n_channels: int = 5, total_power: float = 3.0, seed: int = 0) -> None:
        if n_channels < 2:
            raise ValueError(f"n_channels must be >= 2, got {n_channels}")
        if total_power <= 0:
            raise ValueError(f"total_power must be > 0, got {total_power}")
        self.n_channels, self.total_power = int(n_channels), float(total_power)
        layout = np.random.default_rng(seed)  # the channels' statistics, fixed for this env
        self.gain_mean = layout.uniform(0.3, 1.2, n_channels)
        self.gain_std = layout.uniform(0.2, 0.6, n_channels)
        self.observation_space = gym.spaces.Box(0.0, MAX_GAIN, shape=(n_channels,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(n_channels,), dtype=np.float32)
        self._gains = np.ones(n_channels)

    def _draw(self) -> np.ndarray:
        g = np.abs(self.np_random.normal(self.gain_mean, self.gain_std)) ** 2
        return np.clip(g, 1e-4, MAX_GAIN)  # a gain of exactly 0 has no water-filling floor

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._gains = self._draw()
        return self._gains.astype(np.float32), {}

    def optimum(self) -> float:
        """The water-filling sum rate of the current draw."""
        return sum_rate(self._gains, water_filling(self._gains, self.total_power))

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        rate = sum_rate(self._gains, powers_from_action(action, self.total_power))
        best = self.optimum()
        info = {"optimum": best, "ratio_to_optimum": rate / best}
        obs = self._gains.astype(np.float32)
        return obs, float(rate), True, False, info


__all__ = ["WaterFillingEnv", "powers_from_action"]
