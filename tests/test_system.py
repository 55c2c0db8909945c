"""System model: scenario validation, sampling, the evaluate function, profiles, quality."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from relaydiff.system import channel
from relaydiff.system.problem import (
    Decision,
    InfeasibleDecision,
    RoundInstance,
    evaluate,
    objective_value,
    sample_instance,
)
from relaydiff.system.profiles import ProfileError, available_profiles, load_profile, parse_profile
from relaydiff.system.quality import QualityModel, QualityTableError, load_quality
from relaydiff.system.scenario import ScenarioError, available_scenarios, load_scenario, parse_scenario

DEFAULT = load_scenario("default")  # resolved once, as the CLI does


# ---- scenarios ---------------------------------------------------------------------------------
def test_shipped_scenarios_load() -> None:
    assert "default" in available_scenarios()
    for name in available_scenarios():
        sc = load_scenario(name)
        inst = sample_instance(sc, n_users=5, seed=0)
        assert inst.n_users == 5 and inst.steps == sc.steps


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"splits": [8, 4]}, "splits"),
        ({"splits": [4, 30]}, "splits"),
        ({"edge": {"capacity": [0.0, 1.0]}}, "edge.capacity"),
        ({"edge": {"capacity": [0.9, 0.5]}}, "edge.capacity"),
        ({"wireless": {"bandwidth_hz": -1}}, "wireless.bandwidth_hz"),
        ({"wireless": {"bandwith_hz": 1e6}}, "wireless.bandwith_hz"),
        ({"preferences": {"concentration": [1, 0, 1]}}, "preferences.concentration"),
        ({"devices": {"phone-mid": -1}}, "devices"),
        ({"n_users": "many"}, "n_users"),
    ],
)
def test_scenario_errors_name_the_field(data: dict, field: str) -> None:
    with pytest.raises(ScenarioError, match=field.replace(".", r"\.")):
        parse_scenario(data, "test.yaml")


def test_scenario_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="not found"):
        load_scenario(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ScenarioError, match="cannot parse"):
        load_scenario(bad)
    lst = tmp_path / "list.json"
    lst.write_text("[1, 2]")
    with pytest.raises(ScenarioError, match="mapping"):
        load_scenario(lst)
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"name": "x", "n_users": 3}))
    assert load_scenario(ok).n_users == 3


def test_unknown_profile_in_scenario() -> None:
    with pytest.raises(ProfileError, match="not found"):
        sample_instance(parse_scenario({"devices": {"no-such-phone": 1.0}}), n_users=2)


# ---- sampling and evaluate ----------------------------------------------------------------------
def test_sampling_is_deterministic() -> None:
    a = sample_instance(DEFAULT, n_users=20, seed=4)
    b = sample_instance(DEFAULT, n_users=20, seed=4)
    c = sample_instance(DEFAULT, n_users=20, seed=5)
    assert a.to_dict() == b.to_dict()
    assert a.to_dict() != c.to_dict()


def _reference_evaluate(inst: RoundInstance, k: np.ndarray) -> np.ndarray:
    """Per-user utility written out the slow way: explicit pairwise min for the edge time."""
    adm = k > 0
    g = np.sqrt(inst.bw_cost) * adm
    b = g / g.sum() if g.sum() > 0 else np.zeros_like(g)
    u = np.zeros(inst.n_users)
    for i in range(inst.n_users):
        T, ki = inst.steps, int(k[i])
        dev = (T - ki) * inst.device_step_s[i] + inst.decode_s[i]
        en = (T - ki) * inst.device_step_j[i] + inst.decode_j[i]
        lat = dev
        if ki > 0:
            edge = (inst.edge_alpha_s * ki + inst.edge_beta_s * sum(min(ki, int(kj)) for kj in k[adm])) / inst.capacity
            down = 8 * inst.latent_bytes / (b[i] * inst.bandwidth_hz * inst.spectral_eff[i])
            lat += inst.uplink_s[i] + edge + down
            en += inst.tx_power_w[i] * inst.uplink_s[i] + inst.rx_power_w[i] * down
        u[i] = (
            inst.w_quality[i] * inst.quality[i, ki]
            + inst.w_latency[i] * (1 - lat / (T * inst.device_step_s[i] + inst.decode_s[i]))
            + inst.w_energy[i] * (1 - en / (T * inst.device_step_j[i] + inst.decode_j[i]))
        )
    return u


@pytest.mark.parametrize("seed", range(6))
def test_evaluate_matches_reference(seed: int) -> None:
    inst = sample_instance(DEFAULT, n_users=9, seed=seed)
    k = np.random.default_rng(seed).choice(inst.options, size=9)
    obj, bd = evaluate(inst, Decision(k))
    ref = _reference_evaluate(inst, k)
    assert bd.utility == pytest.approx(ref, rel=1e-10)
    assert obj == pytest.approx(ref.sum())
    assert objective_value(inst, k) == pytest.approx(obj)
    assert bd.batch_per_step[0] == (k > 0).sum()
    assert np.all(np.diff(bd.batch_per_step) <= 0)


def test_all_local_reference_values() -> None:
    inst = sample_instance(DEFAULT, n_users=6, seed=1)
    obj, bd = evaluate(inst, np.zeros(6, dtype=int))
    assert bd.latency_s == pytest.approx(inst.ref_latency_s)
    assert bd.energy_j == pytest.approx(inst.ref_energy_j)
    assert bd.utility == pytest.approx(inst.w_quality * inst.quality[:, 0])
    assert obj > 0


def test_infeasible_decisions_are_rejected() -> None:
    inst = sample_instance(parse_scenario({"edge": {"max_batch": 2}}), n_users=4, seed=0)
    with pytest.raises(InfeasibleDecision, match="not in the allowed options"):
        evaluate(inst, np.array([0, 3, 0, 0]))
    with pytest.raises(InfeasibleDecision, match="at most 2"):
        evaluate(inst, np.array([4, 4, 4, 0]))
    with pytest.raises(InfeasibleDecision, match="shape"):
        evaluate(inst, np.array([0, 4]))
    with pytest.raises(InfeasibleDecision, match="sum to"):
        evaluate(inst, Decision(np.array([4, 4, 0, 0]), np.array([0.8, 0.8, 0, 0])))
    with pytest.raises(InfeasibleDecision, match="positive bandwidth"):
        evaluate(inst, Decision(np.array([4, 4, 0, 0]), np.array([1.0, 0, 0, 0])))


def test_instance_validation_and_json_roundtrip(tmp_path: Path) -> None:
    inst = sample_instance(DEFAULT, n_users=5, seed=2)
    inst.save(tmp_path / "r.json")
    back = RoundInstance.load(tmp_path / "r.json")
    k = np.array([0, 4, 8, 20, 12])
    assert evaluate(back, k)[0] == pytest.approx(evaluate(inst, k)[0])
    bad = inst.to_dict()
    bad["capacity"] = 1.5
    with pytest.raises(ValueError, match="capacity"):
        RoundInstance.from_dict(bad)
    bad = inst.to_dict()
    bad["uplink_s"] = bad["uplink_s"][:3]
    with pytest.raises(ValueError, match="uplink_s"):
        RoundInstance.from_dict(bad)


def test_batch_interaction_grows_with_batch() -> None:
    """Adding co-batched users slows an admitted user's edge phase (the quadratic term)."""
    inst = sample_instance(DEFAULT, n_users=6, seed=3)
    alone = evaluate(inst, np.array([8, 0, 0, 0, 0, 0]))[1].edge_s[0]
    shared = evaluate(inst, np.array([8, 20, 20, 4, 0, 0]))[1].edge_s[0]
    expect = (inst.edge_alpha_s * 8 + inst.edge_beta_s * (8 + 8 + 8 + 4)) / inst.capacity
    assert alone == pytest.approx((inst.edge_alpha_s + inst.edge_beta_s) * 8 / inst.capacity)
    assert shared == pytest.approx(expect)


