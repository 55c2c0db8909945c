"""The relay bandit: algorithms (sched.bandit), arms and workloads (system.relay_*), the stream (sim.relay_stream),
the shared model's arm-context features (sim.relay_arm_features) and the relay-context wrapper (sched.relay_policy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from relaydiff.sched.bandit import (
    POLICIES,
    Bandit,
    BanditError,
    LinUCB,
    SharedLinUCB,
    SlidingWindowLinUCB,
    make_bandit,
)
from relaydiff.sched.relay_policy import RELAY_BANDIT, RelayBandit
from relaydiff.sim.relay_arm_features import arm_context, arm_context_features, arm_feature_matrix
from relaydiff.sim.relay_stream import CONTEXT_FEATURES, PromptPool, RelayStream, StreamError
from relaydiff.system.quality import REFERENCE_TABLE, QualityTableError
from relaydiff.system.relay_arms import DEFAULT_ARMS, ArmSpec, load_relay_arms
from relaydiff.system.relay_scenario import (
    available_relay_scenarios,
    load_relay_scenario,
    parse_relay_scenario,
)
from relaydiff.system.scenario import ScenarioError

ARMS = ("a", "b", "c")


def _pool(seed: int = 0, n: int = 90) -> PromptPool:
    rng = np.random.default_rng(seed)
    nobj = np.repeat([1, 2, 3], n // 3)
    feats = np.c_[(8 + 4 * nobj) / 32 + rng.normal(0, 0.05, n), nobj - 2 + rng.normal(0, 0.5, n), rng.normal(0, 1, (n, 2))]
    return PromptPool(feats, nobj)


def _linear_stream(seed: int, n: int, d: int = 4):
    """Contexts and rewards of a linear bandit with 3 arms and noise."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(0, 0.3, (len(ARMS), d))
    xs = np.c_[np.ones(n), rng.normal(0, 1, (n, d - 1))]
    return xs, theta, rng


# ---- algorithms -------------------------------------------------------------------------------

def test_linucb_statistics_equal_ridge_regression():
    xs, theta, rng = _linear_stream(0, 200)
    bandit = LinUCB(ARMS, 4, alpha=0.5, l2=0.7)
    data = {a: ([], []) for a in range(3)}
    for x in xs:
        a = bandit.decide(x)
        r = float(np.clip(theta[a] @ x + rng.normal(0, 0.1), -3, 1))
        bandit.update(a, x, r)
        data[a][0].append(x)
        data[a][1].append(r)
    for a, (X, y) in data.items():
        X, y = np.array(X).reshape(-1, 4), np.array(y)
        gram = 0.7 * np.eye(4) + X.T @ X
        np.testing.assert_allclose(bandit.a_inv[a], np.linalg.inv(gram), atol=1e-9)
        np.testing.assert_allclose(bandit.theta[a], np.linalg.solve(gram, X.T @ y), atol=1e-9)


def test_sliding_window_keeps_only_the_last_window():
    xs, theta, rng = _linear_stream(1, 170)
    bandit = SlidingWindowLinUCB(ARMS, 4, window=50, l2=1.0)
    hist = []
    for x in xs:
        a = bandit.decide(x)
        r = float(np.clip(theta[a] @ x, -3, 1))
        bandit.update(a, x, r)
        hist.append((a, x, r))
    for a in range(3):
        last = [(x, r) for b, x, r in hist[-50:] if b == a]
        X = np.array([x for x, _ in last]).reshape(-1, 4)
        y = np.array([r for _, r in last])
        gram = np.eye(4) + X.T @ X
        np.testing.assert_allclose(bandit.a_inv[a], np.linalg.inv(gram), atol=1e-8)
        np.testing.assert_allclose(bandit.theta[a], np.linalg.solve(gram, X.T @ y), atol=1e-8)
        assert bandit.counts[a] == len(last)


