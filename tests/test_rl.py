"""DDPG / G-DDPG skeleton and the water-filling check task (fast: tiny nets, few hundred steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from scipy.optimize import minimize

from relaydiff.sched.rl.ddpg import actor_loss, MLPActor, Policy, RLConfig, train
from relaydiff.sched.rl.gddpg import DiffusionActor, train_gddpg, vp_betas
from relaydiff.sim.waterfill_env import WaterFillingEnv, powers_from_action
from relaydiff.system.waterfill import sum_rate, water_filling


def test_water_filling_is_the_optimum() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        g = rng.exponential(1.0, 5) + 1e-3
        p = water_filling(g, 3.0)
        assert p.min() >= 0 and p.sum() == pytest.approx(3.0)
        # no feasible point found by a generic solver beats it
        res = minimize(lambda x: -sum_rate(g, 3.0 * np.abs(x) / np.abs(x).sum()), rng.uniform(0.1, 1, 5), method="Nelder-Mead",
                       options={"maxiter": 4000, "xatol": 1e-9, "fatol": 1e-12})
        assert sum_rate(g, p) >= -res.fun - 1e-6
    # a hopeless channel gets no power, and equal gains split equally
    assert water_filling(np.array([1.0, 1e-4]), 1.0)[1] == 0.0
    assert np.allclose(water_filling(np.ones(4), 2.0), 0.5)
    with pytest.raises(ValueError):
        water_filling(np.array([1.0, 0.0]), 1.0)


def test_waterfill_env_passes_check_env_and_scores_against_the_optimum() -> None:
    env = WaterFillingEnv(seed=3)
    check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=1)
    best = water_filling(obs.astype(float), env.total_power)
    # the action that encodes the optimum reaches ratio 1
    a = best / best.max() * 2.0 - 1.0
    assert np.allclose(powers_from_action(a, env.total_power), best)
    _, r, term, _, info = env.step(a.astype(np.float32))
    assert term and info["ratio_to_optimum"] == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(powers_from_action(-np.ones(4), 2.0), 0.5)


def test_vp_schedule_and_numpy_path_match_torch() -> None:
    b = vp_betas(5)
    assert torch.all(b > 0) and torch.all(b < 1) and torch.all(b[1:] > b[:-1])
    torch.manual_seed(0)
    actor = DiffusionActor(7, 3, RLConfig(hidden=32))
    obs = np.random.default_rng(0).normal(size=7)

    class Zeros:
        def standard_normal(self, n: int) -> np.ndarray:
            return np.zeros(n)

    fast = actor.numpy_sampler()(obs, Zeros())
    orig = torch.randn
    try:  # the same chain with every noise draw zeroed
        torch.randn = lambda *s, **k: torch.zeros(*s)  # type: ignore[assignment]
        with torch.no_grad():
            slow = actor(torch.as_tensor(obs, dtype=torch.float32)[None])[0].numpy()
    finally:
        torch.randn = orig  # type: ignore[assignment]
    assert np.allclose(fast, slow, atol=1e-5)
    assert np.all(np.abs(fast) <= 1.0)


@pytest.mark.parametrize("kind", ["ddpg", "gddpg"])
def test_short_training_learns_water_filling_and_round_trips(kind: str, tmp_path) -> None:
    # a few hundred steps of tiny nets: enough to move off the random start (the bench of record
    # trains the full-size actors to the optimum's neighbourhood)
    cfg = RLConfig(seed=0, total_steps=400, learning_starts=100, batch_size=32, hidden=64, eval_every=400,
                   eval_episodes=32, actor_lr=1e-3, critic_lr=3e-3)
    fn = train if kind == "ddpg" else train_gddpg
    res = fn(lambda s: WaterFillingEnv(seed=0), cfg, info_keys=("ratio_to_optimum",))
    first, last = res.curve[0]["ratio_to_optimum"], res.curve[-1]["ratio_to_optimum"]
    assert last > first + 0.03, (first, last)
    obs = WaterFillingEnv(seed=0).reset(seed=5)[0]
    res.policy.reseed(1)
    a = res.policy.decide(obs)
    assert a.shape == (5,) and np.all(np.abs(a) <= 1.0)
    loaded = Policy.from_pretrained(res.policy.save_pretrained(tmp_path / kind), seed=1)
    assert loaded.kind == ("mlp" if kind == "ddpg" else "diffusion")
    assert np.allclose(loaded.decide(obs), a)


def test_mlp_policy_is_deterministic_and_batches() -> None:
    torch.manual_seed(0)
    p = Policy(MLPActor(4, 2, RLConfig(hidden=16)), RLConfig(hidden=16), 4, 2)
    x = np.ones((3, 4))
    assert p.decide(x).shape == (3, 2)
    assert np.allclose(p.decide(x[0]), p.decide(x)[0], atol=1e-6)
    with pytest.raises(ValueError, match="not a saved"):
        Policy.from_pretrained("/nonexistent")


@pytest.mark.parametrize("actor_cls", [MLPActor, DiffusionActor])
def test_action_penalty_pulls_a_saturated_actor_back_where_the_squash_passes_gradient(actor_cls) -> None:
    # an actor pushed far past the box's edge: its last layer's bias at +6 on every entry
    torch.manual_seed(0)
    cfg = RLConfig(hidden=16)
    pi = actor_cls(5, 3, cfg)
    last = [m for m in pi.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias.fill_(6.0 if actor_cls is MLPActor else -60.0)  # the diffusion net predicts eps: x0 ~ -eps
    obs = torch.randn(32, 5)
    act, pre = pi.forward_pre(obs, generator=torch.Generator().manual_seed(1))
    assert torch.all(act > 0.99) and torch.all(pre > 1.0)  # saturated
    assert torch.allclose(act, torch.tanh(pre) if actor_cls is MLPActor else pre.clamp(-1, 1))

    class Critic(torch.nn.Module):  # Q is best at a = 0.3: the critic says "come back inside"
        def forward(self, o: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            q = 10.0 - ((a - 0.3) ** 2).sum(-1)
            return q, q

    def bias_grad(penalty: float) -> torch.Tensor:
        pi.zero_grad()
        actor_loss(pi, Critic(), obs, RLConfig(hidden=16, action_penalty=penalty),
                   torch.Generator().manual_seed(1)).backward()
        return last.bias.grad.clone()

    no_fix, fix = bias_grad(0.0), bias_grad(1.0)
    # without the penalty the squash blocks the critic's pull (tanh' ~ 2e-5; the clip's is 0) ...
    assert no_fix.abs().max() < 1e-3
    # ... with it, a descent step moves the pre-squash output back toward the box (+: MLP's u = bias)
    inward = fix if actor_cls is MLPActor else -fix
    assert torch.all(inward > 1e-3)


def test_action_penalty_never_touches_an_action_inside_the_box() -> None:
    # the hinge acts only past the squash's useful range: an actor inside it gets no gradient from it
    torch.manual_seed(0)
    pi = MLPActor(5, 3, RLConfig(hidden=16))
    obs = torch.randn(32, 5)
    assert pi.forward_pre(obs)[1].abs().max() < MLPActor.pre_edge(RLConfig().action_edge)

    class Flat(torch.nn.Module):  # a critic with no opinion: only the penalty could move the actor
        def forward(self, o: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            q = 10.0 + 0.0 * a.sum(-1)
            return q, q

    actor_loss(pi, Flat(), obs, RLConfig(hidden=16, action_penalty=1.0)).backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in pi.parameters())
