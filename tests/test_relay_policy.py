"""The shared LinUCB (sched.bandit.SharedLinUCB), its arm-context features (sim.relay_arm_features) and the
relay-context wrapper (sched.relay_policy) that the bench, the live run and the service call."""

from __future__ import annotations

import numpy as np
import pytest

from relaydiff.sched.bandit import BanditError, SharedLinUCB
from relaydiff.sched.relay_policy import RELAY_BANDIT, RelayBandit
from relaydiff.sim.relay_arm_features import arm_context, arm_context_features, arm_feature_matrix
from relaydiff.sim.relay_stream import CONTEXT_FEATURES, PromptPool, RelayStream
from relaydiff.system.relay_arms import load_relay_arms
from relaydiff.system.relay_scenario import load_relay_scenario

ARMS = ("a", "b", "c")


def _pool(seed: int = 0, n: int = 90) -> PromptPool:
    rng = np.random.default_rng(seed)
    nobj = np.repeat([1, 2, 3], n // 3)
    feats = np.c_[(8 + 4 * nobj) / 32 + rng.normal(0, 0.05, n), nobj - 2 + rng.normal(0, 0.5, n), rng.normal(0, 1, (n, 2))]
    return PromptPool(feats, nobj)


def test_shared_linucb_statistics_equal_one_ridge_regression_over_arm_rows():
    rng = np.random.default_rng(0)
    feats = rng.uniform(0.2, 1.0, (3, 4))
    bandit = SharedLinUCB(ARMS, 4, arm_features=feats, alpha=0.3, l2=0.5)
    rows, ys = [], []
    for _ in range(60):
        x = np.r_[1.0, rng.normal(0, 1, 3)]
        a = bandit.decide(x)
        r = float(np.clip(rng.normal(0.1 * a, 0.2), -3, 1))
        bandit.update(a, x, r)
        rows.append(feats[a] * x)
        ys.append(r)
    z, y = np.array(rows), np.array(ys)
    gram = 0.5 * np.eye(4) + z.T @ z
    np.testing.assert_allclose(bandit.a_inv, np.linalg.inv(gram), atol=1e-9)
    np.testing.assert_allclose(bandit.theta, np.linalg.solve(gram, z.T @ y), atol=1e-9)
    # the decision is argmax of z.theta + alpha sqrt(z' A^-1 z) over the arms' rows
    x = np.r_[1.0, rng.normal(0, 1, 3)]
    zs = feats * x
    ucb = zs @ bandit.theta + 0.3 * np.sqrt(np.einsum("ki,ij,kj->k", zs, bandit.a_inv, zs))
    assert bandit.decide(x) == int(np.argmax(ucb))


def test_shared_linucb_needs_its_arm_features():
    with pytest.raises(BanditError, match="arm_features: linucb_shared needs"):
        SharedLinUCB(ARMS, 4)
    with pytest.raises(BanditError, match=r"arm_features: need finite numbers of shape \[3, 4\]"):
        SharedLinUCB(ARMS, 4, arm_features=np.ones((3, 5)))
    with pytest.raises(BanditError, match="arm_features"):
        SharedLinUCB(ARMS, 2, arm_features=[[1.0, np.nan]] * 3)


def test_arm_features_come_from_the_measured_arms():
    arms = load_relay_arms()
    names = [a.name for a in arms]
    cols = arm_context_features(names)
    feats = arm_feature_matrix(arms)
    assert feats.shape == (len(arms), len(cols))
    edge, dev_g1 = names.index("edge_only"), names.index("device_only_g1")
    row = dict(zip(cols, feats[edge]))
    assert row["wq x fidelity2"] == arms[edge].fidelity[1] and row["wl x device_frac"] == 0.0
    assert row["wl*edge_chain_s/ref x edge_frac"] == 1.0 and row["wl*link_s/ref x hands_off"] == 1.0
    row = dict(zip(cols, feats[dev_g1]))
    assert row["wl x device_frac"] == pytest.approx(arms[dev_g1].device_row_factor)
    assert row["wl*link_s/ref x hands_off"] == 0.0 and row["wq*rho x style_fidelity"] == arms[dev_g1].style_fidelity
    assert feats[:, -len(arms):].tolist() == np.eye(len(arms)).tolist()  # one intercept per arm
    # the context side reads the relay context: w_l * occupancy is the one product it forms
    x = np.arange(1.0, len(CONTEXT_FEATURES) + 1)
    g = dict(zip(cols, arm_context(x, len(arms))))
    idx = {n: i for i, n in enumerate(CONTEXT_FEATURES)}
    assert g["wq*rho*tokens x fidelity3"] == x[idx["wq*rho*tokens"]]
    assert g["wl*edge_occupancy x hands_off"] == x[idx["wl"]] * x[idx["edge_occupancy"]]
    assert g[f"bias x arm={names[0]}"] == x[idx["bias"]]


def _stream(requests=600, seed=0):
    sc = load_relay_scenario("stationary").model_copy(update={"requests": requests})
    return RelayStream(sc, _pool(), seed=seed)


def test_shared_model_learns_faster_than_one_model_per_arm():
    st = _stream()
    oracle = st.run(lambda x, e: int(np.argmax(e()))).rewards.mean()
    got = {}
    for kind in (RELAY_BANDIT, "linucb"):
        bandit = RelayBandit.make(kind, st.arms, alpha=0.1, l2=0.1)
        got[kind] = st.run(lambda x, e: bandit.decide(x), bandit.update).rewards.mean() / oracle
    assert got[RELAY_BANDIT] > 0.9 and got[RELAY_BANDIT] > got["linucb"] + 0.03, got


def test_relay_bandit_checks_the_relay_context_and_round_trips(tmp_path):
    st = _stream(requests=80, seed=1)
    bandit = RelayBandit.make(RELAY_BANDIT, st.arms, seed=2, alpha=0.1, l2=0.1)
    st.run(lambda x, e: bandit.decide(x), bandit.update)
    before = {k: v.copy() for k, v in bandit.bandit.arrays().items()}
    x = st.context(3, [4, 9])
    bad = x.copy()
    bad[CONTEXT_FEATURES.index("wq*pc2")] = np.nan  # a feature the shared model does not read: still an error
    with pytest.raises(BanditError, match=r"context\[4\] \(wq\*pc2\)"):
        bandit.decide(bad)
    with pytest.raises(BanditError, match="context: expected 16 relay features"):
        bandit.update(0, x[:5], 0.1)
    with pytest.raises(BanditError, match="arm: unknown arm 'nope'"):
        bandit.update("nope", x, 0.1)
    for k, v in bandit.bandit.arrays().items():
        np.testing.assert_array_equal(v, before[k])
    bandit.save_pretrained(tmp_path / "relay")
    loaded = RelayBandit.from_pretrained(tmp_path / "relay.json")
    assert loaded.kind == RELAY_BANDIT and loaded.arms == st.arm_names
    for i in range(20):
        x = st.context(i, [i % 7])
        assert loaded.decide(x) == bandit.decide(x)
        loaded.update(i % 8, x, 0.05)
        bandit.update(i % 8, x, 0.05)
    disjoint = RelayBandit.make("linucb", st.arms)
    disjoint.save_pretrained(tmp_path / "d")
    assert RelayBandit.from_pretrained(tmp_path / "d").decide(x) == disjoint.decide(x)