@pytest.mark.parametrize("kind", ["linucb", "lints", "egreedy", "swlinucb"])
def test_linear_policies_learn_the_best_arm(kind):
    xs, theta, rng = _linear_stream(2, 600)
    bandit = make_bandit(kind, ARMS, 4, seed=0)
    picks_best = []
    for x in xs:
        a = bandit.decide(x)
        bandit.update(a, x, float(np.clip(theta[a] @ x + rng.normal(0, 0.1), -3, 1)))
        picks_best.append(a == int(np.argmax(theta @ x)))
    assert np.mean(picks_best[-150:]) > 0.85, np.mean(picks_best[-150:])


def test_ucb1_random_fixed_and_oracle():
    ucb = make_bandit("ucb1", ARMS, 2, c=0.1)
    means = np.array([0.1, 0.5, 0.2])
    rng = np.random.default_rng(0)
    for _ in range(300):
        a = ucb.decide(np.zeros(2))
        ucb.update(a, np.zeros(2), float(np.clip(means[a] + rng.normal(0, 0.1), -3, 1)))
    assert np.argmax(ucb.counts) == 1
    fixed = make_bandit("fixed", ARMS, 2, arm="c")
    assert fixed.decide(np.zeros(2)) == 2
    oracle = make_bandit("oracle", ARMS, 2)
    assert oracle.decide_expected([0.0, 0.3, 0.2]) == 1
    with pytest.raises(BanditError, match="expected"):
        oracle.decide_expected([0.0, float("nan"), 0.2])
    picks = [make_bandit("random", ARMS, 2, seed=3).decide(np.zeros(2)) for _ in range(3)]
    assert picks == [make_bandit("random", ARMS, 2, seed=3).decide(np.zeros(2)) for _ in range(3)]


def _make(kind, dim, **kw):
    """``make_bandit`` with arm features for the shared model (a fixed random matrix)."""
    if kind == "linucb_shared":
        kw["arm_features"] = np.random.default_rng(7).uniform(0.2, 1.0, (len(ARMS), dim))
    return make_bandit(kind, ARMS, dim, **kw)


@pytest.mark.parametrize("kind", sorted(set(POLICIES) - {"oracle"}))
def test_bad_input_names_the_field_and_keeps_the_state(kind, tmp_path):
    names = [f"f{i}" for i in range(3)]
    bandit = _make(kind, 3, feature_names=names, seed=1)
    for i in range(5):
        bandit.update(i % 3, np.array([1.0, 0.5 * i, -0.2]), 0.1 * i)
    before = {k: v.copy() for k, v in bandit.arrays().items()}
    t_before = bandit.t
    bad = [
        (lambda: bandit.decide([1.0, float("nan"), 0.0]), r"context\[1\] \(f1\)"),
        (lambda: bandit.decide([1.0, 2.0]), "context: expected 3 features"),
        (lambda: bandit.update(0, [1.0, np.inf, 0.0], 0.1), r"context\[1\] \(f1\)"),
        (lambda: bandit.update(7, [1.0, 0.0, 0.0], 0.1), "arm: unknown arm 7"),
        (lambda: bandit.update("zz", [1.0, 0.0, 0.0], 0.1), "arm: unknown arm 'zz'"),
        (lambda: bandit.update(0, [1.0, 0.0, 0.0], 1.5), r"reward: 1.5 is outside its range \[-3, 1\]"),
        (lambda: bandit.update(0, [1.0, 0.0, 0.0], float("nan")), "reward: nan"),
        (lambda: bandit.update(0, [1.0, 0.0, 0.0], "x"), "reward: not a number"),
    ]
    for call, message in bad:
        with pytest.raises(BanditError, match=message):
            call()
    after = bandit.arrays()
    assert bandit.t == t_before
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


@pytest.mark.parametrize("kind", sorted(set(POLICIES) - {"oracle"}))
def test_state_round_trip_continues_identically(kind, tmp_path):
    rng = np.random.default_rng(0)
    bandit = _make(kind, 3, seed=5, feature_names=("x", "y", "z"))
    for _ in range(40):
        x = rng.normal(0, 1, 3)
        bandit.update(bandit.decide(x), x, float(rng.uniform(-1, 1)))
    path = bandit.save_pretrained(tmp_path / "state")
    assert path.suffix == ".json" and (tmp_path / "state.safetensors").is_file()
    loaded = Bandit.from_pretrained(tmp_path / "state.json")
    assert (loaded.kind, loaded.arms, loaded.t, loaded.feature_names) == (bandit.kind, bandit.arms, bandit.t,
                                                                         bandit.feature_names)
    for _ in range(30):
        x = rng.normal(0, 1, 3)
        a, b = bandit.decide(x), loaded.decide(x)
        assert a == b
        r = float(rng.uniform(-1, 1))
        bandit.update(a, x, r)
        loaded.update(b, x, r)


