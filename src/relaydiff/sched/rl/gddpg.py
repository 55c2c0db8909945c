"""G-DDPG: DDPG whose actor is a small conditional diffusion model over the action (GDMOPT's idea).

The actor generates the action by running a DDPM's reverse chain for ``diffusion_steps`` (about 5)
steps from Gaussian noise, each step conditioned on the state:

- VP noise schedule (Song et al. 2021, discretized as in Diffusion-QL / GDMOPT):
  alpha_t = exp(-b_min / T - (b_max - b_min) (2t - 1) / (2 T^2)), beta_t = 1 - alpha_t, t = 1..T;
- the noise predictor eps(x_t, t, s) is an MLP 256-256 with Mish over [x_t, emb(t), s], emb a
  sinusoidal step embedding followed by a small MLP;
- each step predicts x0 from eps, clips it to the action box, and samples the DDPM posterior
  q(x_{t-1} | x_t, x0) (no noise at the last step); the final action is clipped to [-1, 1].

Training is the DDPG skeleton of :mod:`relaydiff.sched.rl.ddpg` unchanged (double critic, soft
targets, Gaussian exploration on top of the chain's own noise, the same action penalty on the
pre-squash output): the actor loss backpropagates through the whole reverse chain. Run ``train_gddpg`` to train; a
:class:`~relaydiff.sched.rl.ddpg.Policy` decides at inference.
"""

from __future__ import annotations

import math
from typing import Callable

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from relaydiff.sched.rl.ddpg import RLConfig, TrainResult, train


def vp_betas(steps: int, b_min: float = 0.1, b_max: float = 10.0) -> torch.Tensor:
    """The discretized variance-preserving schedule beta_1..beta_T."""
    t = torch.arange(1, steps + 1, dtype=torch.float64)
    alpha = torch.exp(-b_min / steps - 0.5 * (b_max - b_min) * (2 * t - 1) / steps**2)
    return (1.0 - alpha).float()


class SinusoidalEmbedding(nn.Module):
    """Transformer-style embedding of the integer step t."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        angles = t.float()[:, None] * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class DiffusionActor(nn.Module):
    """pi(s): the reverse chain of a conditional DDPM over actions in [-1, 1]^act_dim."""

    kind = "diffusion"

    @staticmethod
    def pre_edge(edge: float) -> float:
        """The |pre| at which |a| = ``edge``: the clip is the identity inside (RLConfig.action_penalty)."""
        return edge

    def __init__(self, obs_dim: int, act_dim: int, cfg: RLConfig, t_dim: int = 16) -> None:
        super().__init__()
        self.act_dim, self.steps = act_dim, cfg.diffusion_steps
        self.time_mlp = nn.Sequential(SinusoidalEmbedding(t_dim), nn.Linear(t_dim, 2 * t_dim), nn.Mish(),
                                      nn.Linear(2 * t_dim, t_dim))
        h = cfg.hidden
        self.eps = nn.Sequential(nn.Linear(act_dim + t_dim + obs_dim, h), nn.Mish(), nn.Linear(h, h), nn.Mish(),
                                 nn.Linear(h, act_dim))
        betas = vp_betas(self.steps)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1), abar[:-1]])
        # x0 from eps, and the posterior q(x_{t-1} | x_t, x0) = N(c0 x0 + ct x_t, var)
        self.register_buffer("sqrt_recip_abar", torch.sqrt(1.0 / abar))
        self.register_buffer("sqrt_recipm1_abar", torch.sqrt(1.0 / abar - 1.0))
        self.register_buffer("post_c0", betas * torch.sqrt(abar_prev) / (1.0 - abar))
        self.register_buffer("post_ct", (1.0 - abar_prev) * torch.sqrt(alphas) / (1.0 - abar))
        self.register_buffer("post_logvar", torch.log(torch.clamp(betas * (1.0 - abar_prev) / (1.0 - abar), min=1e-20)))

    def forward(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.forward_pre(obs, generator)[0]

    def forward_pre(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(action, pre-squash output): the last step's x0 before its clip (the last step adds no
        noise and its posterior mean is x0 itself, so the action is clip(pre, -1, 1))."""
        b = obs.shape[0]
        x = torch.randn(b, self.act_dim, generator=generator)
        pre = x
        for i in reversed(range(self.steps)):
            t = torch.full((b,), i, dtype=torch.long)
            eps = self.eps(torch.cat([x, self.time_mlp(t), obs], dim=-1))
            pre = self.sqrt_recip_abar[i] * x - self.sqrt_recipm1_abar[i] * eps
            mean = self.post_c0[i] * pre.clamp(-1.0, 1.0) + self.post_ct[i] * x
            if i > 0:
                x = mean + torch.exp(0.5 * self.post_logvar[i]) * torch.randn(b, self.act_dim, generator=generator)
            else:
                x = mean
        return x.clamp(-1.0, 1.0), pre

    @torch.no_grad()
    def numpy_sampler(self) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
        """The same reverse chain in numpy for one state at a time (the < 2 ms inference path).

        The first layer is split into its x, t and state blocks: the state block is computed once
        per decision and the step embeddings once per weight snapshot, so each step costs two small
        matmuls. Call again after the weights change.
        """
        first, mid, last = (m for m in self.eps if isinstance(m, nn.Linear))
        w1 = first.weight.numpy().T.astype(np.float64)
        wx, wt, ws = w1[: self.act_dim], w1[self.act_dim : self.act_dim + self.time_mlp[-1].out_features], \
            w1[self.act_dim + self.time_mlp[-1].out_features :]
        temb = self.time_mlp(torch.arange(self.steps)).numpy().astype(np.float64)
        t_bias = temb @ wt + first.bias.numpy()  # [steps, hidden]
        w2, b2 = mid.weight.numpy().T.astype(np.float64), mid.bias.numpy().astype(np.float64)
        w3, b3 = last.weight.numpy().T.astype(np.float64), last.bias.numpy().astype(np.float64)
        c = {k: getattr(self, k).numpy().astype(np.float64) for k in
             ("sqrt_recip_abar", "sqrt_recipm1_abar", "post_c0", "post_ct", "post_logvar")}
        sd = np.exp(0.5 * c["post_logvar"])

        def mish(h: np.ndarray) -> np.ndarray:
            return h * np.tanh(np.logaddexp(0.0, h))

        def sample(obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            s_part = np.asarray(obs, dtype=np.float64) @ ws
            x = rng.standard_normal(self.act_dim)
            for i in reversed(range(self.steps)):
                h = mish(mish(x @ wx + s_part + t_bias[i]) @ w2 + b2)
                eps = h @ w3 + b3
                x0 = np.clip(c["sqrt_recip_abar"][i] * x - c["sqrt_recipm1_abar"][i] * eps, -1.0, 1.0)
                x = c["post_c0"][i] * x0 + c["post_ct"][i] * x
                if i > 0:
                    x = x + sd[i] * rng.standard_normal(self.act_dim)
            return np.clip(x, -1.0, 1.0)

        return sample


def train_gddpg(make_env: Callable[[int], gym.Env], cfg: RLConfig, **kwargs) -> TrainResult:
    """G-DDPG: :func:`relaydiff.sched.rl.ddpg.train` with the diffusion actor."""
    return train(make_env, cfg, actor=DiffusionActor, **kwargs)


__all__ = ["DiffusionActor", "SinusoidalEmbedding", "train_gddpg", "vp_betas"]
