"""DDPG with a double critic, CleanRL style: everything from the hyperparameters to the loop, here.

Only the actor differs between DDPG and G-DDPG (:mod:`relaydiff.sched.rl.gddpg`): both train with
:func:`train` below, which takes the actor as a factory. The skeleton:

- twin critics Q1, Q2 (MLP 256-256, ReLU) fitted to y = r + gamma (1 - done) min(Q1', Q2')(s', pi'(s'));
- the actor maximizes Q1(s, pi(s)) / mean|Q1| - ``action_penalty`` sum_j max(|u_j| - u_edge, 0)^2
  (deterministic policy gradient, backpropagated through the actor: through its whole denoising
  chain in G-DDPG), u the actor's pre-squash output (before tanh in DDPG, before the last clip in
  G-DDPG) and u_edge where its action reaches ``action_edge``: see :class:`RLConfig` for why;
- soft target updates (Polyak ``tau``), Gaussian exploration noise on the action, a uniform replay
  buffer, random actions for the first ``learning_starts`` steps;
- periodic evaluation on fixed seeds, so that curves of different actors compare draw for draw.

The QoE and water-filling tasks are one step per episode (each round is a fresh draw), so
``gamma`` is 0 by default and the critic learns the immediate reward. Checkpoints are safetensors
plus a JSON config (no pickle). ``Policy.decide`` is the inference path (torch, one thread).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass(frozen=True)
class RLConfig:
    """Every hyperparameter of one DDPG / G-DDPG run (shared by both, so only the actor differs)."""

    seed: int = 0
    total_steps: int = 6000  # environment steps (one gradient update per step after learning_starts)
    learning_starts: int = 500
    buffer_size: int = 100_000
    batch_size: int = 256
    gamma: float = 0.0  # one-step episodes: the critic learns the immediate reward
    tau: float = 0.005  # Polyak factor of the soft target updates
    actor_lr: float = 3e-4
    critic_lr: float = 1e-3
    hidden: int = 256
    exploration_noise: float = 0.1  # std of the Gaussian added to the action while collecting
    # The saturation fix (issue 15, second attempt). Without it every actor ended at the box's edge
    # (QoE bench of record before: 100% of G-DDPG's action entries at |a| = 1, 95% of DDPG's, 100%
    # of SB3's DDPG/TD3), where tanh's derivative (DDPG) or the clip's (G-DDPG) is ~0: the critic's
    # later corrections no longer reach the weights, so the corner is absorbing. The actor loss is
    # -Q1 / mean|Q1| + action_penalty * sum_j max(|u_j| - u_edge, 0)^2 (mean over the batch), u
    # the pre-squash output and u_edge where |a| reaches action_edge (u = MLP(s) in a = tanh(u),
    # u_edge = atanh(action_edge); the last step's unclipped x0 in a = clip(x0, -1, 1),
    # u_edge = action_edge): a hinge, the same in action terms for both actors, that acts only near
    # the edge, so it never biases an action well inside the box (a plain quadratic on u, tried
    # first, kept QoE's actions off the edge but cost water-filling its zero-power channels:
    # G-DDPG 0.995 -> 0.975 of the optimum; a hinge at the clip itself left G-DDPG's entries
    # sitting on it). Q is normalized (as in TD3+BC) so that the weight means the same on any reward
    # scale; summed over the action's entries so that it does not fade with their number. Its cost:
    # water-filling, whose optimum lies on the edge, G-DDPG 0.976 of the optimum (0.995 without). 0
    # restores the plain -Q1 loss. Measured in docs/measurements/qoe_saturation.json (docs/qoe.md).
    action_penalty: float = 1.0
    action_edge: float = 0.98  # |a| past which the penalty acts (the saturation count is |a| > 0.99)
    policy_frequency: int = 1  # actor updates every this many critic updates
    diffusion_steps: int = 5  # G-DDPG only: denoising steps of the actor
    eval_every: int = 1000
    eval_episodes: int = 64
    threads: int = 1

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RLConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def mlp(inp: int, out: int, hidden: int, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Two hidden layers of ``hidden`` units."""
    return nn.Sequential(nn.Linear(inp, hidden), act(), nn.Linear(hidden, hidden), act(), nn.Linear(hidden, out))