def test_state_load_errors(tmp_path):
    bandit = make_bandit("linucb", ARMS, 3)
    bandit.save_pretrained(tmp_path / "s")
    with pytest.raises(BanditError, match="does not exist"):
        Bandit.from_pretrained(tmp_path / "missing")
    meta = json.loads((tmp_path / "s.json").read_text())
    (tmp_path / "bad.json").write_text(json.dumps({**meta, "dim": 4}))
    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "s.safetensors").read_bytes())
    with pytest.raises(BanditError, match="array 'a_inv' must have shape"):
        Bandit.from_pretrained(tmp_path / "bad")
    (tmp_path / "bad.json").write_text(json.dumps({**meta, "format": "pickle"}))
    with pytest.raises(BanditError, match="'format'"):
        Bandit.from_pretrained(tmp_path / "bad")
    (tmp_path / "bad.json").write_text(json.dumps(meta))
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(BanditError, match="not a readable safetensors"):
        Bandit.from_pretrained(tmp_path / "bad")


# ---- arms and workloads -----------------------------------------------------------------------

def test_arms_come_from_the_measured_table():
    table = json.loads(REFERENCE_TABLE.read_text())
    arms = {a.name: a for a in load_relay_arms()}
    assert len(arms) == len(DEFAULT_ARMS)
    relay = {p["k"]: p for p in table["relay"]}
    no_cfg = {p["k"]: p for p in table["relay_device_guidance"]["relay"]}
    assert arms["edge_only"].fidelity == tuple(relay[20]["by_objects"][c] for c in "123")
    assert arms["relay_k8"].fidelity == tuple(relay[8]["by_objects"][c] for c in "123")
    assert arms["relay_k10_g1"].fidelity == tuple(no_cfg[10]["by_objects"][c] for c in "123")
    steps = table["personalization"].get("adapter_step_cost", {}).get("by_guidance", {})
    g = f"{table['config']['guidance']:g}"
    if g in steps and "1" in steps:  # a table with the per-step costs (bench quality since f5b8a7f)
        row = steps["1"]["batch1"]["plain_ms"]["median"] / steps[g]["batch1"]["plain_ms"]["median"]
    else:
        row = no_cfg[0]["wall_s_single"] / relay[0]["wall_s_single"]
    assert arms["device_only_g1"].device_row_factor == pytest.approx(row)
    styles = table["personalization"]["styles"].values()  # edge_only's style: the split point k = T
    assert arms["edge_only"].style_fidelity == pytest.approx(np.mean([s["style_fidelity"][-1] for s in styles]))
    assert arms["edge_only"].style_fidelity < 0.1 and arms["device_only"].style_fidelity > 0.5


def test_arms_from_a_table_without_the_needed_curves(tmp_path):
    table = json.loads(REFERENCE_TABLE.read_text())
    del table["relay_device_guidance"]
    (tmp_path / "t.json").write_text(json.dumps(table))
    with pytest.raises(QualityTableError, match="relay_device_guidance"):
        load_relay_arms((ArmSpec(6, 1.0),), tmp_path / "t.json")
    load_relay_arms((ArmSpec(8),), tmp_path / "t.json")  # arms with guidance still price
    del table["relay"][8]["by_objects"]
    (tmp_path / "t.json").write_text(json.dumps(table))
    with pytest.raises(QualityTableError, match="by_objects"):
        load_relay_arms((ArmSpec(8),), tmp_path / "t.json")
    with pytest.raises(QualityTableError, match="no point at k=7"):
        load_relay_arms((ArmSpec(7, 1.0),))


