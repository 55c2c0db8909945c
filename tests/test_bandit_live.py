"""The live relay loop (serve.bandit_live) on the tiny family: edge batching, device scaling, judge rewards."""

from __future__ import annotations

import time

import numpy as np
import pytest

from relaydiff.sched.bandit import FixedArm, make_bandit
from relaydiff.serve.bandit_live import LiveConfig, LiveStream
from relaydiff.serve.bandit_prompts import sample_prompts
from relaydiff.sim.relay_stream import CONTEXT_FEATURES, PromptPool, RelayStream
from relaydiff.system.relay_scenario import load_relay_scenario


def _live(tiny, n=4, rate=4.0):
    from relaydiff.quality.judge import load_judge

    prompts, scenes = sample_prompts(2, seed=3)
    rng = np.random.default_rng(0)
    pool = PromptPool(rng.normal(0, 1, (len(prompts), 4)), np.array([len(s.objects) for s in scenes]))
    sc = load_relay_scenario("stationary").model_copy(update={"requests": n, "arrival_rate_hz": rate, "steps": 20})
    stream = RelayStream(sc, pool, seed=0)
    scale = np.full(n, 2.0)
    return LiveStream(LiveConfig(requests=n, max_batch=4), tiny, load_judge(), stream, prompts, scenes, scale, 3.0)


def test_live_loop_serves_every_request_and_learns(tiny):
    live = _live(tiny)
    names, d = live.stream.arm_names, len(CONTEXT_FEATURES)
    bandit = make_bandit("linucb", names, d, feature_names=CONTEXT_FEATURES)
    run = live.serve("bandit", bandit.decide, bandit.update)
    n = live.stream.scenario.requests
    assert len(run.rewards) == n and bandit.t == n  # every reward reached the bandit
    lo, hi = bandit.reward_range
    assert all(lo <= r <= hi for r in run.rewards)
    assert all(0.0 <= q <= 1.0 for q in run.quality)
    # a device-only request's latency is the scaled device time plus the profile's decode, never less
    dev_only = names.index("device_only")
    fixed = live.serve("fixed", FixedArm(names, d, arm=dev_only).decide, None)
    assert all(lat > live.stream.decode_s[i] for i, lat in enumerate(fixed.latency_s))
    again = live.serve("fixed", FixedArm(names, d, arm=dev_only).decide, None)
    assert again.quality == fixed.quality  # same seeds, same images, same judge reading
    # each (request, arm) image is made and judged once; the bandit's picks are among them
    assert {(i, a) for i, a in enumerate(run.arms)} | {(i, dev_only) for i in range(n)} == set(live.finished)


def test_live_edge_only_waits_for_the_edge(tiny):
    live = _live(tiny, n=4, rate=1000.0)  # everyone at once: the edge batches them
    names, d = live.stream.arm_names, len(CONTEXT_FEATURES)
    edge = live.serve("edge", FixedArm(names, d, arm=names.index("edge_only")).decide, None)
    st = live.stream
    for i, lat in enumerate(edge.latency_s):
        assert lat > st.up_s[i] + st.link_s[i] + st.decode_s[i]  # plus the measured edge steps


def test_live_shared_bandit_serves_the_stream(tiny):
    from relaydiff.sched.relay_policy import RELAY_BANDIT, RelayBandit

    live = _live(tiny, n=3)
    bandit = RelayBandit.make(RELAY_BANDIT, live.stream.arms, alpha=0.1, l2=0.1)
    run = live.serve("bandit", bandit.decide, bandit.update)
    assert bandit.bandit.t == 3 and len(run.rewards) == 3


