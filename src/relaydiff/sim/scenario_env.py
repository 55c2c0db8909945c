"""A multi-round scenario: arrivals, fluctuating edge capacity and fading, round after round.

A fixed population of users is drawn once from a scenario (devices, distances, preferences,
personalization: :func:`relaydiff.system.problem.sample_instance`). Every round:

- arrivals: n_t ~ Poisson(mean (1 + amp sin(2 pi t / period))) (mean: the scenario's n_users
  unless set), clipped to [1, min(population,
  n_max)], users drawn without replacement; each request has a fresh prompt complexity;
- fading: each user's downlink and uplink gains follow a Gauss-Markov process
  h_t = rho h_{t-1} + sqrt(1 - rho^2) w_t (w complex Gaussian, unit power), so |h|^2 stays
  Exp(1) (Rayleigh) with correlation rho^2 between rounds; SNR and Shannon rate come from
  :mod:`relaydiff.system.channel` with the scenario's link budget;
- capacity: the compute share follows c_t = mean + phi (c_{t-1} - mean) + sigma eps_t, clipped
  to the scenario's ``edge.capacity`` range.

The round to decide is a :class:`relaydiff.system.problem.RoundInstance` (``env.instance``), so
any solver can decide it; the action is the option index (0 = local, o = o-th split) of each of the
``n_max`` slots (slots past n_t are ignored). The edge serves at most M users: admissions past M
(in slot order) run locally and are counted in ``info["rejected"]``. Reward = the round objective
(sum of user utilities, :func:`relaydiff.system.problem.evaluate`). Dynamics do not depend on the
actions, so every policy sees the same rounds for the same seed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from relaydiff.system import channel
from relaydiff.system.problem import Decision, RoundInstance, evaluate, sample_instance
from relaydiff.system.quality import load_quality
from relaydiff.system.scenario import Scenario, load_scenario

USER_FEATURES = 8  # present, w_q, w_l, w_e, log2 spectral eff., device step (s), complexity, personalization


@dataclass(frozen=True)
class Dynamics:
    """Round-to-round processes of a simulation (defaults: a busy cell over 60 rounds)."""

    rounds: int = 60
    population: int = 200
    arrival_mean: float | None = None  # requests per round on average (None: the scenario's n_users)
    arrival_amplitude: float = 0.5  # relative swing of the arrival rate
    arrival_period: int = 30  # rounds per swing
    fading_corr: float = 0.9  # rho of the Gauss-Markov fading between rounds
    capacity_corr: float = 0.8  # phi of the compute-share AR(1)
    capacity_noise: float = 0.1  # sigma of the compute-share AR(1)
    n_max: int = 64  # largest round the env takes (observation/action slots)

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.population < 1 or self.n_max < 1 or self.arrival_period < 1:
            raise ValueError("Dynamics: rounds, population, n_max and arrival_period must be >= 1")
        if (self.arrival_mean is not None and self.arrival_mean <= 0) or not 0 <= self.arrival_amplitude <= 1:
            raise ValueError(f"Dynamics: need arrival_mean > 0 and arrival_amplitude in [0, 1], got {self.arrival_mean}, {self.arrival_amplitude}")
        if not 0 <= self.fading_corr < 1 or not 0 <= self.capacity_corr < 1 or self.capacity_noise < 0:
            raise ValueError("Dynamics: fading_corr and capacity_corr must be in [0, 1), capacity_noise >= 0")


class ScenarioEnv(gym.Env):
    """Gymnasium env of a multi-round scenario; one step = one round decided for all its users."""

    metadata = {"render_modes": []}

    def __init__(self, scenario: Scenario | str | Path = "default", dynamics: Dynamics | None = None) -> None:
        self.scenario = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
        self.dynamics = dynamics or Dynamics()
        self.quality_model = load_quality(self.scenario.quality.table)
        d, p = self.dynamics, len(self.scenario.splits)
        self.observation_space = gym.spaces.Dict({
            # log2 of the spectral efficiency is the only negative feature (>= log2(0.01))
            "users": gym.spaces.Box(-10.0, 1e3, shape=(d.n_max, USER_FEATURES), dtype=np.float32),
            "edge": gym.spaces.Box(0.0, float(d.n_max), shape=(2,), dtype=np.float32),  # capacity c, n_t / M
        })
        self.action_space = gym.spaces.MultiDiscrete(np.full(d.n_max, p + 1))
        self.population: RoundInstance | None = None
        self.instance: RoundInstance | None = None

    # ---- processes ---------------------------------------------------------------------------
    def _fading(self) -> tuple[np.ndarray, np.ndarray]:
        return np.abs(self._h_dl) ** 2, np.abs(self._h_ul) ** 2

    def _evolve(self) -> None:
        rng, rho = self.np_random, self.dynamics.fading_corr
        u = self.dynamics.population
        for name in ("_h_dl", "_h_ul"):
            w = (rng.standard_normal(u) + 1j * rng.standard_normal(u)) / np.sqrt(2.0)
            setattr(self, name, rho * getattr(self, name) + np.sqrt(1.0 - rho**2) * w)
        lo, hi = self.scenario.edge.capacity
        mean, phi = 0.5 * (lo + hi), self.dynamics.capacity_corr
        self._c = float(np.clip(mean + phi * (self._c - mean) + self.dynamics.capacity_noise * rng.standard_normal(), lo, hi))

    def _round(self) -> RoundInstance:
        """Draw this round's requests and build their instance from the current channel and capacity."""
        d, rng, sc = self.dynamics, self.np_random, self.scenario
        mean = sc.n_users if d.arrival_mean is None else d.arrival_mean
        rate = mean * (1.0 + d.arrival_amplitude * np.sin(2.0 * np.pi * self.t / d.arrival_period))
        n = int(np.clip(rng.poisson(rate), 1, min(d.population, d.n_max)))
        users = np.sort(rng.choice(d.population, size=n, replace=False))
        pop = self.population
        w = sc.wireless
        dist = np.asarray(pop.meta["distance_m"])[users]
        f_dl, f_ul = (f[users] for f in self._fading())
        snr_dl = channel.snr_linear(dist, f_dl, w.bs_tx_power_dbm, w.bandwidth_hz, w.bs_noise_figure_db, w.path_loss_1km_db, w.path_loss_exponent)
        snr_ul = channel.snr_linear(dist, f_ul, w.ue_tx_power_dbm, w.uplink_bandwidth_hz, w.ue_noise_figure_db, w.path_loss_1km_db, w.path_loss_exponent)
        r_dl = np.maximum(channel.spectral_efficiency(snr_dl), 1e-2)  # same floor as sample_instance
        r_ul = np.maximum(channel.spectral_efficiency(snr_ul), 1e-2)
        cx = rng.uniform(*sc.preferences.complexity, size=n)
        rho = np.asarray(pop.meta["personalization"])[users]
        base = pop.subset(users)
        meta = dict(base.meta, round=self.t, users=users.tolist(), complexity=cx.tolist(),
                    distance_m=dist.tolist(), personalization=rho.tolist())
        return dataclasses.replace(
            base, capacity=self._c, spectral_eff=r_dl, uplink_s=8.0 * sc.payload.prompt_bytes / (w.uplink_bandwidth_hz * r_ul),
            quality=self.quality_model.table(sc.steps, cx, rho), meta=meta,
        )

    # ---- gymnasium API --------------------------------------------------------------------------
    def _obs(self) -> dict[str, np.ndarray]:
        inst, n_max = self.instance, self.dynamics.n_max
        users = np.zeros((n_max, USER_FEATURES), dtype=np.float32)
        n = inst.n_users
        users[:n, 0] = 1.0
        users[:n, 1] = inst.w_quality
        users[:n, 2] = inst.w_latency
        users[:n, 3] = inst.w_energy
        users[:n, 4] = np.log2(inst.spectral_eff)
        users[:n, 5] = inst.device_step_s
        users[:n, 6] = inst.meta["complexity"]
        users[:n, 7] = inst.meta["personalization"]
        edge = np.array([inst.capacity, n / inst.max_batch], dtype=np.float32)
        return {"users": users, "edge": edge}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        u = self.dynamics.population
        self.population = sample_instance(self.scenario, n_users=u, seed=self.np_random, quality_model=self.quality_model)
        # the population's own Rayleigh draws are replaced by the fading processes below
        self._h_dl = (self.np_random.standard_normal(u) + 1j * self.np_random.standard_normal(u)) / np.sqrt(2.0)
        self._h_ul = (self.np_random.standard_normal(u) + 1j * self.np_random.standard_normal(u)) / np.sqrt(2.0)
        lo, hi = self.scenario.edge.capacity
        self._c = float(self.np_random.uniform(lo, hi))
        self.t = 0
        self.instance = self._round()
        return self._obs(), {"round": self.t, "n_users": self.instance.n_users}

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        if self.instance is None:
            raise RuntimeError("call reset() before step()")
        if self.t >= self.dynamics.rounds:
            raise RuntimeError("scenario is over; call reset()")
        inst = self.instance
        a = np.asarray(action, dtype=np.int64).reshape(-1)
        if a.shape[0] < inst.n_users:
            raise ValueError(f"action needs at least {inst.n_users} entries (one per user this round), got {a.shape[0]}")
        a = a[: inst.n_users].copy()
        if np.any(a < 0) or np.any(a > len(inst.splits)):
            raise ValueError(f"action entries must be option indices in 0..{len(inst.splits)}")
        over = np.flatnonzero(a > 0)[inst.max_batch :]
        a[over] = 0  # the edge refuses requests past its memory limit; they run locally
        k = inst.options[a]
        obj, br = evaluate(inst, Decision(k))
        info = {"round": self.t, "k": k, "objective": obj, "rejected": int(over.size), "summary": br.summary()}
        self.t += 1
        terminated = self.t >= self.dynamics.rounds
        if not terminated:
            self._evolve()
            self.instance = self._round()
        return self._obs(), float(obj), terminated, False, info
