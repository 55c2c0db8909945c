"""bench qoe's pieces that run in seconds, and its command line's error path."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from relaydiff.bench.qoe import EVAL_SEED, QoEBenchConfig, _bootstrap_ci, _equal_split_ratio, _rollout, decide_ms
from relaydiff.cli import app
from relaydiff.sim.qoe_env import QoEEnv


def test_rollout_is_paired_over_fixed_rounds() -> None:
    env = QoEEnv(k_min=4, k_max=6)
    a = _rollout(lambda o: env.heuristic_action("equal"), env, 3)
    b = _rollout(lambda o: env.heuristic_action("equal"), QoEEnv(k_min=4, k_max=6), 3)
    assert a["per_round"]["qoe"] == b["per_round"]["qoe"] and len(a["per_round"]["qoe"]) == 3
    learned = QoEEnv(k_min=4, k_max=6, learned_shared_steps=True, share_retention=None)
    full = _rollout(lambda o: np.ones(learned.action_space.shape, np.float32), learned, 3)
    assert all(s == learned.steps for _, s in full["pairs"])  # every shared group at s = T (no cap)
    assert np.mean(full["per_round"]["unet_evals_saved"]) > 0
    assert full["per_round"]["action_saturation"] == [1.0, 1.0, 1.0]  # every used entry at the box's edge
    mid = _rollout(lambda o: np.zeros(env.action_space.shape, np.float32), env, 2)
    assert mid["per_round"]["action_saturation"] == [0.0, 0.0]
    # the default decoding: the pairs are the env's exact choice for the policy's shares
    env.reset(seed=EVAL_SEED)
    bw, cp, _ = env.decode_action(np.zeros(env.action_space.shape))
    exact = env.best_shared_steps(bw, cp)
    g = env.round.groups
    assert [s for _, s in mid["pairs"][: sum(g.sizes() > 1)]] == [int(exact[j]) for j in range(g.n_groups) if g.sizes()[j] > 1]


def test_bootstrap_ci_and_timing_helpers() -> None:
    lo, hi = _bootstrap_ci(np.array([0.1, 0.2, 0.3, 0.4]), np.random.default_rng(0))
    assert 0.1 <= lo < 0.25 < hi <= 0.4
    assert decide_ms(lambda o: o * 2, [np.zeros(3)] * 10) >= 0
    assert 0.5 < _equal_split_ratio(8) < 1.0


def test_bench_qoe_rejects_bad_options() -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["bench", "qoe", "--seeds", "1"])
    assert r.exit_code == 2 and "seeds must be >= 2" in r.output
    r = runner.invoke(app, ["bench", "qoe", "--scenario", "no-such-scenario"])
    assert r.exit_code == 2 and "not found" in r.output
    r = runner.invoke(app, ["bench", "qoe", "--action-penalty", "-1"])
    assert r.exit_code == 2 and "action_penalty must be >= 0" in r.output
    try:
        QoEBenchConfig(k_min=5, k_max=3)
    except ValueError as exc:
        assert "k_min" in str(exc)
    else:
        raise AssertionError("k_min > k_max accepted")


def test_resume_reuses_only_runs_made_with_the_same_settings(tmp_path) -> None:
    import json

    from relaydiff.bench.qoe import _load_run, _run_settings

    cfg = QoEBenchConfig(steps=100, out=str(tmp_path))
    settings = _run_settings(cfg)
    assert settings == _run_settings(QoEBenchConfig(steps=100, out="elsewhere", workers=2, resume=True))
    path = tmp_path / "ddpg_seed0.json"
    path.write_text(json.dumps({"name": "ddpg", "seed": 0, "wall_s": 1.0, "settings": settings}))
    assert _load_run(path, settings) == {"name": "ddpg", "seed": 0, "wall_s": 1.0}
    assert _load_run(path, _run_settings(QoEBenchConfig(steps=200))) is None
    path.write_text("not json")
    assert _load_run(path, settings) is None and _load_run(tmp_path / "missing.json", settings) is None


def test_saturation_plot_draws_every_variant(tmp_path) -> None:
    from relaydiff.bench.qoe_saturation import plot

    curve = [{"step": float(s), "return": 70.0 + s / 100, "action_saturation": min(1.0, s / 1000)} for s in (0, 500, 1000)]
    runs = [{"algo": a, "decoding": d, "action_penalty": p, "curve": curve}
            for a in ("ddpg", "gddpg") for d, p in (("learned", 0.0), ("exact", 0.1))]
    path = plot({"runs": runs, "bench_config": {"eval_rounds": 64}, "heuristics": {"equal, exact s": 72.0}},
                tmp_path / "sat.png")
    assert path.is_file() and path.stat().st_size > 1000


def test_waterfill_trains_with_its_own_action_penalty(monkeypatch) -> None:
    """Water-filling's optimum is on the action box's edge: its runs take waterfill_action_penalty
    (default 0, the plain loss), the QoE runs action_penalty."""
    import relaydiff.bench.qoe as bq

    seen = {}

    def fake(name):
        def run(make_env, rl, **kw):
            seen[name] = rl.action_penalty
            return SimpleNamespace(curve=[{"ratio_to_optimum": 1.0}], wall_s=0.0)
        return run

    monkeypatch.setattr(bq, "train", fake("ddpg"))
    monkeypatch.setattr(bq, "train_gddpg", fake("gddpg"))
    cfg = QoEBenchConfig(action_penalty=0.7)
    for name in ("waterfill_ddpg", "waterfill_gddpg"):
        assert bq._train_one((name, cfg, 0))["ratio"] == 1.0
    assert seen == {"ddpg": 0.0, "gddpg": 0.0}
    bq._train_one(("waterfill_gddpg", replace(cfg, waterfill_action_penalty=0.5), 0))
    assert seen["gddpg"] == 0.5
    with pytest.raises(ValueError, match="waterfill_action_penalty must be >= 0"):
        QoEBenchConfig(waterfill_action_penalty=-1)


def test_a_tiny_bench_reports_the_service_rule_and_the_bound(tmp_path) -> None:
    """The whole bench on a few rounds: the sharing section carries the same policies' shares under
    the service's rule (every group at its cap), and the bound is at least every heuristic."""
    from relaydiff.bench.qoe import bench_qoe

    cfg = QoEBenchConfig(seeds=2, steps=40, waterfill_steps=40, eval_rounds=3, eval_every=20, k_min=6, k_max=8,
                         sb3=False, batch_size=8, out=str(tmp_path))
    report = bench_qoe(cfg)
    rule, exact = report["sharing"]["service_rule"], report["sharing"]
    assert rule["unet_evals_saved"] >= exact["unet_evals_saved"]  # the cap is the most a group may share
    assert "service_rule_sharing_saves>=0.30_at_qoe_loss<=0.01" in report["targets"]
    bound, algos = report["bound"], report["algorithms"]
    assert all(bound["qoe_mean"] >= algos[h]["qoe_mean"] - 1e-9 for h in ("equal", "proportional", "sqrt"))
    lo, hi = bound["over_equal"]["ci95"]
    assert 0.0 <= lo <= bound["over_equal"]["gain"] <= hi
    assert bound["max_gain_over_ddpg"] == pytest.approx(bound["qoe_mean"] / algos["ddpg"]["qoe_mean"] - 1.0)
    assert algos["bound"]["qoe_mean"] == bound["qoe_mean"]
    with pytest.raises(ValueError, match="unknown shared_steps_rule"):
        QoEBenchConfig(shared_steps_rule="greedy")
    with pytest.raises(ValueError, match="no shared_steps_rule applies"):
        QoEBenchConfig(shared_steps_rule="cap", learned_shared_steps=True)
    runner = CliRunner()
    r = runner.invoke(app, ["bench", "qoe", "--shared-steps-rule", "nope"])
    assert r.exit_code == 2 and "unknown shared_steps_rule" in r.output