def test_live_summary_and_report(tmp_path):
    from relaydiff.serve.bandit_live import LiveRun, _report, _summary
    from relaydiff.system.profiles import parse_profile

    names = ("edge_only", "device_only")
    edge = parse_profile({"kind": "edge", "members": {"large": {"step_latency_s": {"1": 0.02, "4": 0.05}}}})
    runs = [LiveRun("bandit_linucb", [0, 1, 1], [0.3, 0.2, 0.4], [0.8, 0.7, 0.9], [1.0, 2.0, 2.5]),
            LiveRun("fixed_edge_only", [0, 0, 0], [0.1, 0.2, 0.3], [0.8, 0.8, 0.8], [1.0, 1.0, 1.0])]
    cfg = LiveConfig(requests=3)
    out = _summary(cfg, runs, names, np.array([2.0, 3.0, 2.5]), 0.01, edge, 0.0)
    assert not out["complete"] and not out["bandit_beats_every_fixed_arm"]  # one fixed arm still missing
    assert out["policies"]["bandit_linucb"]["arm_counts"] == {"edge_only": 1, "device_only": 2}
    assert abs(out["policies"]["fixed_edge_only"]["bandit_minus_this"]["mean"] - 0.1) < 1e-12
    runs.append(LiveRun("fixed_device_only", [1, 1, 1], [0.0, 0.1, 0.2], [0.7] * 3, [2.0] * 3))
    out = _summary(cfg, runs, names, np.array([2.0, 3.0, 2.5]), 0.01, edge, 0.0)
    # above every fixed arm on the mean, but 3 noisy requests leave 0 inside the paired interval
    assert out["complete"] and out["bandit_mean_above_every_fixed_arm"] and not out["bandit_beats_every_fixed_arm"]
    assert out["policies"]["fixed_device_only"]["bandit_minus_this"]["ci95"][0] < 0
    vs = out["bandit_vs_best_fixed"]
    assert vs["best_fixed"] == "fixed_edge_only" and abs(vs["bandit_minus_best_mean"] - 0.1) < 1e-12
    assert vs["ci95"][0] < 0.1 < vs["ci95"][1]
    files = _report(out, runs, names, tmp_path)
    assert all((tmp_path / f).exists() for f in ("bandit_live.json", "bandit_live.png")) and len(files) == 2


def test_a_win_needs_every_paired_interval_above_zero_and_reports_pool():
    from relaydiff.serve.bandit_live import bandit_vs_fixed, pool_reports

    rewards = {"bandit_x": [0.30, 0.31, 0.32, 0.33], "fixed_a": [0.10, 0.10, 0.11, 0.10],
               "fixed_b": [0.0, 0.01, 0.0, 0.02]}
    v = bandit_vs_fixed(rewards, "bandit_x")
    assert v["bandit_beats_every_fixed_arm"] and v["bandit_vs_best_fixed"]["best_fixed"] == "fixed_a"
    assert not bandit_vs_fixed(rewards, "bandit_x", complete=False)["bandit_beats_every_fixed_arm"]
    noisy = dict(rewards, fixed_b=[0.5, 0.0, 0.6, 0.0])  # above on the mean, not beyond the noise
    assert not bandit_vs_fixed(noisy, "bandit_x")["bandit_beats_every_fixed_arm"]

    def report(seed, per):
        return {"config": {"seed": seed, "alpha": 0.3, "requests": 2, "report": f"r{seed}"}, "complete": True,
                "per_request": {n: {"rewards": r} for n, r in per.items()}}

    halves = [{n: r[:2] for n, r in rewards.items()}, {n: r[2:] for n, r in rewards.items()}]
    pooled = pool_reports([report(2, halves[0]), report(3, halves[1])])
    assert pooled["seeds"] == [2, 3] and pooled["requests"] == 4 and pooled["bandit"] == "bandit_x"
    assert pooled["by_arm"] == v["by_arm"] and pooled["bandit_beats_every_fixed_arm"]
    with pytest.raises(ValueError, match="repeat a seed"):
        pool_reports([report(2, halves[0]), report(2, halves[1])])
    other = report(3, halves[1])
    other["config"]["alpha"] = 0.1
    with pytest.raises(ValueError, match=r"another protocol than report 0's \(alpha\)"):
        pool_reports([report(2, halves[0]), other])


def test_step_latency_uses_the_given_clock(tiny):
    from itertools import count

    from relaydiff.engine.profile import measure_step_latency

    ticks = count()
    lat = measure_step_latency(tiny, "large", [1, 2], steps=2, warmup=1, clock=lambda: 0.5 * next(ticks))
    assert lat == {1: 0.5, 2: 0.5}  # each step: two clock reads, half a unit apart
    assert LiveConfig().clock is time.thread_time and LiveConfig(cpu_clock=False).clock is time.perf_counter