# ---- channel, profiles, quality ---------------------------------------------------------------------
def test_channel() -> None:
    assert channel.path_loss_db(np.array([1000.0]))[0] == pytest.approx(128.1)
    assert channel.spectral_efficiency(np.array([1.0]))[0] == pytest.approx(1.0)
    t = channel.transfer_time_s(1000, np.array([0.5, 0.0]), 1e6, np.array([2.0, 2.0]))
    assert t[0] == pytest.approx(8000 / 1e6) and np.isinf(t[1])


def test_shipped_profiles_cite_sources() -> None:
    names = available_profiles()
    assert {"phone-flagship", "phone-mid", "phone-low", "laptop"} <= set(names)
    for name in names:
        prof = load_profile(name)
        for m in prof.members.values():
            assert m.source, f"{name}: member without a source"
        assert prof.sources, f"{name}: no sources"
        if prof.kind == "edge":
            alpha, beta = prof.member().fit_linear()
            assert alpha >= 0 and beta > 0 and prof.max_batch


def test_profile_errors(tmp_path: Path) -> None:
    good = {"kind": "device", "members": {"m": {"step_latency_s": {"1": 0.5}}}}
    assert parse_profile(good).member("m").at(1) == 0.5
    with pytest.raises(ProfileError, match="kind"):
        parse_profile({**good, "kind": "cloud"})
    with pytest.raises(ProfileError, match="step_latency_s"):
        parse_profile({**good, "members": {"m": {"step_latency_s": {"0": 0.5}}}})
    with pytest.raises(ProfileError, match="decode_s"):
        parse_profile({**good, "decode_s": -1})
    with pytest.raises(ProfileError, match="lacks"):
        parse_profile(good).require("decode_s")
    with pytest.raises(ProfileError, match="no member"):
        parse_profile(good).member("x")