def _table_with(tmp_path, unguided: float | None = 0.5, factors: dict[str, float] | None = None) -> Path:
    """The reference table with (or without: None) the curves `bench quality` adds: the style curves at
    device guidance 1 (each style's guided curve times ``unguided``) and the adapter's step cost."""
    table = json.loads(REFERENCE_TABLE.read_text())
    pers = table["personalization"]
    pers.pop("device_guidance", None)
    pers.pop("adapter_step_cost", None)
    for v in pers["styles"].values():
        v.pop("style_fidelity_device_guidance", None)
        if unguided is not None:
            v["style_fidelity_device_guidance"] = [unguided * f for f in v["style_fidelity"]]
    if unguided is not None:
        pers["device_guidance"] = 1.0
    if factors is not None:
        pers["adapter_step_cost"] = {"member": "small", "adapter": "dark", "by_guidance": {
            g: {"batch1": {"factor": {"median": f, "min": f, "max": f}},
                "batch8": {"factor": {"median": 1.1, "min": 1.1, "max": 1.1}}} for g, f in factors.items()}}
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(table))
    return path


def test_unguided_arms_read_the_style_curve_without_device_guidance(tmp_path):
    guidance = json.loads(REFERENCE_TABLE.read_text())["config"]["guidance"]
    old = {a.name: a for a in load_relay_arms(table=_table_with(tmp_path, None))}
    new = {a.name: a for a in load_relay_arms(table=_table_with(tmp_path, 0.5, {f"{guidance:g}": 1.6, "1": 2.2}))}
    for name in ("device_only_g1", "relay_k6_g1", "relay_k10_g1", "relay_k14_g1"):
        assert new[name].style_fidelity == pytest.approx(0.5 * old[name].style_fidelity), name
        assert "at device guidance 1" in new[name].style_source
        assert "no style curve at device guidance 1" in old[name].style_source  # an old table says so
        assert new[name].adapter_factor == 2.2 and old[name].adapter_factor == 1.0
        assert "no personalization.adapter_step_cost" in old[name].adapter_source
    for name in ("device_only", "relay_k8", "relay_k14"):  # guided device segments: the guided curve
        assert new[name].style_fidelity == old[name].style_fidelity and new[name].adapter_factor == 1.6
        assert f"at guidance {guidance:g}, batch 1" in new[name].adapter_source
    assert new["edge_only"].adapter_factor == 1.0 and new["edge_only"].adapter_source == "no device segment"
    assert new["device_only"].fidelity == old["device_only"].fidelity


def test_the_row_factor_comes_from_per_step_costs_when_measured(tmp_path):
    """Without guidance a device step costs the measured plain step at guidance 1 over the one at the
    request's guidance (the adapter rounds' plain steps); an older table: the chains' wall-time ratio."""
    guidance = json.loads(REFERENCE_TABLE.read_text())["config"]["guidance"]
    path = _table_with(tmp_path, 0.5, {f"{guidance:g}": 1.6, "1": 2.2})
    old = {a.name: a for a in load_relay_arms(table=path)}
    table = json.loads(path.read_text())
    by = table["personalization"]["adapter_step_cost"]["by_guidance"]
    by[f"{guidance:g}"]["batch1"]["plain_ms"] = {"median": 8.0, "min": 7.0, "max": 9.0}
    by["1"]["batch1"]["plain_ms"] = {"median": 4.4, "min": 4.0, "max": 5.0}
    path.write_text(json.dumps(table))
    new = {a.name: a for a in load_relay_arms(table=path)}
    relay = {p["k"]: p for p in table["relay"]}
    no_cfg = {p["k"]: p for p in table["relay_device_guidance"]["relay"]}
    assert old["relay_k10_g1"].device_row_factor == pytest.approx(no_cfg[0]["wall_s_single"] / relay[0]["wall_s_single"])
    assert "wall_s_single" in old["relay_k10_g1"].row_source
    for name in ("device_only_g1", "relay_k6_g1", "relay_k10_g1", "relay_k14_g1"):
        assert new[name].device_row_factor == pytest.approx(0.55) and "plain steps" in new[name].row_source
    assert new["relay_k8"].device_row_factor == 1.0 and new["device_only"].device_row_factor == 1.0


