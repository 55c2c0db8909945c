"""qoe live on the shipped reference family: a 3-user round, shared prefixes on the real engine."""

from __future__ import annotations

import json

import pytest
import torch

from relaydiff.bench.qoe_live import LiveQoEConfig, run_qoe_live
from relaydiff.bench.qoe_pool import pool_scenes
from relaydiff.sched.rl.ddpg import Policy, RLConfig
from relaydiff.sched.rl.gddpg import DiffusionActor
from relaydiff.sim.qoe_env import PROMPT_POOL, QoEEnv


@pytest.mark.slow
def test_live_round_runs_groups_on_the_engine_and_scores_real_images(tmp_path) -> None:
    torch.manual_seed(0)
    env = QoEEnv(k_min=3, k_max=3)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    cfg = RLConfig(hidden=32)
    Policy(DiffusionActor(obs_dim, act_dim, cfg), cfg, obs_dim, act_dim).save_pretrained(tmp_path / "pol")
    report = run_qoe_live(LiveQoEConfig(policy=str(tmp_path / "pol"), k_min=3, k_max=3, seed=1, out=str(tmp_path / "out")),
                          say=lambda s: None)
    assert report["users"] == 3 and sum(len(g["users"]) for g in report["groups"]) == 3
    # the engine's own accounting agrees with the system model's count of chain-steps (x2: CFG)
    assert report["unet_evals_unshared"] == 2 * 3 * env.steps
    assert report["unet_evals_saved"] == pytest.approx(report["unet_evals_saved_predicted"])
    for g in report["groups"]:
        for u in g["users"]:
            assert 0.0 <= u["fidelity"] <= 1.0 and 1.0 <= u["score"] <= 10.0
        assert (tmp_path / "out" / g["image_strip"].split("/")[-1]).is_file()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["qoe"] == pytest.approx(report["qoe"])


def test_live_round_rejects_a_policy_of_another_size(tmp_path) -> None:
    cfg = RLConfig(hidden=8)
    Policy(DiffusionActor(10, 3, cfg), cfg, 10, 3).save_pretrained(tmp_path / "pol")
    with pytest.raises(ValueError, match="another round size"):
        run_qoe_live(LiveQoEConfig(policy=str(tmp_path / "pol"), k_min=3, k_max=3, out=str(tmp_path / "out")))


def test_pool_scenes_rebuild_every_shipped_prompt() -> None:
    assert set(pool_scenes()) == set(json.loads(PROMPT_POOL.read_text())["prompts"])