def test_linear_fit() -> None:
    prof = parse_profile({"kind": "edge", "members": {"m": {"step_latency_s": {"1": 0.03, "2": 0.05, "4": 0.09}}}})
    alpha, beta = prof.member().fit_linear()
    assert alpha == pytest.approx(0.01) and beta == pytest.approx(0.02)


def test_default_quality_shape() -> None:
    qm = QualityModel()
    q = qm.table(20, np.array([0.2, 0.9, 0.5]), np.array([0.0, 0.0, 1.0]))
    assert q.shape == (3, 21)
    assert np.all(np.diff(q[0]) >= 0) and np.all(np.diff(q[1]) >= 0)  # fidelity only: rises with k
    assert np.all(np.diff(q[2]) <= 0)  # style only: falls with k
    assert q[1, 0] < q[0, 0]  # complex prompts suffer more on the small model
    assert q[0, 20] == pytest.approx(qm.large_fidelity)


def test_quality_table_from_bench_json(tmp_path: Path) -> None:
    path = tmp_path / "q.json"
    path.write_text(json.dumps({
        "relay": {"k": [0, 5, 10, 20], "fidelity": [0.6, 0.8, 0.85, 0.9], "steps": 20},
        "personalization": [{"k": 0, "fidelity": 0.9}, {"k": 10, "fidelity": 0.8}, {"k": 20, "fidelity": 0.3}],
    }))
    qm = load_quality(path)
    assert qm.source.startswith("measured")
    q = qm.table(20, np.array([0.5]), np.array([0.0]))[0]
    assert q[0] == pytest.approx(0.6) and q[20] == pytest.approx(0.9) and q[5] == pytest.approx(0.8)
    s = qm.table(20, np.array([0.5]), np.array([1.0]))[0]
    assert s[0] == pytest.approx(1.0) and s[20] == pytest.approx(0.3 / 0.9)
    # the layout `relaydiff bench quality --json` writes
    path.write_text(json.dumps({
        "config": {"steps": 10},
        "relay": [{"k": k, "fidelity": 0.5 + 0.04 * k, "fd": 1.0} for k in range(11)],
        "personalization": {"split_points": [0, 4, 8, 10], "styles": {
            "ink": {"style_fidelity": [0.9, 0.8, 0.5, 0.3]}, "neon": {"style_fidelity": [0.7, 0.6, 0.3, 0.1]}}},
    }))
    qm = load_quality(path)
    q = qm.table(10, np.array([0.5]), np.array([0.0]))[0]
    assert q == pytest.approx(0.5 + 0.04 * np.arange(11))
    s = qm.table(10, np.array([0.5]), np.array([1.0]))[0]
    assert s[0] == pytest.approx(1.0) and s[10] == pytest.approx(0.2 / 0.8) and np.all(np.diff(s) <= 1e-12)
    path.write_text(json.dumps({"relay": [{"k": 0, "fidelity": 0.5}, {"k": 8, "fidelity": 0.9}],
                                "personalization": {"skipped": "no adapters"}}))
    assert "skipped" in load_quality(path).source
    path.write_text(json.dumps({"relay": {"k": [0], "fidelity": [0.5]}}))
    with pytest.raises(QualityTableError, match="two"):
        load_quality(path)
    path.write_text("{}")
    with pytest.raises(QualityTableError, match="relay"):
        load_quality(path)
    with pytest.raises(QualityTableError, match="not found"):
        load_quality(tmp_path / "none.json")