def test_arms_from_a_table_with_broken_new_curves(tmp_path):
    path = _table_with(tmp_path, 0.5, {"1": 2.2})  # no factor at the request's guidance
    with pytest.raises(QualityTableError, match="adapter_step_cost' has no factor at guidance"):
        load_relay_arms((ArmSpec(8),), path)
    assert load_relay_arms((ArmSpec(0, 1.0),), path)[0].adapter_factor == 2.2
    with pytest.raises(QualityTableError, match="positive batch-1 factor"):
        load_relay_arms(table=_table_with(tmp_path, 0.5, {"1": 0.0}))
    table = json.loads(path.read_text())
    del table["personalization"]["adapter_step_cost"]["by_guidance"]["1"]["batch1"]
    path.write_text(json.dumps(table))
    with pytest.raises(QualityTableError, match=r"by_guidance\.1' needs batch1\.factor\.median"):
        load_relay_arms(table=path)
    table = json.loads(_table_with(tmp_path, 0.5).read_text())
    next(iter(table["personalization"]["styles"].values()))["style_fidelity_device_guidance"] = [0.5]
    path.write_text(json.dumps(table))
    with pytest.raises(QualityTableError, match="style_fidelity_device_guidance list per style"):
        load_relay_arms(table=path)


def test_a_styled_device_step_costs_the_adapter_factor(tmp_path):
    """The simulator charges a styled user's device steps the measured adapter factor (and the
    context tells the policy who is styled); unstyled users and the edge are unchanged."""
    guidance = json.loads(REFERENCE_TABLE.read_text())["config"]["guidance"]
    sc = load_relay_scenario("stationary").model_copy(update={"requests": 200})
    plain = RelayStream(sc, _pool(), seed=0, arms=load_relay_arms(table=_table_with(tmp_path, 0.5)))
    arms = load_relay_arms(table=_table_with(tmp_path, 0.5, {f"{guidance:g}": 1.6, "1": 2.2}))
    st = RelayStream(sc, _pool(), seed=0, arms=arms)
    styled = st.rho > 0
    assert styled.any() and (~styled).any()
    names = st.arm_names
    for name, factor in (("device_only", 1.6), ("relay_k10_g1", 2.2), ("edge_only", 1.0)):
        a = names.index(name)
        dev = plain._device_s[:, a] - plain.decode_s
        np.testing.assert_allclose(st._device_s[styled, a] - st.decode_s[styled], factor * dev[styled])
        np.testing.assert_allclose(st._device_s[~styled, a], plain._device_s[~styled, a])
    res, base = st.run(lambda x, e: names.index("device_only")), plain.run(lambda x, e: names.index("device_only"))
    assert (res.latency_s[styled] > base.latency_s[styled]).all()
    np.testing.assert_array_equal(res.latency_s[~styled], base.latency_s[~styled])
    j = CONTEXT_FEATURES.index("wl*styled")
    i_s, i_p = int(np.flatnonzero(styled)[0]), int(np.flatnonzero(~styled)[0])
    assert st.context(i_s, [])[j] == pytest.approx(1 - st.wq[i_s]) and st.context(i_p, [])[j] == 0.0
    # the shared model's features carry the extra device time per arm
    cols = arm_context_features(names)
    feats = dict(zip(cols, arm_feature_matrix(arms)[names.index("device_only_g1")]))
    a = arms[names.index("device_only_g1")]
    assert feats["wl*styled x device_frac_adapter"] == pytest.approx(a.device_row_factor * (2.2 - 1.0))
    assert dict(zip(cols, arm_context(st.context(i_s, []), len(arms))))["wl*styled x device_frac_adapter"] == \
        pytest.approx(1 - st.wq[i_s])


