"""Grouping, sharing cost, the QoE env and the surrogate agent (all numpy, fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from relaydiff.sim.agents import Perception, SurrogateAgent
from relaydiff.sim.qoe_env import HEURISTICS, PromptPool, QoEEnv, share_action, softmax_shares
from relaydiff.system.grouping import (_non_increasing, chain_owners, group_prompts, Groups, load_sharing_cost, same_prompt_followers,
                                       SHARE_RETENTION, shared_steps_caps, SharingCost)
from relaydiff.system.quality import REFERENCE_TABLE, QualityTableError


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_grouping_is_complete_linkage_with_medoid_leaders() -> None:
    rng = np.random.default_rng(0)
    centers = _unit(rng.normal(size=(3, 16)))
    emb = _unit(np.repeat(centers, 4, axis=0) + 0.05 * rng.normal(size=(12, 16)))
    g = group_prompts(emb, threshold=0.9)
    assert g.n_groups == 3 and sorted(g.sizes()) == [4, 4, 4]
    sim = emb @ emb.T
    for j in range(g.n_groups):
        m = g.members(j)
        assert sim[np.ix_(m, m)].min() >= 0.9 - 1e-9  # complete linkage: every pair
        assert g.leader[j] in m and g.similarity[g.leader[j]] == pytest.approx(1.0)
    # a cap splits a cluster; a threshold of 1.01 leaves everyone alone
    assert group_prompts(emb, threshold=0.9, max_group=2).sizes().max() == 2
    assert group_prompts(emb, threshold=1.01).n_groups == 12
    assert group_prompts(emb[:1]).n_groups == 1
    with pytest.raises(ValueError):
        group_prompts(np.zeros((0, 3)))


def test_grouping_runs_a_prompt_once_per_group() -> None:
    """With the prompts, the distinct prompts are clustered (max_group of them a group), every user
    joins its prompt's group, and a copy receives the continuation of the first member who sent
    its prompt (chain_owners)."""
    rng = np.random.default_rng(1)
    center = _unit(rng.normal(size=(1, 16)))
    emb = _unit(np.repeat(center, 6, axis=0) + 0.02 * rng.normal(size=(6, 16)))  # all six pairwise similar
    emb[3] = emb[0]  # users 0 and 3 sent the same prompt, so did 2 and 5
    emb[5] = emb[2]
    prompts = ["a", "b", "c", "a", "d", "c"]
    g = group_prompts(emb, threshold=0.9, prompts=prompts)
    assert g.n_groups == 1 and g.leader[0] in (0, 1, 2, 4)  # a leader is its prompt's first user
    assert chain_owners(g, prompts).tolist() == [0, 1, 2, 0, 4, 2]
    lead = prompts[g.leader[0]]
    assert all((g.similarity[i] == 1.0) == (p == lead) for i, p in enumerate(prompts))
    # max_group counts distinct prompts; copies stay with their prompt
    two = group_prompts(emb, threshold=0.9, max_group=2, prompts=prompts)
    assert two.n_groups == 2 and all(len({two.label[i] for i, p in enumerate(prompts) if p == q}) == 1 for q in "abcd")
    assert sorted(len({prompts[i] for i in two.members(j)}) for j in range(2)) == [2, 2]
    assert chain_owners(two, prompts).tolist() == [0, 1, 2, 0, 4, 2]
    # without the prompts every user is clustered (copies count towards max_group), and none is a copy
    assert group_prompts(emb, threshold=0.9, max_group=2).n_groups == 3
    assert group_prompts(emb[[0] * 5], prompts=["a"] * 5).sizes().tolist() == [5]
    with pytest.raises(ValueError, match="prompts"):
        group_prompts(emb, prompts=prompts[:2])
    with pytest.raises(ValueError, match="prompts"):
        chain_owners(g, prompts[:2])


def test_a_prompt_runs_once_per_group_in_the_env() -> None:
    """Copies of a prompt cost no U-Net evaluation at any s, get their prompt's first sender's
    fidelity and edge time; with sharing off every user runs its own chain."""
    env, off = QoEEnv(), QoEEnv(allow_sharing=False)
    copies = 0
    for j in range(6):
        env.reset(seed=10_000 + j)
        off.reset(seed=10_000 + j)
        r, g = env.round, env.round.groups
        owner = r.owner
        assert np.array_equal(owner, chain_owners(g, r.prompts)) and np.array_equal(off.round.owner, np.arange(r.k))
        assert all(r.prompts[i] == r.prompts[o] and g.label[i] == g.label[o] for i, o in enumerate(owner))
        n_copies = int(np.sum(owner != np.arange(r.k)))
        copies += n_copies
        bw, cp, s = env.decode_action(env.heuristic_action("equal"))
        out = env.outcome(bw, cp, s)
        chains = np.array([len(set(owner[g.members(k)])) for k in range(g.n_groups)])
        assert out.unet_chain_steps == int(np.sum(s + chains * (env.steps - s)))
        zero = env.outcome(bw, cp, np.zeros_like(s))
        assert zero.unet_chain_steps == (r.k - n_copies) * env.steps  # s = 0: only the copies are saved
        assert np.allclose(out.fidelity, out.fidelity[owner])
        edge = out.latency_s - r.uplink_s - r.decode_s - 8.0 * env.scenario.payload.latent_bytes / (
            bw * env.scenario.wireless.bandwidth_hz * r.spectral_eff)
        assert np.allclose(edge, edge[owner])
        assert off.outcome(bw, cp, np.zeros_like(s)).unet_chain_steps == r.k * env.steps
    assert copies > 0


def test_sharing_cost_comes_from_the_measured_curves() -> None:
    cost = load_sharing_cost()
    data = json.loads(REFERENCE_TABLE.read_text())["shared_prefix"]["bins"]
    assert cost.retention.shape == (len(data), len(data[0]["shared_steps"]))
    assert np.all(cost.retention[:, 0] == 1.0) and np.all(np.diff(cost.retention, axis=1) <= 1e-12)
    # the last bin's retention at s = T is its measured (smoothed) end over its start
    f = _non_increasing(np.asarray(data[-1]["fidelity"]))
    inside = float(np.mean(data[-1]["similarity"]))  # a similarity inside the last bin
    assert cost.retain(inside, 20.0) == pytest.approx(f[-1] / f[0])
    assert cost.retain(inside, 0.0) == 1.0
    assert np.allclose(_non_increasing(np.array([1.0, 2.0, 0.5])), [1.5, 1.5, 0.5])


def test_sharing_cost_rejects_a_table_without_shared_prefix(tmp_path) -> None:
    p = tmp_path / "q.json"
    p.write_text(json.dumps({"relay": []}))
    with pytest.raises(QualityTableError, match="shared_prefix"):
        load_sharing_cost(p)


def test_share_actions_round_trip() -> None:
    s = np.array([0.5, 0.3, 0.2])
    assert np.allclose(softmax_shares(share_action(s)), s)


@pytest.mark.parametrize("learned,rule", [(False, "exact"), (True, "exact"), (False, "cap")])
def test_qoe_env_passes_check_env_and_is_deterministic(learned: bool, rule: str) -> None:
    env = QoEEnv(k_min=5, k_max=8, learned_shared_steps=learned, shared_steps_rule=rule)
    check_env(env, skip_render_check=True)
    assert env.action_space.shape == ((3 if learned else 2) * 8,)
    a = np.random.default_rng(0).uniform(-1, 1, env.action_space.shape).astype(np.float32)
    o1, _ = env.reset(seed=4)
    r1 = env.step(a)[1]
    other = QoEEnv(k_min=5, k_max=8, learned_shared_steps=learned, shared_steps_rule=rule)
    o2, _ = other.reset(seed=4)
    assert np.array_equal(o1, o2) and other.step(a)[1] == r1
    assert not np.array_equal(o1, env.reset(seed=5)[0])


def test_sharing_saves_edge_work_and_costs_followers_fidelity() -> None:
    env = QoEEnv(k_min=12, k_max=12, topics_per_user=0.2)
    env.reset(seed=1)
    g = env.round.groups
    assert g.sizes().max() >= 2
    bw, cp, _ = env.decode_action(env.heuristic_action("sqrt"))
    none = env.outcome(bw, cp, np.zeros(g.n_groups, dtype=int))
    full = env.outcome(bw, cp, np.where(g.sizes() > 1, env.steps, 0))
    copies = int(np.sum(env.round.owner != np.arange(12)))  # a prompt runs once per group, even at s = 0
    assert copies and none.unet_chain_steps == none.unet_chain_steps_unshared - copies * env.steps
    assert none.unet_chain_steps_unshared == 12 * env.steps
    saved = int(np.sum((g.sizes() - 1) * env.steps))
    assert full.unet_chain_steps == none.unet_chain_steps_unshared - saved
    assert full.edge_energy_j < none.edge_energy_j
    followers = np.setdiff1d(np.arange(12), g.leader)
    shared_followers = followers[g.sizes()[g.label[followers]] > 1]
    other, same = shared_followers[~env.round.same_prompt[shared_followers]], shared_followers[env.round.same_prompt[shared_followers]]
    assert other.size and same.size
    assert np.all(full.fidelity[other] < none.fidelity[other])
    assert np.allclose(full.fidelity[same], none.fidelity[same])  # the leader's own prompt: nothing lost
    assert np.allclose(full.fidelity[g.leader], none.fidelity[g.leader])
    # pooled prefix compute: every member of a group of several prompts finishes earlier (a group of
    # one prompt's copies already runs once on their pooled share at s = 0)
    chains = np.array([len(set(env.round.owner[g.members(k)])) for k in range(g.n_groups)])
    several = np.flatnonzero(chains[g.label] > 1)
    assert several.size and np.all(full.latency_s[several] < none.latency_s[several])
    assert np.allclose(full.latency_s[chains[g.label] == 1], none.latency_s[chains[g.label] == 1])
    # with sharing disabled the action's shared steps are ignored
    off = QoEEnv(k_min=12, k_max=12, topics_per_user=0.2, allow_sharing=False)
    off.reset(seed=1)
    assert off.step(np.ones(off.action_space.shape, np.float32))[4]["unet_evals_saved"] == 0.0


def test_best_shared_steps_is_the_per_group_optimum_and_encodes_back() -> None:
    env = QoEEnv(k_min=12, k_max=12, topics_per_user=0.2, learned_shared_steps=True)
    env.reset(seed=1)
    g = env.round.groups
    action = env.heuristic_action("sqrt")
    bw, cp, _ = env.decode_action(action)
    best = env.best_shared_steps(bw, cp)
    caps = env.round.caps
    assert np.all(best[g.sizes() < 2] == 0) and best.max() > 0 and np.all(best <= caps)
    assert np.array_equal(env.decode_action(env.shared_steps_action(action, best))[2], best)
    # the one [T + 1, K] evaluation equals trying each s through outcome() (ties to the larger s)
    multi = g.sizes() >= 2
    totals = np.stack([np.bincount(g.label, weights=env.outcome(bw, cp, np.where(multi, s, 0)).scores, minlength=g.n_groups)
                       for s in range(env.steps + 1)])
    totals[np.arange(env.steps + 1)[:, None] > caps] = -np.inf
    assert np.array_equal(best, np.where(multi, env.steps - np.argmax(totals[::-1] >= totals.max(0) - 1e-9, axis=0), 0))
    q_best = env.outcome(bw, cp, best).scores.sum()
    rng = np.random.default_rng(0)
    for _ in range(50):  # no random choice of shared steps within the caps beats it
        s = rng.integers(0, caps + 1)
        assert env.outcome(bw, cp, s).scores.sum() <= q_best + 1e-9
    off = QoEEnv(k_min=12, k_max=12, topics_per_user=0.2, allow_sharing=False)
    off.reset(seed=1)
    assert not off.best_shared_steps(bw, cp).any()


def test_default_decoding_takes_the_shares_and_picks_the_shared_steps_exactly() -> None:
    env = QoEEnv(k_min=12, k_max=12, topics_per_user=0.2)
    learned = QoEEnv(k_min=12, k_max=12, topics_per_user=0.2, learned_shared_steps=True)
    env.reset(seed=1)
    learned.reset(seed=1)
    a = np.random.default_rng(3).uniform(-1, 1, env.action_space.shape)
    bw, cp, s = env.decode_action(a)
    assert np.array_equal(s, env.best_shared_steps(bw, cp)) and s.max() > 0
    # the same shares as the learned decoding's first two blocks; its best steps encoded back score the same
    a3 = np.concatenate([a, -np.ones(12)])
    bw3, cp3, _ = learned.decode_action(a3)
    assert np.allclose(bw, bw3) and np.allclose(cp, cp3)
    r_exact = env.step(a.astype(np.float32))[1]
    assert learned.step(learned.shared_steps_action(a3, s))[1] == pytest.approx(r_exact)
    assert r_exact >= learned.step(a3.astype(np.float32))[1]  # no sharing (s = 0) is one of the candidates
    with pytest.raises(ValueError, match="decides the shared steps itself"):
        env.shared_steps_action(a, s)
    # the used entries at the box's edge, in the step's info
    env.reset(seed=1)
    sat = np.zeros(env.action_space.shape, np.float32)
    sat[:6] = 1.0  # 6 of the 24 used entries
    assert env.step(sat)[4]["action_saturation"] == pytest.approx(0.25)


def test_groups_share_at_most_the_services_steps() -> None:
    """The env's exact choice and the service's rounds read one rule: a group shares at most the
    steps that keep its least similar follower at >= SHARE_RETENTION on the measured curves (the
    live round, docs/qoe.md: uncapped, the exact choice shared all 20 steps with followers whose
    measured fidelity then fell to 0.22-0.62)."""
    from relaydiff.serve.rounds import RoundDecider

    shipped = load_sharing_cost()
    assert shipped.longest_sharing(0.85, 20) == shipped.longest_sharing(0.85, 20, SHARE_RETENTION)
    # curves shaped like the 8x8 family's top bin (0.93 kept at s = T), fixed so that the test does
    # not move with the shipped family: the rule allows 4 steps, the curves alone pay for 20
    cost = SharingCost(np.array([0.0, 1.0]), np.array([0.0, 4.0, 20.0]), np.array([[1.0, 0.97, 0.935]]), 20)
    service = RoundDecider("greedy", "large", "small", sharing_cost=cost)
    env, uncapped = QoEEnv(sharing_cost=cost), QoEEnv(sharing_cost=cost, share_retention=None)
    over = 0
    for j in range(8):
        env.reset(seed=10_000 + j)
        uncapped.reset(seed=10_000 + j)
        r, g = env.round, env.round.groups
        bw, cp, s = env.decode_action(env.heuristic_action("equal"))
        s_free = uncapped.decode_action(uncapped.heuristic_action("equal"))[2]
        for gi in range(g.n_groups):
            m = [i for i in g.members(gi) if i != g.leader[gi] and not r.same_prompt[i]]
            if m:  # followers of another prompt bind: the service's steps for the least similar one
                rule = service.shared_steps(float(g.similarity[m].min()), env.steps)
                assert r.caps[gi] == rule and s[gi] <= rule
                over += int(s_free[gi] > rule)
            elif g.sizes()[gi] > 1:  # only the leader's own prompt: nothing binds
                assert r.caps[gi] == env.steps
        assert np.all(uncapped.round.caps == np.where(g.sizes() > 1, env.steps, 0))
    assert over > 0  # the curves alone share past the rule in these rounds
    # the learned decoding is capped too
    learned = QoEEnv(sharing_cost=cost, learned_shared_steps=True)
    learned.reset(seed=10_000)
    assert np.array_equal(learned.decode_action(np.ones(learned.action_space.shape))[2], learned.round.caps)
    with pytest.raises(ValueError, match="share_retention"):
        QoEEnv(share_retention=1.5)


def test_shared_steps_caps_and_same_prompt_followers() -> None:
    # two groups: {0 (leader), 1 (same prompt), 2 (another prompt, similarity 0.8)}, {3 (leader), 4 (same prompt)}
    g = Groups(np.array([0, 0, 0, 1, 1]), np.array([0, 3]), np.array([1.0, 1.0, 0.8, 1.0, 1.0]))
    prompts = ["a", "a", "b", "c", "c"]
    same = same_prompt_followers(g, prompts)
    assert same.tolist() == [False, True, False, False, True]
    cost = SharingCost(np.array([0.0, 0.9, 1.0]), np.array([0.0, 10.0, 20.0]), np.array([[1.0, 0.96, 0.5], [1.0, 1.0, 0.97]]), 20)
    assert shared_steps_caps(g, cost, 20, 0.95, same).tolist() == [10, 20]  # 2 binds at 0.8; group 1 has no binding follower
    assert shared_steps_caps(g, cost, 20, 0.95).tolist() == [10, 20]  # every follower binds: 1.0 keeps 0.97 at T
    assert shared_steps_caps(g, cost, 20, 0.98).tolist() == [0, 10]
    assert shared_steps_caps(g, cost, 20, 0.98, same).tolist() == [0, 20]
    assert shared_steps_caps(g, cost, 20, None).tolist() == [20, 20]
    assert shared_steps_caps(Groups(np.array([0]), np.array([0]), np.array([1.0])), cost, 20).tolist() == [0]
    with pytest.raises(ValueError, match="prompts"):
        same_prompt_followers(g, prompts[:2])


def test_exact_steps_never_ask_a_non_surrogate_agent() -> None:
    class Counting:
        calls = 0

        def score(self, traits: np.ndarray, perceptions) -> np.ndarray:
            Counting.calls += 1
            return np.full(len(perceptions), 5.0)

    env = QoEEnv(k_min=8, k_max=8, agent=Counting(), topics_per_user=0.2)
    env.reset(seed=0)
    _, r, *_ = env.step(np.zeros(env.action_space.shape, np.float32))
    assert Counting.calls == 1 and r == 40.0  # the steps came from the planner (a surrogate), the reward from the agent


def test_heuristics_run_and_sqrt_follows_the_closed_form() -> None:
    env = QoEEnv(k_min=6, k_max=10)
    env.reset(seed=2)
    for h in HEURISTICS:
        _, r, *_ = env.step(env.heuristic_action(h))
        assert 6 <= r <= 100
    bw, cp, s = env.decode_action(env.heuristic_action("proportional"))
    assert np.allclose(bw * env.round.spectral_eff, (bw * env.round.spectral_eff)[0])  # equal download times
    assert np.array_equal(s, env.best_shared_steps(bw, cp))  # the env's exact steps, as for any policy
    learned = QoEEnv(k_min=6, k_max=10, learned_shared_steps=True)
    learned.reset(seed=2)
    assert np.all(learned.decode_action(learned.heuristic_action("proportional"))[2] == 0)  # no sharing there
    with pytest.raises(ValueError, match="unknown heuristic"):
        env.heuristic_action("best")


def test_prompt_pool_ships_topics_with_unit_embeddings() -> None:
    pool = PromptPool.load()
    assert len(pool.prompts) == pool.embeddings.shape[0] == pool.topics.size
    assert np.allclose(np.linalg.norm(pool.embeddings, axis=1), 1.0, atol=2e-3)
    sim = pool.embeddings @ pool.embeddings.T
    same = pool.topics[:, None] == pool.topics[None, :]
    assert sim[same & ~np.eye(len(sim), dtype=bool)].mean() > sim[~same].mean() + 0.05


def test_surrogate_agent_mapping() -> None:
    agent = SurrogateAgent(seed=0)
    calm = np.array([[0.5, 0.5, 0.5, 0.5, 0.0]])
    anxious = np.array([[0.5, 0.5, 0.5, 0.5, 1.0]])
    fast, slow = Perception("a cat", 0.8, 2.0, 5.0), Perception("a cat", 0.8, 20.0, 5.0)
    # neuroticism: waiting hurts more
    drop_calm = agent.score(calm, [fast])[0] - agent.score(calm, [slow])[0]
    drop_anx = agent.score(anxious, [fast])[0] - agent.score(anxious, [slow])[0]
    assert drop_anx > drop_calm > 0
    # conscientiousness: fidelity matters more
    sloppy, careful = np.array([[0.5, 0.0, 0.5, 0.5, 0.5]]), np.array([[0.5, 1.0, 0.5, 0.5, 0.5]])
    good, bad = Perception("x", 0.95, 5.0, 5.0), Perception("x", 0.5, 5.0, 5.0)
    assert (agent.score(careful, [good]) - agent.score(careful, [bad]))[0] > (agent.score(sloppy, [good]) - agent.score(sloppy, [bad]))[0]
    # openness: style counts only when a style was asked for
    styled = Perception("x", 0.8, 5.0, 5.0, style_fidelity=0.1)
    open_ = np.array([[1.0, 0.5, 0.5, 0.5, 0.5]])
    assert agent.score(open_, [styled])[0] < agent.score(open_, [Perception("x", 0.8, 5.0, 5.0)])[0]
    # scores in [1, 10], seeded and stable per user
    t = np.random.default_rng(0).uniform(size=(5, 5))
    ps = [fast] * 5
    s = agent.score(t, ps)
    assert np.all((s >= 1) & (s <= 10)) and np.array_equal(s, SurrogateAgent(seed=0).score(t, ps))
    assert not np.array_equal(s, SurrogateAgent(seed=1).score(t, ps))
    with pytest.raises(ValueError, match="traits"):
        agent.score(np.ones((2, 4)), ps[:2])


def test_qoe_split_attributes_every_saved_step_to_a_kind() -> None:
    """bench.qoe_split: per-user savings add up to the env's chain-steps saved (it checks that
    itself), copies save all T steps, and a paraphrase-aware oracle can only save more."""
    from relaydiff.bench.qoe_split import follower_kind, pool_labels, split_savings

    topic, variant = pool_labels()
    by = {}
    for p, v in variant.items():
        by.setdefault(topic[p], {})[v] = p
    t0, t1 = by[0], by[1]
    assert follower_kind(t0["paraphrase"], t0["leader"], topic, variant) == "paraphrase"
    assert follower_kind(t0["one_attribute"], t0["leader"], topic, variant) == "attribute_variant"
    assert follower_kind(t0["two_attributes"], t0["paraphrase"], topic, variant) == "attribute_variant"
    assert follower_kind(t1["leader"], t0["leader"], topic, variant) == "other_scene"
    capped = split_savings(QoEEnv(), 4)
    assert capped["by_kind"]["copy"]["users"] > 0 and capped["by_kind"]["copy"]["steps_saved_mean"] == 20
    assert sum(v["saved_share"] for v in capped["by_kind"].values()) == pytest.approx(capped["unet_evals_saved"])
    assert capped["bounds"]["copies"] <= capped["unet_evals_saved"] <= capped["bounds"]["same_scene"] + 0.2
    uncapped = split_savings(QoEEnv(share_retention=None), 4)
    oracle = split_savings(QoEEnv(), 4, oracle_scene=True)
    assert capped["unet_evals_saved"] <= oracle["unet_evals_saved"] <= uncapped["unet_evals_saved"]


def test_the_cap_rule_shares_every_group_its_cap_whatever_the_shares() -> None:
    """shared_steps_rule="cap" is the service's rule (RoundDecider.share: each group at its cap):
    the edge's steps no longer depend on the shares, and no group shares less than the exact choice."""
    exact, capped = QoEEnv(k_min=12, k_max=12, topics_per_user=0.2), QoEEnv(k_min=12, k_max=12, topics_per_user=0.2,
                                                                            shared_steps_rule="cap")
    rng = np.random.default_rng(5)
    for seed in range(4):
        exact.reset(seed=seed)
        capped.reset(seed=seed)
        for _ in range(3):
            a = rng.uniform(-1, 1, exact.action_space.shape).astype(np.float32)
            s_exact, s_cap = exact.decode_action(a)[2], capped.decode_action(a)[2]
            assert np.array_equal(s_cap, capped.round.caps) and np.all(s_exact <= s_cap)
        info_exact, info_cap = exact.step(a)[4], capped.step(a)[4]
        assert info_cap["unet_evals_saved"] >= info_exact["unet_evals_saved"]
        assert info_cap["qoe"] <= info_exact["qoe"] + 1e-9  # exact is the QoE optimum for these shares
    with pytest.raises(ValueError, match="unknown shared_steps_rule"):
        QoEEnv(shared_steps_rule="greedy")
    with pytest.raises(ValueError, match="no shared_steps_rule applies"):
        QoEEnv(shared_steps_rule="cap", learned_shared_steps=True)


def test_best_allocation_beats_every_heuristic_and_random_actions() -> None:
    env = QoEEnv(k_min=5, k_max=8)
    with pytest.raises(ValueError, match="reset the env first"):
        env.best_allocation()
    rng = np.random.default_rng(0)
    for seed in range(3):
        env.reset(seed=seed)
        best = env.best_allocation()
        assert best["start"] in HEURISTICS and best["action"].shape == env.action_space.shape
        env.reset(seed=seed)
        assert env.step(best["action"])[1] == pytest.approx(best["qoe"])  # what it claims is what the env gives
        for h in HEURISTICS:
            env.reset(seed=seed)
            assert env.step(env.heuristic_action(h))[1] <= best["qoe"] + 1e-9
        for _ in range(20):
            env.reset(seed=seed)
            assert env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))[1] <= best["qoe"] + 1e-9
    learned = QoEEnv(k_min=5, k_max=8, learned_shared_steps=True)
    learned.reset(seed=0)
    with pytest.raises(ValueError, match="learned_shared_steps=False"):
        learned.best_allocation()
