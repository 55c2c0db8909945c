"""qoe live on the shipped reference family: a 3-user round, shared prefixes on the real engine."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from relaydiff.bench.qoe_live import LiveQoEConfig, run_qoe_live
from relaydiff.bench.qoe_pool import pool_scenes
from relaydiff.sched.rl.ddpg import Policy, RLConfig
from relaydiff.sched.rl.gddpg import DiffusionActor
from relaydiff.sim.qoe_env import PROMPT_POOL, QoEEnv


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["exact", "cap"])
def test_live_round_runs_groups_on_the_engine_and_scores_real_images(tmp_path, rule) -> None:
    torch.manual_seed(0)
    env = QoEEnv(k_min=3, k_max=3, shared_steps_rule=rule)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    cfg = RLConfig(hidden=32)
    Policy(DiffusionActor(obs_dim, act_dim, cfg), cfg, obs_dim, act_dim).save_pretrained(tmp_path / "pol")
    # round 2: one group of three, cap 8, where the exact choice for equal shares is 6
    report = run_qoe_live(LiveQoEConfig(policy=str(tmp_path / "pol"), k_min=3, k_max=3, seed=2, shared_steps_rule=rule,
                                        out=str(tmp_path / "out")), say=lambda s: None)
    env.reset(seed=2)
    if rule == "cap":  # the service's rule: every group at its cap, whatever the shares
        assert [g["shared_steps"] for g in report["groups"]] == [int(c) for c in env.round.caps] == [8]
    else:
        assert all(g["shared_steps"] <= g["cap"] for g in report["groups"])
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
    Policy(DiffusionActor(10, 9, cfg), cfg, 10, 9).save_pretrained(tmp_path / "learned")  # 3 blocks of k_max = 3
    with pytest.raises(ValueError, match="no shared_steps_rule applies"):
        run_qoe_live(LiveQoEConfig(policy=str(tmp_path / "learned"), k_min=3, k_max=3, shared_steps_rule="cap",
                                   out=str(tmp_path / "out")))


def test_pool_scenes_rebuild_every_shipped_prompt() -> None:
    assert set(pool_scenes()) == set(json.loads(PROMPT_POOL.read_text())["prompts"])


def test_pairs_summary_is_paired_and_apart_for_identical_prompts() -> None:
    from relaydiff.bench.qoe_pairs import at_cap, by_topic, PairsConfig, summarize
    from relaydiff.system.grouping import SharingCost

    shared = (0, 4, 20)
    rows = [{"similarity": 0.82, "same_prompt": False, "same_topic": False, "cap": 4, "fidelity": [0.8, 0.8, 0.4]},
            {"similarity": 0.84, "same_prompt": False, "same_topic": False, "cap": 4, "fidelity": [0.6, 0.5, 0.2]},
            {"similarity": 0.95, "same_prompt": False, "same_topic": True, "cap": 20, "fidelity": [1.0, 1.0, 1.0]},
            {"similarity": 1.0, "same_prompt": True, "same_topic": True, "cap": 20, "fidelity": [0.9, 0.9, 0.9]}]
    cost = SharingCost(np.array([0.0, 1.0]), np.array([0.0, 20.0]), np.array([[1.0, 0.9]]), 20)
    bins = {b["bin"]: b for b in summarize(rows, shared, cost)}
    assert set(bins) == {"same prompt as the leader", "[0.80, 0.85)", "[0.90, 1.00]"}
    b = bins["[0.80, 0.85)"]
    assert b["n"] == 2 and b["fidelity"] == pytest.approx([0.7, 0.65, 0.3])
    assert b["change_from_0"] == pytest.approx([0.0, -0.05, -0.4]) and b["change_se"][2] == pytest.approx(0.0)
    assert b["retention"] == pytest.approx([1.0, 0.65 / 0.7, 0.3 / 0.7]) and b["retention_curves"] == pytest.approx([1.0, 0.98, 0.9])
    cap = at_cap(rows, shared)  # the three followers of another prompt, each at its own group's cap
    assert cap["n"] == 3 and cap["at_cap"]["fidelity"] == pytest.approx((0.8 + 0.5 + 1.0) / 3)
    assert cap["at_T"]["change"] == pytest.approx((-0.4 - 0.4 + 0.0) / 3)
    topics = by_topic(rows, shared, cost)  # identical prompts apart; the other two by their leader's topic
    assert topics["other_topic"]["n"] == 2 and topics["other_topic"]["retention"] == pytest.approx(b["retention"])
    assert topics["same_topic"]["n"] == 1 and topics["same_topic"]["at_cap"]["at_T"]["change"] == 0.0
    with pytest.raises(ValueError, match="start at 0"):
        PairsConfig(shared=(2, 4))


@pytest.mark.slow
def test_pairs_run_the_envs_groups_on_the_engine(tmp_path) -> None:
    from relaydiff.bench.qoe_pairs import measure_pairs, PairsConfig

    report = measure_pairs(PairsConfig(rounds=1, shared=(0, 20), out=str(tmp_path / "p.json")), say=lambda s: None)
    assert report["followers"] == len(report["rows"]) > 0 == report["rows"][0]["round"]
    assert sum(b["n"] for b in report["bins"]) == report["followers"]
    for row in report["rows"]:
        assert len(row["fidelity"]) == 2 and all(0.0 <= f <= 1.0 for f in row["fidelity"])
    assert json.loads((tmp_path / "p.json").read_text())["followers"] == report["followers"]


def test_live_chains_run_at_the_guidance_of_the_curves() -> None:
    from relaydiff.bench.qoe_live import curves_guidance
    from relaydiff.system.grouping import load_sharing_cost
    from relaydiff.system.quality import REFERENCE_TABLE

    cost = load_sharing_cost()
    assert cost.guidance == json.loads(REFERENCE_TABLE.read_text())["config"]["guidance"]
    assert curves_guidance(None, cost) == cost.guidance and curves_guidance(5.0, cost) == 5.0
    with pytest.raises(ValueError, match="guidance"):
        curves_guidance(None, dataclasses.replace(cost, guidance=None))


def test_live_rounds_summary_pairs_the_arms() -> None:
    from relaydiff.bench.qoe_live import summarize_rounds

    rows = {"capped": [{"qoe": 10.0, "qoe_predicted": 11.0, "unet_evals_saved": 0.1},
                       {"qoe": 20.0, "qoe_predicted": 20.0, "unet_evals_saved": 0.2}],
            "uncapped": [{"qoe": 9.0, "qoe_predicted": 12.0, "unet_evals_saved": 0.5},
                         {"qoe": 21.0, "qoe_predicted": 25.0, "unet_evals_saved": 0.4}]}
    s = summarize_rounds(rows)
    assert s["capped"]["gap_mean"] == pytest.approx(-0.5) and s["uncapped"]["gap_mean"] == pytest.approx(-3.5)
    assert s["capped"]["unet_evals_saved_mean"] == pytest.approx(0.15) and s["uncapped"]["rounds"] == 2
    assert s["capped_minus_uncapped_qoe"]["per_round"] == pytest.approx([1.0, -1.0])
    assert s["capped_minus_uncapped_qoe"]["mean"] == pytest.approx(0.0)
    rows["service_rule"] = [{"qoe": 12.0, "qoe_predicted": 11.0, "unet_evals_saved": 0.3},
                            {"qoe": 19.0, "qoe_predicted": 20.0, "unet_evals_saved": 0.3}]
    assert summarize_rounds(rows)["service_rule_minus_capped_qoe"]["per_round"] == pytest.approx([2.0, -1.0])