def test_relay_scenarios_validate():
    assert {"stationary", "complexity_shift", "network_degradation", "load_spike"} <= set(available_relay_scenarios())
    for name in available_relay_scenarios():
        load_relay_scenario(name)
    spike = load_relay_scenario("load_spike")
    assert spike.phase_at(0)["arrival_rate_hz"] == 2.0 and spike.phase_at(1200)["arrival_rate_hz"] == 5.0
    with pytest.raises(ScenarioError, match=r"phases\.0\.start"):
        parse_relay_scenario({"requests": 100, "phases": [{"start": 0, "name": "x"}]})
    with pytest.raises(ScenarioError, match="complexity_mix"):
        parse_relay_scenario({"complexity_mix": {"4": 1.0}})
    with pytest.raises(ScenarioError, match="past the stream"):
        parse_relay_scenario({"requests": 100, "phases": [{"start": 100, "name": "x"}]})
    with pytest.raises(ScenarioError, match="bogus"):
        parse_relay_scenario({"bogus": 1})


# ---- the stream ---------------------------------------------------------------------------------

def _stream(seed=0, **updates):
    sc = load_relay_scenario("stationary").model_copy(update={"requests": 200, **updates})
    return RelayStream(sc, _pool(), seed=seed)


def test_stream_is_deterministic_and_shares_draws_across_policies():
    a, b = _stream(3), _stream(3)
    np.testing.assert_array_equal(a.arrival_s, b.arrival_s)
    np.testing.assert_array_equal(a.quality, b.quality)
    fixed = [a.run(lambda x, e, k=k: k).quality for k in range(2)]
    i = np.arange(a.scenario.requests)
    np.testing.assert_array_equal(fixed[0], a.quality[i, 0])
    np.testing.assert_array_equal(fixed[1], a.quality[i, 1])
    assert len(a.context(0, [])) == len(CONTEXT_FEATURES)


def test_edge_load_depends_on_earlier_choices():
    st = _stream(0, arrival_rate_hz=5.0)
    names = st.arm_names
    edge = st.run(lambda x, e: names.index("edge_only"))
    relay = st.run(lambda x, e: names.index("relay_k6_g1"))
    # edge-only for everyone overloads one edge (3.2 requests/s at full batches): latency keeps growing
    assert edge.latency_s[-20:].mean() > 3 * edge.latency_s[:20].mean()
    assert relay.latency_s[-20:].mean() < 2 * relay.latency_s[:20].mean()


def test_oracle_what_if_matches_a_lone_request():
    st = _stream(0, arrival_rate_hz=0.01)  # requests far apart: nobody shares the edge
    seen = {}

    def decide(x, expected):
        seen[len(seen)] = expected()
        return len(seen) % len(st.arms)

    res = st.run(decide)
    for i in range(10):
        a = res.arms[i]
        np.testing.assert_allclose(seen[i][a], st.utility(i, st.expected_q[i, a], res.latency_s[i]), rtol=1e-9)


def test_finish_times_match_a_step_by_step_queue():
    st = _stream(0)
    cap = st.max_batch
    rem = [3, 20, 5] + [7] * (cap - 1)
    times = st._finish_times(rem, 1.0, 6)
    queue, t, done = [[r, False] for r in rem] + [[6, True]], 1.0, []
    while any(me for _, me in queue):
        b = min(len(queue), cap)
        t += st.edge_step_s[b - 1]
        for c in queue[:b]:
            c[0] -= 1
            if c[1]:
                done.append(t)
        queue = [c for c in queue if c[0] > 0]
    np.testing.assert_allclose(times, done)


def test_prompt_pool_errors():
    with pytest.raises(StreamError, match="features"):
        PromptPool(np.zeros((3, 2)), np.array([1, 2, 3]))
    with pytest.raises(StreamError, match="no prompt with 3 objects"):
        PromptPool(np.zeros((2, 4)), np.array([1, 2]))


def test_mabwiser_linucb_decides_like_ours():
    pytest.importorskip("mabwiser")
    from relaydiff.bench.bandit import MabwiserPeer, requests_to_recover, run_policy

    # l2 = 1: MABWiser 2.7.4 starts an arm's A^-1 as a copy of A (= l2 I), the inverse only when l2 = 1
    st = _stream(1, requests=80)
    d = len(CONTEXT_FEATURES)
    ours = run_policy(st, make_bandit("linucb", st.arm_names, d, alpha=0.1, l2=1.0)).result
    peer = run_policy(st, MabwiserPeer(len(st.arm_names), "linucb", 0.1, 1.0, seed=0)).result
    np.testing.assert_array_equal(ours.arms, peer.arms)
    alg, orc = np.r_[np.zeros(50), np.full(60, 0.96)], np.ones(110)
    assert requests_to_recover(alg, orc, 50, window=10) == 10
    assert requests_to_recover(np.zeros(110), orc, 50, window=10) is None


