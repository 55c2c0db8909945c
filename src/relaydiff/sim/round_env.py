"""The one-round offloading problem as a sequential-decision MDP (one user decided per step).

Users are visited in descending order of their *solo gain* (the best objective change they could
bring on an empty edge); at each step the agent picks the current user's option (0 = local, o = the
o-th split point). The observation has a fixed size that depends on the number of split points
P but not on N, so one policy serves any number of users:

- the user: preference weights, the exact marginal gain of each option given the decisions so far
  (:class:`relaydiff.sim.sequential.RoundState`), and its solo gains;
- the look-ahead: the interaction and bandwidth cost each option would impose on the users that
  come next and could still fit on the edge (assuming each takes its solo-best split), how many
  later users are better than this one, and how many could still gain at all;
- the edge: occupancy n / M at every split point, capacity left, compute share c, and the
  interaction cost scale beta' T lam_i M.

Reward = the exact change of the objective, so an episode's return is objective - objective(all
local). Actions that break capacity are invalid, and actions whose gain is already negative are
dominated by local (costs only grow as users are added) — both are masked (``action_masks``).
Users with a single valid action (edge full, or nothing to gain) are skipped without a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np

from relaydiff.sim.sequential import RoundState
from relaydiff.system.problem import RoundInstance, sample_instance
from relaydiff.system.scenario import Scenario, load_scenario

OBS_CLIP = 10.0


def obs_size(n_splits: int) -> int:
    """Length of the observation vector for P = ``n_splits`` split points."""
    return 4 * n_splits + 10


class SequentialRound:
    """One round visited user by user: the observation builder shared by the env and the solver."""

    def __init__(self, instance: RoundInstance, dominated: bool = True) -> None:
        self.instance = instance
        self.state = RoundState(instance)
        self.dominated = dominated
        st = self.state
        self.n_splits = len(instance.splits)
        self.max_batch = int(instance.max_batch)
        solo = st.solo_gain
        self.solo_best = solo.max(axis=1)
        order = np.argsort(-self.solo_best, kind="stable")
        self.order = order[self.solo_best[order] > 0.0]  # users with nothing to gain stay local
        self._solo_sorted = self.solo_best[self.order]
        # prefix sums over the visiting order, assuming each user would take its solo-best split
        kbest = st.k_opts[np.argmax(solo[self.order], axis=1)]
        mk = np.minimum(st.k_opts[None, 1:], kbest[:, None])  # (n_dec, P)
        z = np.zeros((1, self.n_splits))
        self._pc = np.concatenate([z, np.cumsum(mk, axis=0)])
        self._pl = np.concatenate([z, np.cumsum(mk * st.lam[self.order][:, None], axis=0)])
        self._pg = np.concatenate([[0.0], np.cumsum(st.g[self.order])])
        self._count = np.zeros(self.n_splits + 1, dtype=np.int64)  # admitted users per option
        self.t = 0
        self._gains: np.ndarray | None = None
        self._mask: np.ndarray | None = None
        self._advance()

    # ---- stepping -----------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.t >= self.order.size

    @property
    def user(self) -> int:
        return int(self.order[self.t])

    def _advance(self) -> None:
        """Move to the next user with a real choice (at least one option besides local)."""
        st = self.state
        while self.t < self.order.size:
            if st.n_admitted >= self.max_batch:
                self.t = self.order.size
                break
            i = int(self.order[self.t])
            gains = st.gains(i)
            mask = st.mask(i, gains, self.dominated)
            if mask[1:].any():
                self._gains, self._mask = gains, mask
                return
            self.t += 1
        self._gains, self._mask = None, None

    def gains(self) -> np.ndarray:
        if self._gains is None:
            raise RuntimeError("round is done: no current user")
        return self._gains

    def mask(self) -> np.ndarray:
        if self._mask is None:
            return np.eye(self.n_splits + 1, dtype=bool)[0]  # terminal: only "local" (harmless no-op)
        return self._mask

    def step(self, action: int) -> float:
        """Give the current user option ``action``; returns the objective change."""
        if self.done:
            raise RuntimeError("round is done")
        if not 0 <= action <= self.n_splits:
            raise ValueError(f"action must be in 0..{self.n_splits}, got {action}")
        if not self._mask[action]:
            raise ValueError(f"action {action} is masked for user {self.user} (mask {self._mask.astype(int).tolist()})")
        delta = self.state.apply(self.user, int(action), float(self._gains[action]))
        self._count[action] += 1
        self.t += 1
        self._advance()
        return delta

    # ---- observation ----------------------------------------------------------------------
    def observation(self) -> np.ndarray:
        p = self.n_splits
        out = np.zeros(obs_size(p), dtype=np.float32)
        if self.done:
            return out
        st, inst = self.state, self.instance
        i, t = self.user, self.t
        cap_left = self.max_batch - st.n_admitted
        # the next users that could still fit next to this one
        w = min(cap_left - 1, self.order.size - t - 1)
        hi = t + 1 + w
        lam_i, g_i = st.lam[i], st.g[i]
        future_pair = st.beta * (lam_i * (self._pc[hi] - self._pc[t + 1]) + (self._pl[hi] - self._pl[t + 1]))
        future_bw = 2.0 * g_i * (self._pg[hi] - self._pg[t + 1])
        gains = self._gains
        better = self._solo_sorted[t + 1 :].size - int(np.searchsorted(-self._solo_sorted[t + 1 :], -gains.max(), side="right"))
        occupancy = np.cumsum(self._count[::-1])[::-1][1:] / self.max_batch  # n at each split's last step
        m = self.max_batch
        out[0:3] = (inst.w_quality[i], inst.w_latency[i], inst.w_energy[i])
        out[3 : 3 + p] = gains[1:]
        out[3 + p : 3 + 2 * p] = st.solo_gain[i, 1:]
        out[3 + 2 * p : 3 + 3 * p] = future_pair
        out[3 + 3 * p] = future_bw
        out[4 + 3 * p : 4 + 4 * p] = occupancy
        b = 4 + 4 * p
        out[b] = cap_left / m
        out[b + 1] = min((self.order.size - t - 1) / m, 3.0)
        out[b + 2] = min(better / max(cap_left, 1), 3.0)
        out[b + 3] = inst.capacity
        out[b + 4] = st.beta * inst.steps * lam_i * m
        out[b + 5] = st.big_g
        np.clip(out, -OBS_CLIP, OBS_CLIP, out=out)
        return out


@dataclass(frozen=True)
class RoundEnvConfig:
    """Which rounds the env draws: a scenario, a user-count range (log-uniform), dominance masking."""

    scenario: str = "default"
    n_min: int = 3
    n_max: int = 300
    dominated: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.n_min <= self.n_max:
            raise ValueError(f"need 1 <= n_min <= n_max, got n_min={self.n_min}, n_max={self.n_max}")


class OffloadRoundEnv(gym.Env):
    """Gymnasium env of one round; pass ``instance`` to replay a fixed round instead of sampling."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        config: RoundEnvConfig | None = None,
        instance: RoundInstance | None = None,
        scenario: Scenario | str | Path | None = None,
    ) -> None:
        self.config = config or RoundEnvConfig()
        if not isinstance(scenario, Scenario):
            scenario = load_scenario(scenario if scenario is not None else self.config.scenario)
        self.scenario = scenario
        self.fixed = instance
        n_splits = len(instance.splits) if instance is not None else len(self.scenario.splits)
        self.observation_space = gym.spaces.Box(-OBS_CLIP, OBS_CLIP, shape=(obs_size(n_splits),), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(n_splits + 1)
        self.round: SequentialRound | None = None

    def _draw(self) -> RoundInstance:
        lo, hi = np.log(self.config.n_min), np.log(self.config.n_max + 1)
        n = int(np.clip(np.exp(self.np_random.uniform(lo, hi)), self.config.n_min, self.config.n_max))
        return sample_instance(self.scenario, n_users=n, seed=self.np_random)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        inst = (options or {}).get("instance", self.fixed)
        for _ in range(100):  # a round where nobody can gain has no decision: draw another
            self.round = SequentialRound(inst if inst is not None else self._draw(), self.config.dominated)
            if not self.round.done or inst is not None:
                break
        return self.round.observation(), {"n_users": self.round.instance.n_users}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self.round is None:
            raise RuntimeError("call reset() before step()")
        if self.round.done:
            raise RuntimeError("episode is over; call reset()")
        reward = self.round.step(int(action))
        terminated = self.round.done
        info = {"k": self.round.state.k} if terminated else {}
        return self.round.observation(), reward, terminated, False, info

    def action_masks(self) -> np.ndarray:
        """Valid actions of the current user (for sb3-contrib's MaskablePPO)."""
        if self.round is None:
            raise RuntimeError("call reset() before action_masks()")
        return self.round.mask().copy()
