"""The one-round offloading problem as a sequential-decision MDP (one user decided per step).

At each step the user to decide is the undecided one with the largest marginal gain (the exact
change of the objective, given the decisions so far, of its best option); the agent picks that
user's option: 0 = local, o = the o-th split point. A policy that always takes the best gain is
exactly the global greedy baseline; a learned policy can deviate (a shorter split that leaves the
batch lighter for the users still to come, or no admission at all). The observation has a fixed
size that depends on the number of split points P but not on N, so one policy serves any N:

- the user: preference weights, the marginal gain of each option now, and on an empty edge;
- the look-ahead: the interaction and bandwidth cost each option would impose on the users most
  likely to follow (the best remaining ones that still fit, at their current best split), how
  many remaining users could still gain, and the runner-up's gain relative to this user's;
- the edge: occupancy n / M in every segment between split points, capacity left, compute share
  c, the interaction cost scale beta' T lam_i M, and the admitted bandwidth weight sum_A g.

Reward = the exact change of the objective, so an episode's return is objective - objective(all
local). Actions that break capacity are invalid, and actions whose gain is already negative are
dominated by local (interaction and bandwidth costs only grow as users are added, so they stay
negative in every completion) — both are masked (``action_masks``). Users with nothing left to
gain are set local without a step; the episode ends when the edge is full or nobody can gain.

Gains are kept as an (N, P+1) table: initialised from
:meth:`relaydiff.system.moves.MoveState.deltas` and, when user i is admitted at split k_b,
updated for every other local user j by the pairwise terms it adds,
``gain[j, o] -= beta' (lam_i + lam_j) min(k_o, k_b) + 2 g_i g_j``: O(N P) per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np

from relaydiff.system.moves import MoveState
from relaydiff.system.problem import RoundInstance, sample_instance
from relaydiff.system.scenario import Scenario, load_scenario

OBS_CLIP = 10.0


def obs_size(n_splits: int) -> int:
    """Length of the observation vector for P = ``n_splits`` split points."""
    return 4 * n_splits + 10


class SequentialRound:
    """One round decided user by user: state, masks and observations, shared by env and solver."""

    def __init__(self, instance: RoundInstance, dominated: bool = True) -> None:
        self.instance = instance
        self.dominated = dominated
        self.moves = MoveState(instance)
        self.n_splits = len(instance.splits)
        self.max_batch = int(instance.max_batch)
        self.k_opts = instance.options.astype(float)
        self.min_k = np.minimum(self.k_opts[:, None], self.k_opts[None, :])
        self.lam = instance.edge_weight
        self.g = instance.bw_weight
        self.beta = float(instance.beta_eff)
        gains = self.moves.deltas()
        gains[:, 0] = 0.0
        self.solo = gains.copy()
        self.table = gains  # gains of undecided users; rows of decided users are stale
        self.best = gains[:, 1:].max(axis=1)
        self.best[self.best <= 0.0] = -np.inf  # nothing to gain: local, never visited
        self.total_gain = 0.0
        self.n_steps = 0
        self.user = -1
        self._advance()

    @property
    def done(self) -> bool:
        return self.user < 0

    @property
    def k(self) -> np.ndarray:
        """Split point per user (0 = local): the decision as ``evaluate`` takes it."""
        return self.moves.k

    def _advance(self) -> None:
        """Pick the next user: the undecided one with the largest positive gain, if the edge has room."""
        self.user = -1
        if self.moves.admitted >= self.max_batch:
            return
        i = int(np.argmax(self.best))
        if np.isfinite(self.best[i]):
            self.user = i

    def gains(self) -> np.ndarray:
        """Objective change of each option of the current user."""
        if self.done:
            raise RuntimeError("round is done: no current user")
        return self.table[self.user]

    def mask(self) -> np.ndarray:
        """Valid options of the current user (only local once the round is done)."""
        m = np.zeros(self.n_splits + 1, dtype=bool)
        m[0] = True
        if not self.done:
            m[1:] = self.table[self.user, 1:] >= 0.0 if self.dominated else True
        return m

    def greedy_option(self) -> int:
        """The valid option with the largest gain (always taking it is the global greedy baseline)."""
        return int(np.argmax(np.where(self.mask(), self.gains(), -np.inf)))

    def step(self, action: int) -> float:
        """Give the current user option ``action``; returns the objective change."""
        if self.done:
            raise RuntimeError("round is done")
        if not 0 <= action <= self.n_splits:
            raise ValueError(f"action must be in 0..{self.n_splits}, got {action}")
        mask = self.mask()
        if not mask[action]:
            raise ValueError(f"action {action} is masked for user {self.user} (mask {mask.astype(int).tolist()})")
        i = self.user
        delta = float(self.table[i, action])
        self.best[i] = -np.inf
        if action > 0:
            self.moves.move(i, action)
            live_t = self.table[:, 1:]  # a view: option 0 (local) always gains 0
            live_t -= self.beta * (self.lam[i] + self.lam[:, None]) * self.min_k[action][None, 1:] + (2.0 * self.g[i]) * self.g[:, None]
            live = np.isfinite(self.best)
            best = self.table[live, 1:].max(axis=1)
            self.best[live] = np.where(best > 0.0, best, -np.inf)
        self.total_gain += delta
        self.n_steps += 1
        self._advance()
        return delta

    def observation(self) -> np.ndarray:
        """The fixed-size state of the current user (layout in the module docstring; zeros when done)."""
        p = self.n_splits
        out = np.zeros(obs_size(p), dtype=np.float32)
        if self.done:
            return out
        inst, i = self.instance, self.user
        gains = self.table[i]
        m = self.max_batch
        cap_left = m - self.moves.admitted
        others = np.flatnonzero(np.isfinite(self.best))
        others = others[others != i]
        w = min(cap_left - 1, others.size)
        if 0 < w < others.size:
            nxt = others[np.argpartition(-self.best[others], w - 1)[:w]]
        else:
            nxt = others[:w]
        k_next = self.k_opts[1:][np.argmax(self.table[nxt, 1:], axis=1)] if w else np.zeros(0)
        mk = np.minimum(self.k_opts[None, 1:], k_next[:, None])  # (w, P)
        own_best = max(float(self.best[i]), 1e-9)
        runner_up = float(self.best[others].max()) if others.size else 0.0
        out[0:3] = (inst.w_quality[i], inst.w_latency[i], inst.w_energy[i])
        out[3 : 3 + p] = gains[1:]
        out[3 + p : 3 + 2 * p] = self.solo[i, 1:]
        out[3 + 2 * p : 3 + 3 * p] = self.beta * (self.lam[i] * mk.sum(axis=0) + self.lam[nxt] @ mk)
        out[3 + 3 * p] = 2.0 * self.g[i] * self.g[nxt].sum()
        out[4 + 3 * p : 4 + 4 * p] = self.moves.cnt[1:] / m
        b = 4 + 4 * p
        out[b] = cap_left / m
        out[b + 1] = min(others.size / m, 3.0)
        out[b + 2] = min(runner_up / own_best, 3.0)
        out[b + 3] = inst.capacity
        out[b + 4] = self.beta * inst.steps * self.lam[i] * m
        out[b + 5] = self.moves.sigma
        np.clip(out, -OBS_CLIP, OBS_CLIP, out=out)
        return out


@dataclass(frozen=True)
class RoundEnvConfig:
    """Which rounds the env draws: scenarios (one picked per round, comma-separated names or paths),
    a user-count range (log-uniform), and whether dominated options are masked."""

    scenario: str = "default"
    n_min: int = 3
    n_max: int = 300
    dominated: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.n_min <= self.n_max:
            raise ValueError(f"need 1 <= n_min <= n_max, got n_min={self.n_min}, n_max={self.n_max}")
        if not self.scenarios:
            raise ValueError("scenario: give at least one scenario name or path")

    @property
    def scenarios(self) -> list[str]:
        return [s.strip() for s in self.scenario.split(",") if s.strip()]


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
        if isinstance(scenario, Scenario):
            self.scenarios = [scenario]
        else:
            self.scenarios = [load_scenario(s) for s in ([scenario] if scenario is not None else self.config.scenarios)]
        splits = {len(sc.splits) for sc in self.scenarios}
        if len(splits) != 1:
            raise ValueError(f"scenarios must have the same number of split points (one observation size), got {sorted(splits)}")
        self.fixed = instance
        n_splits = len(instance.splits) if instance is not None else splits.pop()
        self.observation_space = gym.spaces.Box(-OBS_CLIP, OBS_CLIP, shape=(obs_size(n_splits),), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(n_splits + 1)
        self.round: SequentialRound | None = None

    def _draw(self) -> RoundInstance:
        sc = self.scenarios[int(self.np_random.integers(len(self.scenarios)))] if len(self.scenarios) > 1 else self.scenarios[0]
        lo, hi = np.log(self.config.n_min), np.log(self.config.n_max + 1)
        n = int(np.clip(np.exp(self.np_random.uniform(lo, hi)), self.config.n_min, self.config.n_max))
        return sample_instance(sc, n_users=n, seed=self.np_random)

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
        info = {"k": self.round.k.copy()} if terminated else {}
        return self.round.observation(), reward, terminated, False, info

    def action_masks(self) -> np.ndarray:
        """Valid actions of the current user (for sb3-contrib's MaskablePPO)."""
        if self.round is None:
            raise RuntimeError("call reset() before action_masks()")
        return self.round.mask().copy()