def test_bench_bandit_cli_rejects_an_unknown_scenario():
    from typer.testing import CliRunner

    from relaydiff.cli import app

    res = CliRunner().invoke(app, ["bench", "bandit", "--scenarios", "nope", "--no-peers"])
    assert res.exit_code == 2
    assert "relay scenario nope not found" in res.output and "Traceback" not in res.output
    assert Path(__file__).exists()


# ---- the shared model and the relay-context wrapper ---------------------------------------------

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


def test_shared_model_learns_faster_than_one_model_per_arm():
    st = _stream(0, requests=600)
    oracle = st.run(lambda x, e: int(np.argmax(e()))).rewards.mean()
    got = {}
    for kind in (RELAY_BANDIT, "linucb"):
        bandit = RelayBandit.make(kind, st.arms, alpha=0.1, l2=0.1)
        got[kind] = st.run(lambda x, e: bandit.decide(x), bandit.update).rewards.mean() / oracle
    assert got[RELAY_BANDIT] > 0.9 and got[RELAY_BANDIT] > got["linucb"] + 0.03, got


def test_projected_decision_equals_the_full_one():
    """The relay's 29 columns are a 0/1 map of 18 numbers: deciding from those (SharedLinUCB.project) gives
    the same UCB scores as the full quadratic forms, before and after updates, and a bad map is refused."""
    from relaydiff.sim.relay_arm_features import arm_context, arm_context_lift, arm_context_projection

    st = _stream(3, requests=200)
    proj = arm_context_projection(len(st.arms))
    relay = RelayBandit.make(RELAY_BANDIT, st.arms, seed=1, alpha=0.1, l2=0.1)
    bandit = relay.bandit
    rng = np.random.default_rng(5)
    for i in range(200):
        x = st.context(i, list(rng.integers(1, 20, size=i % 9)))
        g, u = arm_context(x, len(st.arms)), arm_context_lift(x)
        np.testing.assert_array_equal(proj @ u, g)
        if bandit.t:
            k = len(st.arms)
            zs = bandit.arm_features * g
            ucb = zs @ bandit.theta + 0.1 * np.sqrt(np.einsum("ki,ij,kj->k", zs, bandit.a_inv, zs))
            s = bandit._pstack @ u
            np.testing.assert_allclose(np.sqrt(np.abs(s[: k * len(u)].reshape(k, -1) @ u)) + s[k * len(u):], ucb,
                                       rtol=1e-9, atol=1e-12)
            assert relay.decide(x) == bandit.decide_projected(u) == int(np.argmax(ucb))
        relay.update(int(rng.integers(len(st.arms))), x, float(rng.uniform(-1, 1)))
    with pytest.raises(BanditError, match=r"proj: need finite numbers of shape \[29, m\]"):
        bandit.project(np.ones((5, 3)))


def test_relay_bandit_checks_the_relay_context_and_round_trips(tmp_path):
    st = _stream(1, requests=80)
    bandit = RelayBandit.make(RELAY_BANDIT, st.arms, seed=2, alpha=0.1, l2=0.1)
    st.run(lambda x, e: bandit.decide(x), bandit.update)
    before = {k: v.copy() for k, v in bandit.bandit.arrays().items()}
    x = st.context(3, [4, 9])
    bad = x.copy()
    bad[CONTEXT_FEATURES.index("wq*pc2")] = np.nan  # a feature the shared model does not read: still an error
    with pytest.raises(BanditError, match=r"context\[4\] \(wq\*pc2\)"):
        bandit.decide(bad)
    with pytest.raises(BanditError, match="context: expected 17 relay features"):
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