# ---- relaydiff profile: measured profiles feed the sampler ---------------------------------------
def test_measured_profile_roundtrip(tiny, tmp_path: Path) -> None:
    pytest.importorskip("relaydiff.engine.profile", reason="the engine's profiler is not available")
    from relaydiff.bench.profile import measure_profile
    from relaydiff.system.profiles import save_profile

    prof = measure_profile(tiny, ["small"], [1], kind="device", name="cpu-here", steps=1,
                           step_power_w=10.0, radio_power_w=1.0)
    path = save_profile(prof, tmp_path / "cpu-here.json")
    back = load_profile(path)
    assert back.kind == "device" and back.member("small").at(1) > 0 and back.decode_s > 0
    assert back.decode_j == pytest.approx(10.0 * back.decode_s)
    sc = parse_scenario({"devices": {str(path): 1.0}})
    inst = sample_instance(sc, n_users=3, seed=0)
    assert inst.device_step_s == pytest.approx(np.full(3, back.member("small").at(1)))
    from dataclasses import replace

    save_profile(replace(prof, step_power_w=None, decode_j=None), tmp_path / "nopower.json")
    with pytest.raises(ProfileError, match="step_power_w"):
        sample_instance(parse_scenario({"devices": {str(tmp_path / "nopower.json"): 1.0}}), n_users=2)


def test_quality_auto_uses_shipped_reference_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import relaydiff.system.quality as quality

    monkeypatch.setattr(quality, "REFERENCE_TABLE", tmp_path / "absent.json")
    assert load_quality("auto").relay_x is None and load_quality("fitted").relay_x is None
    table = tmp_path / "quality.json"
    table.write_text(json.dumps({"relay": [{"k": 0, "fidelity": 0.4}, {"k": 20, "fidelity": 0.8}]}))
    monkeypatch.setattr(quality, "REFERENCE_TABLE", table)
    assert load_quality().source == f"measured table {table}"
    inst = sample_instance(parse_scenario({}), n_users=2, seed=0)
    assert inst.meta["quality_source"] == f"measured table {table}"
    assert load_quality("fitted").relay_x is None


# ---- zero preference weights (issue 18) ----------------------------------------------------------
def _with_weights(inst: RoundInstance, user: int, w: tuple[float, float, float], **over) -> RoundInstance:
    d = inst.to_dict()
    for name, value in zip(("w_quality", "w_latency", "w_energy"), w):
        d[name][user] = value
    for name, value in over.items():
        d[name][user] = value
    return RoundInstance.from_dict(d)


@pytest.mark.parametrize("weights", [(1.0, 0.0, 0.0), (0.5, 0.0, 0.5)])
def test_zero_weights_give_a_finite_objective(weights) -> None:
    """A user who weighs neither latency nor downlink energy gets no downlink share: no 0 x inf = NaN."""
    from relaydiff.sched.exact import solve_exact

    inst = _with_weights(sample_instance(DEFAULT, n_users=4, seed=3), 0, weights, rx_power_w=0.0)
    assert inst.bw_cost[0] == 0.0
    k = np.array([20, 8, 8, 0])
    obj, br = evaluate(inst, k)
    assert br.bandwidth[0] == 0.0 and np.isinf(br.latency_s[0])  # honest: its latent never gets a share
    assert np.isfinite(obj) and np.all(np.isfinite(br.utility))
    assert obj == pytest.approx(objective_value(inst, k), rel=1e-12)
    # the zero-weight user's utility is its quality term alone (plus the energy it saves on the device)
    assert br.utility[0] == pytest.approx(weights[0] * inst.quality[0, 20] + weights[2] * (1 - br.energy_j[0] / inst.ref_energy_j[0]))
    sol = solve_exact(inst)
    assert sol.status == "optimal" and np.isfinite(sol.objective)
    assert sol.objective == pytest.approx(objective_value(inst, sol.decision.k), rel=1e-9)


def test_weights_that_leave_a_term_undefined_are_rejected() -> None:
    inst = sample_instance(DEFAULT, n_users=3, seed=1)
    with pytest.raises(ValueError, match="w_energy: user 1"):
        _with_weights(inst, 1, (0.5, 0.0, 0.5), device_step_j=0.0, decode_j=0.0)
    _with_weights(inst, 1, (0.5, 0.5, 0.0), device_step_j=0.0, decode_j=0.0)  # energy not weighed: fine
    with pytest.raises(ScenarioError, match=r"preferences\.concentration"):
        parse_scenario({"preferences": {"concentration": [1.0, float("nan"), 1.0]}})
    with pytest.raises(ScenarioError, match=r"preferences\.concentration"):
        parse_scenario({"preferences": {"concentration": [1.0, float("inf"), 1.0]}})