def test_device_time_is_rescaled_by_the_step_measured_after_it(tiny, monkeypatch):
    """With recalibrate, each device segment is scaled by this machine's step measured right after it
    (a stand-in reading 0.25 s); without, by the start's scale (2 in _live). The clock is a counter, so
    each device segment measures 1 unit here."""
    from itertools import count

    import relaydiff.serve.bandit_live as bl

    d, measured = len(CONTEXT_FEATURES), []

    def reference(family, member, sizes, **kw):
        measured.append(member)
        return {1: 0.25}

    monkeypatch.setattr(bl, "measure_step_latency", reference)
    ticks = count()
    monkeypatch.setattr(time, "thread_time", lambda: float(next(ticks)))
    for recal in (False, True):
        live = _live(tiny, n=3)
        live.cfg = LiveConfig(requests=3, max_batch=4, recalibrate=recal)
        names = live.stream.arm_names
        run = live.serve("device", FixedArm(names, d, arm=names.index("device_only")).decide, None)
        device_s = np.array(run.latency_s) - live.stream.decode_s[:3]
        expected = live.stream.device_step_s[:3] / 0.25 if recal else np.full(3, 2.0)
        np.testing.assert_allclose(device_s, expected, rtol=1e-9)
        assert len(live.reference_steps) == (3 if recal else 0)
    assert measured == ["small"] * 3


def test_model_check_compares_live_with_the_simulators_model(tiny):
    """Per arm and user kind: measured device time over the modelled one, quality minus expected."""
    from relaydiff.serve.bandit_live import model_check

    live = _live(tiny, n=4)
    st, names = live.stream, live.stream.arm_names
    dev, edge = names.index("device_only"), names.index("edge_only")
    live.finished = {(i, dev): (st.expected_q[i, dev] + 0.1, 1.5 * (st._device_s[i, dev] - st.decode_s[i]))
                     for i in range(4)}
    live.finished[0, edge] = (st.expected_q[0, edge] - 0.2, 0.0)
    out = model_check(live)
    kinds = {"styled" if st.rho[i] > 0 else "plain" for i in range(4)}
    assert set(out["device_only"]) == kinds
    for row in out["device_only"].values():
        assert abs(row["device_time_over_model_median"] - 1.5) < 1e-9
        assert abs(row["quality_minus_expected_mean"] - 0.1) < 1e-9
    (row,) = out["edge_only"].values()
    assert row["n"] == 1 and row["device_time_over_model_median"] is None
    assert abs(row["quality_minus_expected_mean"] + 0.2) < 1e-9


def test_a_styled_device_segment_is_not_charged_the_adapter_switch(tiny, monkeypatch):
    """One process plays every user: switching a user's adapter in happens before the device timer
    (a stand-in switch costs 100 clock units; each U-Net call 1), so a styled device-only request is
    charged its steps alone, and an unstyled one no switch back."""
    from relaydiff.serve.bandit_live import LiveConfig

    now = [0.0]
    monkeypatch.setattr(time, "thread_time", lambda: now[0])
    live = _live(tiny, n=4)
    live.cfg = LiveConfig(requests=4, max_batch=4, recalibrate=False)
    live.style = ["style_a", None, "style_b", None]
    real_unet, real_denoise = tiny.unet, tiny.denoise

    def unet(member, adapter=None):
        if tiny._active.get(member) != adapter:
            now[0] += 100.0
        return real_unet(member, adapter)

    def denoise(*args, **kwargs):
        now[0] += 1.0
        return real_denoise(*args, **kwargs)

    monkeypatch.setattr(tiny, "unet", unet)
    monkeypatch.setattr(tiny, "denoise", denoise)
    names, d = live.stream.arm_names, len(CONTEXT_FEATURES)
    run = live.serve("device", FixedArm(names, d, arm=names.index("device_only")).decide, None)
    device_s = np.array(run.latency_s) - live.stream.decode_s[:4]
    np.testing.assert_allclose(device_s, 2.0 * live.stream.scenario.steps)  # scale 2 x 20 U-Net calls