def test_bandit_live_cli_rejects_cpu_clock_with_threads():
    from typer.testing import CliRunner

    from relaydiff.cli import app

    res = CliRunner().invoke(app, ["bandit", "live", "--threads", "2"])
    assert res.exit_code == 2 and "--cpu-clock times one thread" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["bandit", "live", "--algorithm", "nope"])
    assert res.exit_code == 2 and "--algorithm: unknown 'nope'" in res.output


@pytest.mark.parametrize("args, message", [
    (["bandit", "live", "--alpha", "-0.1"], "--alpha must be a finite number >= 0, got -0.1"),
    (["bandit", "live", "--alpha", "nan"], "--alpha must be a finite number >= 0, got nan"),
    (["bandit", "live", "--alpha", "inf"], "--alpha must be a finite number >= 0, got inf"),
    (["bandit", "live", "--alpha", "0.3", "--algorithm", "lints"], "--alpha: lints has no alpha"),
    (["bandit", "live", "--alpha", "0.3", "--state", "s.json"], "--alpha: a bandit loaded with --state keeps"),
    (["bench", "bandit", "--alpha", "-1"], "--alpha must be a finite number >= 0, got -1.0"),
])
def test_bandit_cli_rejects_a_bad_alpha_in_one_line(args, message):
    from typer.testing import CliRunner

    from relaydiff.cli import app

    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_bandit_live_cli_passes_alpha_to_the_run(monkeypatch):
    """--alpha reaches the live run's config (and the shared LinUCB it makes); without it, LiveConfig's default."""
    from typer.testing import CliRunner

    from relaydiff.cli import app
    from relaydiff.serve import bandit_live

    seen = []

    def fake_run(cfg, say, report_dir):
        seen.append(cfg)
        return {"policies": {"bandit_linucb_shared": {"arm_counts": {}, "mean_utility": 0.0, "mean_quality": 0.0,
                                                      "mean_latency_s": 0.0}}, "report": []}

    monkeypatch.setattr(bandit_live, "run_live", fake_run)
    for args, alpha in ((["--alpha", "0.25"], 0.25), ([], bandit_live.LiveConfig.alpha)):
        res = CliRunner().invoke(app, ["bandit", "live", "--no-compare-fixed", *args])
        assert res.exit_code == 0, res.output
        assert seen[-1].alpha == alpha
    st = RelayStream(load_relay_scenario("stationary").model_copy(update={"requests": 5}), _pool(), seed=0)
    assert bandit_live.new_bandit(seen[0], st.arms).bandit.alpha == 0.25


def test_bench_bandit_reports_every_algorithm_and_times_both_shared_paths():
    """A small bench: the JSON of record's fields, the oracle's regret 0, and the decision timings
    (shared LinUCB's projected and full-stack paths interleaved with LinUCB and MABWiser's predict)."""
    pytest.importorskip("mabwiser")
    from relaydiff.bench.bandit import BanditBenchConfig, bench_bandit

    cfg = BanditBenchConfig(scenarios=("stationary",), seeds=1, requests=120, timing_rounds=2, timing_calls=20)
    out = bench_bandit(cfg, _pool())
    algs = out["algorithms"]
    assert {"linucb", RELAY_BANDIT, "lints", "egreedy", "ucb1", "random", "oracle", "mabwiser_linucb",
            "mabwiser_lints"} <= set(algs) and sum(k.startswith("fixed_") for k in algs) == 8
    assert algs["oracle"]["regret"] == 0.0 and algs["oracle"]["reward_ratio_to_oracle"] == 1.0
    for a in algs.values():
        assert a["decide_us_median"] > 0 and np.isfinite(a["regret"])
    t = out["timing"]
    for key in ("linucb_decide_us", f"{RELAY_BANDIT}_decide_us", f"{RELAY_BANDIT}_full_stack_decide_us",
                "mabwiser_linucb_predict_us"):
        assert len(t[key]) == 2 and all(v > 0 for v in t[key])
    assert set(out["targets"][RELAY_BANDIT]) >= {"decide_us_median<15", "reward>=0.95_oracle"}
    assert out["targets"][RELAY_BANDIT]["recovers_within_300"] is None and out["shifts"] == {}  # nothing shifts here