class MLPActor(nn.Module):
    """DDPG's actor: a = tanh(MLP(s)), deterministic."""

    kind = "mlp"

    @staticmethod
    def pre_edge(edge: float) -> float:
        """The |u| at which |a| = ``edge`` (RLConfig.action_penalty)."""
        return math.atanh(edge)

    def __init__(self, obs_dim: int, act_dim: int, cfg: RLConfig) -> None:
        super().__init__()
        self.net = mlp(obs_dim, act_dim, cfg.hidden)

    def forward(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.tanh(self.net(obs))

    def forward_pre(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(action, pre-squash output u) with action = tanh(u)."""
        u = self.net(obs)
        return torch.tanh(u), u


class TwinCritic(nn.Module):
    """Q1, Q2 (s, a) -> R, two independent MLPs."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int) -> None:
        super().__init__()
        self.q1 = mlp(obs_dim + act_dim, 1, hidden)
        self.q2 = mlp(obs_dim + act_dim, 1, hidden)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs, act], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


ActorFactory = Callable[[int, int, RLConfig], nn.Module]


class Policy:
    """A trained actor for inference: ``decide(obs) -> action`` in [-1, 1]^act_dim.

    A stochastic actor (the diffusion one) draws its noise from generators seeded at load, so a
    policy decides reproducibly from a given seed. An actor with a ``numpy_sampler`` decides one
    state at a time through it (torch's per-op overhead is most of a 5-step chain's time at
    batch 1); :meth:`refresh` rebuilds it after the weights change.
    """

    def __init__(self, actor: nn.Module, cfg: RLConfig, obs_dim: int, act_dim: int, seed: int = 0) -> None:
        self.actor, self.cfg, self.obs_dim, self.act_dim = actor.eval(), cfg, obs_dim, act_dim
        self.generator = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self._sampler: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None
        self.refresh()

    def refresh(self) -> None:
        """Rebuild the numpy inference path from the actor's current weights."""
        make = getattr(self.actor, "numpy_sampler", None)
        self._sampler = make() if make is not None else None

    def reseed(self, seed: int) -> None:
        """Restart the policy's noise (both the torch and the numpy generator)."""
        self.generator.manual_seed(seed)
        self.rng = np.random.default_rng(seed)

    @property
    def kind(self) -> str:
        return str(getattr(self.actor, "kind", "mlp"))

    def decide(self, obs: np.ndarray) -> np.ndarray:
        """One action for one observation (or a batch: [B, obs_dim] -> [B, act_dim])."""
        if self._sampler is not None and np.ndim(obs) == 1:
            return self._sampler(obs, self.rng)
        x = torch.as_tensor(np.asarray(obs, dtype=np.float32))
        single = x.ndim == 1
        with torch.inference_mode():
            a = self.actor(x[None] if single else x, generator=self.generator)
        out = a.numpy().astype(np.float64)
        return out[0] if single else out

    __call__ = decide

    @classmethod
    def from_pretrained(cls, path: str | Path, seed: int = 0) -> "Policy":
        """A policy saved by :meth:`save_pretrained` (safetensors weights, JSON config)."""
        return _load_policy(path, seed)

    def save_pretrained(self, path: str | Path) -> Path:
        """``path``/actor.safetensors + ``path``/policy.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.actor.state_dict().items()}, str(path / "actor.safetensors"))
        meta = {"format": "relaydiff.rl-policy/1", "actor": self.kind, "obs_dim": self.obs_dim,
                "act_dim": self.act_dim, "config": asdict(self.cfg)}
        (path / "policy.json").write_text(json.dumps(meta, indent=2) + "\n")
        return path


def _load_policy(path: str | Path, seed: int = 0) -> Policy:
    path = Path(path)
    try:
        meta = json.loads((path / "policy.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a saved relaydiff RL policy ({exc})") from None
    cfg = RLConfig.from_dict(meta.get("config", {}))
    factory = actor_factory(meta.get("actor", "mlp"))
    actor = factory(int(meta["obs_dim"]), int(meta["act_dim"]), cfg)
    actor.load_state_dict(load_file(str(path / "actor.safetensors")))
    return Policy(actor, cfg, int(meta["obs_dim"]), int(meta["act_dim"]), seed)


def actor_factory(kind: str) -> ActorFactory:
    """The actor class of a kind ('mlp' for DDPG, 'diffusion' for G-DDPG)."""
    if kind == "mlp":
        return MLPActor
    if kind == "diffusion":
        # lazy: gddpg imports this module (its actor plugs into this skeleton)
        from relaydiff.sched.rl.gddpg import DiffusionActor

        return DiffusionActor
    raise ValueError(f"unknown actor kind {kind!r} (mlp, diffusion)")


class ReplayBuffer:
    """Uniform replay over (s, a, r, s', done), numpy storage."""

    def __init__(self, obs_dim: int, act_dim: int, size: int, rng: np.random.Generator) -> None:
        self.obs = np.zeros((size, obs_dim), np.float32)
        self.next_obs = np.zeros((size, obs_dim), np.float32)
        self.act = np.zeros((size, act_dim), np.float32)
        self.rew = np.zeros(size, np.float32)
        self.done = np.zeros(size, np.float32)
        self.size, self.n, self.i, self.rng = size, 0, 0, rng

    def add(self, o: np.ndarray, a: np.ndarray, r: float, o2: np.ndarray, d: bool) -> None:
        self.obs[self.i], self.act[self.i], self.rew[self.i], self.next_obs[self.i], self.done[self.i] = o, a, r, o2, d
        self.i, self.n = (self.i + 1) % self.size, min(self.n + 1, self.size)

    def sample(self, batch: int) -> tuple[torch.Tensor, ...]:
        idx = self.rng.integers(0, self.n, size=batch)
        return tuple(torch.as_tensor(x[idx]) for x in (self.obs, self.act, self.rew, self.next_obs, self.done))


@dataclass
class TrainResult:
    policy: Policy
    curve: list[dict[str, float]]  # {"step", "return", <info keys>} at each evaluation
    wall_s: float


def evaluate(policy_fn: Callable[[np.ndarray], np.ndarray], env: gym.Env, episodes: int, seed: int,
             info_keys: tuple[str, ...] = ()) -> dict[str, float]:
    """Mean return (and mean of ``info_keys`` at episode ends) over ``episodes`` seeded episodes."""
    returns, extras = [], {k: [] for k in info_keys}
    for j in range(episodes):
        obs, _ = env.reset(seed=seed + j)
        total, done = 0.0, False
        while not done:
            obs, r, term, trunc, info = env.step(policy_fn(obs))
            total, done = total + float(r), term or trunc
        returns.append(total)
        for k in info_keys:
            extras[k].append(float(info[k]))
    out = {"return": float(np.mean(returns))}
    out.update({k: float(np.mean(v)) for k, v in extras.items()})
    return out


def actor_loss(pi: nn.Module, qf: TwinCritic, obs: torch.Tensor, cfg: RLConfig,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """-Q1(s, pi(s)) / mean|Q1| + ``cfg.action_penalty`` sum_j max(|u_j| - u_edge, 0)^2 (batch mean),
    u the actor's pre-squash output and u_edge = ``pi.pre_edge(cfg.action_edge)`` (:class:`RLConfig`
    says why); with no penalty, the plain -Q1(s, pi(s))."""
    act, pre = pi.forward_pre(obs, generator=generator)
    q = qf(obs, act)[0]
    if not cfg.action_penalty:
        return -q.mean()
    excess = (pre.abs() - pi.pre_edge(cfg.action_edge)).clamp(min=0.0)
    return -q.mean() / q.abs().mean().detach().clamp(min=1e-6) + cfg.action_penalty * (excess**2).sum(-1).mean()


def train(make_env: Callable[[int], gym.Env], cfg: RLConfig, actor: ActorFactory = MLPActor,
          info_keys: tuple[str, ...] = (), eval_seed: int = 10_000,
          log: Callable[[str], None] | None = None) -> TrainResult:
    """Train an actor (DDPG's MLP by default) with the double-critic DDPG skeleton.

    ``make_env(seed)`` builds an env; the training env gets ``cfg.seed``, the evaluation env the
    same (its episodes are reset with seeds ``eval_seed + j``, identical for every actor).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(make_env, cfg, actor, info_keys, eval_seed, log)
    finally:
        torch.set_num_threads(threads)  # leave the caller's thread count as it was


def _train(make_env: Callable[[int], gym.Env], cfg: RLConfig, actor: ActorFactory, info_keys: tuple[str, ...],
           eval_seed: int, log: Callable[[str], None] | None) -> TrainResult:
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    env, eval_env = make_env(cfg.seed), make_env(cfg.seed)
    obs_dim = int(np.prod(env.observation_space.shape))
    act_dim = int(np.prod(env.action_space.shape))
    pi = actor(obs_dim, act_dim, cfg)
    pi_target = copy.deepcopy(pi)
    qf = TwinCritic(obs_dim, act_dim, cfg.hidden)
    qf_target = copy.deepcopy(qf)
    pi_opt = torch.optim.Adam(pi.parameters(), lr=cfg.actor_lr)
    q_opt = torch.optim.Adam(qf.parameters(), lr=cfg.critic_lr)
    buffer = ReplayBuffer(obs_dim, act_dim, cfg.buffer_size, rng)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    policy = Policy(pi, cfg, obs_dim, act_dim, seed=cfg.seed)
    curve: list[dict[str, float]] = []

    def record(step: int) -> None:
        pi.eval()
        policy.refresh()
        policy.reseed(eval_seed)  # the same diffusion noise at every evaluation
        point = {"step": float(step), **evaluate(policy.decide, eval_env, cfg.eval_episodes, eval_seed, info_keys)}
        pi.train()
        curve.append(point)
        if log:
            log(" ".join(f"{k}={v:.4g}" for k, v in point.items()))

    obs, _ = env.reset(seed=cfg.seed)
    for step in range(cfg.total_steps):
        if step % cfg.eval_every == 0:
            record(step)
        # ---- act: random at first, then the actor plus Gaussian exploration noise --------------
        if step < cfg.learning_starts:
            action = rng.uniform(-1.0, 1.0, act_dim)
        else:
            with torch.no_grad():
                a = pi(torch.as_tensor(obs, dtype=torch.float32)[None], generator=gen)[0].numpy()
            action = np.clip(a + rng.normal(0.0, cfg.exploration_noise, act_dim), -1.0, 1.0)
        next_obs, reward, term, trunc, _ = env.step(action.astype(np.float32))
        buffer.add(obs, action, reward, next_obs, term)
        obs = env.reset()[0] if term or trunc else next_obs
        if step < cfg.learning_starts:
            continue
        # ---- critic: double-Q target ---------------------------------------------------------
        o, a, r, o2, d = buffer.sample(cfg.batch_size)
        with torch.no_grad():
            if cfg.gamma > 0:
                q1t, q2t = qf_target(o2, pi_target(o2, generator=gen))
                y = r + cfg.gamma * (1.0 - d) * torch.min(q1t, q2t)
            else:
                y = r
        q1, q2 = qf(o, a)
        q_loss = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()
        q_opt.zero_grad()
        q_loss.backward()
        q_opt.step()
        # ---- actor: maximize Q1(s, pi(s)); soft target updates ---------------------------------
        if step % cfg.policy_frequency == 0:
            pi_loss = actor_loss(pi, qf, o, cfg, gen)
            pi_opt.zero_grad()
            pi_loss.backward()
            pi_opt.step()
            with torch.no_grad():
                for net, target in ((pi, pi_target), (qf, qf_target)):
                    for p, tp in zip(net.parameters(), target.parameters()):
                        tp.mul_(1.0 - cfg.tau).add_(cfg.tau * p)
    record(cfg.total_steps)
    pi.eval()
    policy.reseed(cfg.seed)
    return TrainResult(policy, curve, time.perf_counter() - t0)


__all__ = ["MLPActor", "Policy", "RLConfig", "TrainResult", "TwinCritic", "actor_factory", "actor_loss", "evaluate",
           "train"]
