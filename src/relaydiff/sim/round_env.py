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

import math
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np

from relaydiff.sim.families import get_families
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
        self._lam_col, self._g_col = self.lam[:, None], self.g[:, None]
        self._weights = np.stack([instance.w_quality, instance.w_latency, instance.w_energy], axis=1)
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
        i = int(self.best.argmax())
        if math.isfinite(self.best[i]):
            self.user = i

    def gains(self) -> np.ndarray:
        """Objective change of each option of the current user."""
        if self.done:
            raise RuntimeError("round is done: no current user")
        return self.table[self.user]

    def mask(self) -> np.ndarray:
        """Valid options of the current user (only local once the round is done)."""
        if self.done or not self.dominated:
            m = np.full(self.n_splits + 1, not self.done, dtype=bool)
            m[0] = True
            return m
        return self.table[self.user] >= 0.0  # the local option's gain is 0

    def greedy_option(self) -> int:
        """The valid option with the largest gain (always taking it is the global greedy baseline)."""
        return int(np.argmax(np.where(self.mask(), self.gains(), -np.inf)))

    def step(self, action: int) -> float:
        """Give the current user option ``action``; returns the objective change."""
        if self.done:
            raise RuntimeError("round is done")
        if not 0 <= action <= self.n_splits:
            raise ValueError(f"action must be in 0..{self.n_splits}, got {action}")
        i = self.user
        delta = float(self.table[i, action])
        if action > 0 and self.dominated and not delta >= 0.0:
            mask = self.mask()
            raise ValueError(f"action {action} is masked for user {self.user} (mask {mask.astype(int).tolist()})")
        self.best[i] = -np.inf
        if action > 0:
            self.moves.move(i, action)
            live_t = self.table[:, 1:]  # a view: option 0 (local) always gains 0
            live_t -= self.beta * (self.lam[i] + self._lam_col) * self.min_k[action, 1:] + (2.0 * self.g[i]) * self._g_col
            best = np.maximum.reduce(live_t, axis=1)  # rows of decided users are stale: their best stays -inf
            self.best = np.where(np.isfinite(self.best) & (best > 0.0), best, -np.inf)
        self.total_gain += delta
        self.n_steps += 1
        self._advance()
        return delta

    def observation(self) -> np.ndarray:
        """The fixed-size state of the current user (layout in the module docstring; zeros when done).

        Written for few numpy calls (it runs once per decision of the DRL solver, at every N).
        """
        if self.done:
            return np.zeros(obs_size(self.n_splits), dtype=np.float32)
        inst, i = self.instance, self.user
        m = self.max_batch
        cap_left = m - self.moves.admitted
        rest = self.best.copy()
        rest[i] = -np.inf  # the other users still to decide: finite best gain
        live = np.isfinite(rest)
        n_others = int(np.count_nonzero(live))
        w = min(cap_left - 1, n_others)
        if 0 < w < n_others:
            nxt = (-rest).argpartition(w - 1)[:w]
        else:
            nxt = live.nonzero()[0][: max(w, 0)]
        mk = self.min_k[1 + self.table[nxt, 1:].argmax(axis=1), 1:]  # (w, P): min(k_o, k of each next user's best)
        runner_up = float(np.maximum.reduce(rest)) if n_others else 0.0
        lam_i = self.lam[i]
        out = np.concatenate((
            self._weights[i], self.table[i, 1:], self.solo[i, 1:], self.beta * (lam_i * np.add.reduce(mk, axis=0) + self.lam[nxt] @ mk),
            (2.0 * self.g[i] * self.g[nxt].sum(),), self.moves.cnt[1:] / m,
            (cap_left / m, min(n_others / m, 3.0), min(runner_up / max(float(self.best[i]), 1e-9), 3.0), inst.capacity,
             self.beta * inst.steps * lam_i * m, self.moves.sigma),
        )).astype(np.float32)
        out.clip(-OBS_CLIP, OBS_CLIP, out=out)
        return out


@dataclass(frozen=True)
class RoundEnvConfig:
    """Which rounds the env draws: scenarios (one picked per round, comma-separated names or paths),
    or, when ``families`` is given, families (:mod:`relaydiff.sim.families`, one drawn per round:
    domain randomization); a user-count range (log-uniform), and whether dominated options are masked."""

    scenario: str = "default"
    n_min: int = 3
    n_max: int = 300
    dominated: bool = True
    families: str = ""  # comma-separated family names; non-empty: replaces ``scenario``

    def __post_init__(self) -> None:
        if not 1 <= self.n_min <= self.n_max:
            raise ValueError(f"need 1 <= n_min <= n_max, got n_min={self.n_min}, n_max={self.n_max}")
        if not self.scenarios and not self.family_names:
            raise ValueError("scenario: give at least one scenario name or path")
        get_families(self.family_names)  # unknown names fail here, not at the first reset

    @property
    def scenarios(self) -> list[str]:
        return [s.strip() for s in self.scenario.split(",") if s.strip()]

    @property
    def family_names(self) -> list[str]:
        return [s.strip() for s in self.families.split(",") if s.strip()]


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
        # (scenario, instance transform) per source of rounds: the families, else the scenarios
        self.families = get_families(self.config.family_names) if scenario is None else []
        if isinstance(scenario, Scenario):
            self.scenarios = [scenario]
        elif self.families:
            self.scenarios = [f.scenario() for f in self.families]
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
        j = int(self.np_random.integers(len(self.scenarios))) if len(self.scenarios) > 1 else 0
        lo, hi = np.log(self.config.n_min), np.log(self.config.n_max + 1)
        n = int(np.clip(np.exp(self.np_random.uniform(lo, hi)), self.config.n_min, self.config.n_max))
        if self.families:
            return self.families[j].sample(self.scenarios[j], n, self.np_random)
        return sample_instance(self.scenarios[j], n_users=n, seed=self.np_random)

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
