"""The DRL + convex solver: shipped policy, numpy export, optimality on small seeded rounds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from relaydiff.sched.baselines import random_policy
from relaydiff.sched.drl.policy import DEFAULT_POLICY, NumpyPolicy, PolicyError, load_policy, solve_drl
from relaydiff.sched.drl.train import policy_from_sb3
from relaydiff.sched.exact import solve_exact
from relaydiff.sched.registry import get_solver
from relaydiff.sim.round_env import OffloadRoundEnv, RoundEnvConfig, SequentialRound, obs_size
from relaydiff.system.problem import evaluate, sample_instance
from relaydiff.system.scenario import load_scenario

DEFAULT = load_scenario("default")  # resolved once, as the CLI does


def test_shipped_policy_loads_and_is_small():
    pol = load_policy()
    assert pol.n_splits == 5
    assert pol.weights[0].shape[1] == obs_size(5)
    size = DEFAULT_POLICY.with_suffix(".safetensors").stat().st_size
    assert size < 200_000
    assert "trained_timesteps" in pol.meta


def test_policy_beats_random_and_nears_the_optimum():
    ratios, vs_random = [], []
    for seed in range(6):
        inst = sample_instance(DEFAULT, n_users=8, seed=100 + seed)
        sol = solve_drl(inst)
        obj, br = evaluate(inst, sol.decision)
        assert obj == pytest.approx(sol.objective)
        assert br.bandwidth.sum() == pytest.approx(1.0) or not br.admitted.any()
        ratios.append(sol.objective / solve_exact(inst).objective)
        vs_random.append(sol.objective - random_policy(inst, seed).objective)
    assert min(vs_random) > 0
    assert np.mean(ratios) >= 0.98
    assert max(ratios) <= 1.0 + 1e-9


def test_polish_never_hurts_and_registry_names():
    inst = sample_instance(DEFAULT, n_users=40, seed=9)
    plain, polished = get_solver("drl")(inst), get_solver("drl+ls")(inst)
    assert polished.objective >= plain.objective - 1e-12
    assert (plain.decision.k > 0).sum() <= inst.max_batch


def test_numpy_export_matches_torch_policy(tmp_path):
    import torch
    from sb3_contrib import MaskablePPO

    torch.manual_seed(0)
    env = OffloadRoundEnv(RoundEnvConfig(n_min=5, n_max=30))
    model = MaskablePPO("MlpPolicy", env, seed=0, device="cpu",
                        policy_kwargs={"net_arch": {"pi": [16, 16], "vf": [16]}, "activation_fn": torch.nn.Tanh})
    for p in model.policy.action_net.parameters():  # make the logits far from uniform
        torch.nn.init.normal_(p, std=1.0)
    pol = policy_from_sb3(model)
    pol.save_pretrained(tmp_path / "p")
    pol = NumpyPolicy.from_pretrained(tmp_path / "p.json")
    obs, _ = env.reset(seed=1)
    while True:
        mask = env.action_masks()
        a_torch, _ = model.predict(obs, action_masks=mask, deterministic=True)
        assert pol.act(obs, mask) == int(a_torch)
        obs, _, term, _, _ = env.step(int(a_torch))
        if term:
            break


def test_policy_file_errors(tmp_path):
    with pytest.raises(PolicyError, match="not found"):
        NumpyPolicy.from_pretrained(tmp_path / "missing")
    pol = load_policy()
    pol.save_pretrained(tmp_path / "p")
    cfg = json.loads((tmp_path / "p.json").read_text())
    (tmp_path / "p.json").write_text(json.dumps({**cfg, "format": "other"}))
    with pytest.raises(PolicyError, match="format"):
        NumpyPolicy.from_pretrained(tmp_path / "p")
    with pytest.raises(PolicyError, match="inputs"):
        NumpyPolicy(pol.weights, pol.biases, n_splits=4)


def test_policy_rejects_other_split_count():
    from dataclasses import replace

    inst = sample_instance(DEFAULT, n_users=6, seed=0)
    other = replace(inst, splits=np.array([5, 10, 20]))
    with pytest.raises(PolicyError, match="split points"):
        solve_drl(other)


def test_large_round_runs():
    inst = sample_instance(DEFAULT, n_users=1000, seed=0)
    sol = solve_drl(inst)
    assert (sol.decision.k > 0).sum() <= inst.max_batch
    assert sol.info["decisions"] <= inst.n_users
    rnd = SequentialRound(inst)
    assert not rnd.done
