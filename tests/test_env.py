"""The Gymnasium environments: API (env checker), masking, rewards = exact objective changes."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from relaydiff.sched.baselines import greedy
from relaydiff.sim.round_env import OffloadRoundEnv, RoundEnvConfig, SequentialRound
from relaydiff.sim.scenario_env import Dynamics, ScenarioEnv
from relaydiff.system.problem import Decision, evaluate, objective_value, sample_instance
from relaydiff.system.scenario import load_scenario

DEFAULT = load_scenario("default")  # resolved once, as the CLI does


def _play(rnd: SequentialRound, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray, float]]:
    out = []
    while not rnd.done:
        mask = rnd.mask()
        gains = rnd.gains().copy()
        a = int(rng.choice(np.flatnonzero(mask)))
        out.append((gains, mask, rnd.step(a)))
    return out


def test_round_env_passes_env_checker():
    env = OffloadRoundEnv(RoundEnvConfig(n_min=3, n_max=25))
    check_env(env.unwrapped, skip_render_check=True)


def test_scenario_env_passes_env_checker():
    env = ScenarioEnv("default", Dynamics(rounds=4, population=30, arrival_mean=6, n_max=24))
    check_env(env.unwrapped, skip_render_check=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gains_are_exact_objective_changes(seed):
    inst = sample_instance(DEFAULT, n_users=24, seed=seed)
    rnd = SequentialRound(inst)
    rng = np.random.default_rng(seed)
    base = objective_value(inst, np.zeros(inst.n_users, dtype=np.int64))
    while not rnd.done:
        i, gains = rnd.user, rnd.gains().copy()
        before = objective_value(inst, rnd.k)
        for o in range(len(inst.options)):  # every option's gain, checked against the objective
            k = rnd.k.copy()
            k[i] = inst.options[o]
            if (k > 0).sum() <= inst.max_batch:
                assert objective_value(inst, k) - before == pytest.approx(gains[o], abs=1e-9)
        rnd.step(int(rng.choice(np.flatnonzero(rnd.mask()))))
    obj, _ = evaluate(inst, Decision(rnd.k))
    assert base + rnd.total_gain == pytest.approx(obj, abs=1e-9)


def test_masks_are_capacity_and_dominance():
    inst = sample_instance(DEFAULT, n_users=40, seed=3)  # more users than the edge holds
    assert inst.n_users > inst.max_batch
    rnd = SequentialRound(inst)
    rng = np.random.default_rng(0)
    for gains, mask, _ in _play(rnd, rng):
        assert mask[0]
        np.testing.assert_array_equal(mask[1:], gains[1:] >= 0)
        assert mask[1:].any()  # a visited user always has a real choice
    assert (rnd.k > 0).sum() <= inst.max_batch
    # capacity: once the edge is full the round is over and only "local" is left
    full = SequentialRound(inst)
    while not full.done:
        full.step(int(np.flatnonzero(full.mask())[-1]))
    assert (full.k > 0).sum() == inst.max_batch
    assert full.mask().tolist() == [True] + [False] * len(inst.splits)


def test_dominated_options_never_help():
    """A masked (negative-gain) option stays worse than local in every completion (tiny brute force)."""
    inst = sample_instance(DEFAULT, n_users=6, seed=11)
    rnd = SequentialRound(inst)
    first = rnd.user
    rnd.step(rnd.greedy_option())
    if rnd.done:
        pytest.skip("round ended after one user")
    i = rnd.user
    masked = np.flatnonzero(~rnd.mask())
    undecided = [u for u in range(inst.n_users) if u not in (first, i)]
    for o in masked:
        for rest in itertools.product(range(len(inst.options)), repeat=len(undecided)):
            k = rnd.k.copy()
            k[undecided] = inst.options[list(rest)]
            if (k > 0).sum() + 1 > inst.max_batch:
                continue
            with_o, with_local = k.copy(), k.copy()
            with_o[i] = inst.options[o]
            assert objective_value(inst, with_o) <= objective_value(inst, with_local) + 1e-12


def test_argmax_policy_is_global_greedy():
    for seed in range(3):
        inst = sample_instance(DEFAULT, n_users=30, seed=seed)
        rnd = SequentialRound(inst)
        while not rnd.done:
            rnd.step(rnd.greedy_option())
        assert objective_value(inst, rnd.k) == pytest.approx(greedy(inst).objective, abs=1e-9)


def test_env_return_is_objective_gain_and_bad_actions_raise():
    env = OffloadRoundEnv(RoundEnvConfig(n_min=8, n_max=20))
    obs, _ = env.reset(seed=5)
    assert env.observation_space.contains(obs)
    mask = env.action_masks()
    if not mask.all():
        with pytest.raises(ValueError, match="masked"):
            env.step(int(np.flatnonzero(~mask)[0]))
    with pytest.raises(ValueError, match="action must be"):
        env.step(env.action_space.n)
    total, term = 0.0, False
    while not term:
        obs, r, term, trunc, info = env.step(int(np.flatnonzero(env.action_masks())[-1]))
        total += r
    inst = env.round.instance
    gain = objective_value(inst, info["k"]) - objective_value(inst, np.zeros(inst.n_users, dtype=np.int64))
    assert total == pytest.approx(gain, abs=1e-9)
    with pytest.raises(RuntimeError):
        env.step(0)


def test_same_seed_same_rounds():
    a, b = OffloadRoundEnv(), OffloadRoundEnv()
    oa, _ = a.reset(seed=7)
    ob, _ = b.reset(seed=7)
    np.testing.assert_array_equal(oa, ob)


def test_scenario_env_reward_capacity_and_replay():
    dyn = Dynamics(rounds=5, population=60, arrival_mean=30, n_max=40)
    env = ScenarioEnv("default", dyn)
    env.reset(seed=1)
    inst = env.instance
    everyone = np.full(dyn.n_max, len(inst.splits))  # ask for more users than the edge holds
    _, reward, term, trunc, info = env.step(everyone)
    assert info["rejected"] == max(inst.n_users - inst.max_batch, 0)
    assert (info["k"] > 0).sum() == min(inst.n_users, inst.max_batch)
    assert reward == pytest.approx(evaluate(inst, Decision(info["k"]))[0])
    with pytest.raises(ValueError, match="option indices"):
        env.step(np.full(dyn.n_max, 99))
    # the rounds do not depend on the actions: same seed, same sequence of instances
    caps = []
    for action in (0, 1):
        env.reset(seed=2)
        seq = []
        for _ in range(dyn.rounds):
            seq.append((env.instance.n_users, env.instance.capacity, float(env.instance.spectral_eff.sum())))
            env.step(np.full(dyn.n_max, action))
        caps.append(seq)
    assert caps[0] == caps[1]
    assert len({c[1] for c in caps[0]}) > 1  # capacity fluctuates


def test_dynamics_validation():
    with pytest.raises(ValueError, match="fading_corr"):
        Dynamics(fading_corr=1.5)
    with pytest.raises(ValueError, match="arrival_mean"):
        Dynamics(arrival_mean=0)
    with pytest.raises(ValueError, match="n_min"):
        RoundEnvConfig(n_min=10, n_max=5)


def test_few_training_steps_checkpoint_and_resume(tmp_path):
    """MaskablePPO runs on the env; checkpoints are safetensors + JSON and resume continues the count."""
    from relaydiff.sched.drl.policy import NumpyPolicy
    from relaydiff.sched.drl.train import DRLConfig, train

    cfg = DRLConfig(n_min=3, n_max=12, total_timesteps=128, n_envs=2, n_steps=32, batch_size=32, n_epochs=1,
                    checkpoint_every=64, val_rounds=2, val_sizes=(6,), bc_rounds=3, bc_epochs=1)
    train(cfg, tmp_path)
    train(cfg, tmp_path / "again")  # same seed, same weights
    from safetensors.numpy import load_file

    for name in ("best.safetensors", "checkpoint/checkpoint.safetensors"):  # after PPO updates too
        a, b = load_file(str(tmp_path / name)), load_file(str(tmp_path / "again" / name))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "checkpoint" / "checkpoint.json").read_text())
    assert meta["num_timesteps"] == 128
    assert not list(tmp_path.rglob("*.zip")) and not list(tmp_path.rglob("*.pkl"))  # no pickle anywhere
    with pytest.raises(FileExistsError):
        train(cfg, tmp_path)
    longer = DRLConfig(**{**cfg.__dict__, "total_timesteps": 192})
    train(longer, tmp_path, resume=True)
    assert json.loads((tmp_path / "checkpoint" / "checkpoint.json").read_text())["num_timesteps"] == 192
    with pytest.raises(ValueError, match="n_max"):
        train(DRLConfig(**{**longer.__dict__, "n_max": 13, "total_timesteps": 256}), tmp_path, resume=True)
    pol = NumpyPolicy.from_pretrained(tmp_path / "best")
    assert pol.n_splits == 5


def test_families_are_drawn_per_episode_deterministically():
    """Domain randomization: each reset draws one of the configured families (issue 18); same seed, same rounds."""
    from relaydiff.sim.families import TRAINING_FAMILIES, get_families

    cfg = RoundEnvConfig(families="steps_10, edge_memory_4", n_min=5, n_max=40)
    env, again = OffloadRoundEnv(cfg), OffloadRoundEnv(cfg)
    steps, caps = set(), set()
    for seed in range(12):
        obs, _ = env.reset(seed=seed)
        inst = env.round.instance
        steps.add(inst.steps)
        caps.add(inst.max_batch)
        np.testing.assert_array_equal(obs, again.reset(seed=seed)[0])
        assert env.observation_space.contains(obs)
    assert steps == {10, 20}  # both families drawn: steps_10's chains and edge_memory_4's default ones
    assert 4 in caps
    with pytest.raises(ValueError, match="unknown families"):
        RoundEnvConfig(families="default,nope")
    assert len(get_families(list(TRAINING_FAMILIES))) == len(set(TRAINING_FAMILIES))  # all known, no repeats


def test_training_on_families_records_them_and_validates_on_them(tmp_path):
    """DRLConfig.families reaches the env, the imitation rounds and the validation set; the policy's metadata names them."""
    from relaydiff.sched.drl.policy import NumpyPolicy
    from relaydiff.sched.drl.train import DRLConfig, _validation_set, train

    cfg = DRLConfig(families="steps_10,tiny_edge_share", n_min=3, n_max=12, total_timesteps=64, n_envs=2, n_steps=32,
                    batch_size=32, n_epochs=1, checkpoint_every=64, val_rounds=4, val_sizes=(6,), bc_rounds=3, bc_epochs=1)
    val = _validation_set(cfg)
    assert sorted(inst.steps for inst in val) == [10, 10, 20, 20]
    assert max(inst.capacity for inst in val if inst.steps == 20) <= 0.1  # tiny_edge_share's compute share
    train(cfg, tmp_path)
    meta = NumpyPolicy.from_pretrained(tmp_path / "best").meta
    assert meta["config"]["families"] == "steps_10,tiny_edge_share"
    with pytest.raises(ValueError, match="unknown families"):
        DRLConfig(families="nope")
