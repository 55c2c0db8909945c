"""The relay bandit behind the service's round interface (serve.bandit_scheduler): plans per job, rewards from reports."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from relaydiff.serve.bandit_scheduler import BanditScheduler
from relaydiff.serve.rounds import RoundJob


def _words(prompts):  # a stand-in for the MiniLM featurizer: word count / 16 and three zeros
    return np.array([[len(p.split()) / 16, 0.0, 0.0, 0.0] for p in prompts])


def _jobs(steps=8):
    return [RoundJob(steps, "a red circle", (0.6, 0.3, 0.1), "phone-mid", None),
            RoundJob(steps, "a big blue square left of a small green triangle", (0.2, 0.7, 0.1), "laptop", "outline"),
            RoundJob(steps, "a red circle", (0.6, 0.3, 0.1), "phone-mid", None)]


def test_plans_cover_the_jobs_steps_and_the_arms():
    sched = BanditScheduler("large", "small", featurizer=_words)
    seen = set()
    for rnd in range(4):  # no feedback yet: the arms in turn
        for job, d in zip(_jobs(), sched.decide_jobs(_jobs(), rnd, edge_remaining=[3, 5])):
            segs = d.plan.segments
            assert segs[0].start == 0 and segs[-1].end == job.steps
            assert d.kind == ("edge_only" if d.k == job.steps else "device_only" if d.k == 0 else "relay")
            seen.add((d.k, segs[-1].guidance if segs[-1].node == "device" else None))
    assert len(seen) >= 6  # 8 arms at 8 steps: k in {0, 2, 3, 4, 6, 8}, with and without device guidance


def test_reports_become_rewards_and_updates():
    sched = BanditScheduler("large", "small", featurizer=_words)
    decided = sched.decide_jobs(_jobs(), 7)
    recs = [SimpleNamespace(round_id=7, request={"prompt": j.prompt}, handoff_step=d.k) for j, d in zip(_jobs(), decided)]
    ok = SimpleNamespace(latency_ms=4000.0, quality=0.8)
    assert sched.observe(recs[0], ok) and sched.policy.bandit.t == 1
    assert not sched.observe(recs[1], SimpleNamespace(latency_ms=None, quality=0.8))  # nothing to learn from
    assert sched.observe(recs[1], SimpleNamespace(latency_ms=4000.0, quality=None)) and sched.observe(recs[2], ok)
    assert not sched.observe(recs[2], ok)  # each decision is learned from once
    assert not sched.observe(SimpleNamespace(round_id=99, request={"prompt": "x"}, handoff_step=0), ok)  # unknown
    assert sched.updates == 3 and not sched.pending


def test_without_a_quality_reading_the_arms_measured_quality_is_used():
    """A report without quality (and the edge's own completions): the table's expected quality of the arm."""
    sched = BanditScheduler("large", "small", featurizer=_words)
    job = _jobs()[1]  # styled (an adapter): rho = 0.5
    (d,) = sched.decide_jobs([job], 3)
    a, x, wq, ref, rho = sched.pending[3, job.prompt, d.k][0]
    sched.observe(SimpleNamespace(round_id=3, request={"prompt": job.prompt}, handoff_step=d.k),
                  SimpleNamespace(latency_ms=2500.0, quality=None))
    arm = sched.arms[a]
    q = 0.5 * np.mean(arm.fidelity) + 0.5 * arm.style_fidelity
    reward = wq * q - (1 - wq) * min(2.5 / ref, 3.0)
    from relaydiff.sim.relay_arm_features import arm_context

    bandit = sched.policy.bandit
    np.testing.assert_allclose(bandit.b, reward * bandit.arm_features[a] * arm_context(x, len(sched.arms)))


def test_the_reward_is_the_simulators_utility():
    from relaydiff.sim.relay_arm_features import arm_context
    from relaydiff.system.profiles import load_profile

    sched = BanditScheduler("large", "small", featurizer=_words)
    job = _jobs()[0]
    (d,) = sched.decide_jobs([job], 1)
    a, x, _, _, _ = sched.pending[1, job.prompt, d.k][0]
    sched.observe(SimpleNamespace(round_id=1, request={"prompt": job.prompt}, handoff_step=d.k),
                  SimpleNamespace(latency_ms=4000.0, quality=0.8))
    prof = load_profile("phone-mid")
    ref = 8 * prof.member("small").at(1) + prof.decode_s
    wq = 0.6 / 0.9
    reward = wq * 0.8 - (1 - wq) * min(4.0 / ref, 3.0)
    bandit = sched.policy.bandit
    np.testing.assert_allclose(bandit.b, reward * bandit.arm_features[a] * arm_context(x, len(sched.arms)))


def test_a_policy_for_other_arms_is_refused():
    from relaydiff.sched.relay_policy import RelayBandit
    from relaydiff.system.relay_arms import ArmSpec, load_relay_arms

    other = RelayBandit.make("linucb_shared", load_relay_arms((ArmSpec(20), ArmSpec(0))))
    with pytest.raises(ValueError, match="are not the scenario's"):
        BanditScheduler("large", "small", policy=other, featurizer=_words)


# ---- wired into the edge service (`relaydiff serve edge --scheduler bandit`) ----------------

ALICE = "alice-token-0123456789"


@pytest.fixture
def word_features(monkeypatch):
    """The service fits MiniLM components at start (seconds); the tests use the word-count stand-in."""
    import relaydiff.serve.bandit_scheduler as bs

    monkeypatch.setattr(bs, "calibration_featurizer", lambda seed=0: _words)


def _service_settings(**kw):
    from relaydiff.serve.edge import EdgeSettings

    return EdgeSettings(**{**dict(scheduler="bandit", default_steps=8, round_window_s=0.01, fetch_timeout_s=30.0,
                                  report_timeout_s=30.0, share_prefix=False), **kw})


def _wait(cond, timeout_s=20.0):
    import time

    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def test_serve_edge_with_the_bandit_learns_from_every_completion(tiny, word_features):
    """Jobs through the HTTP service on 127.0.0.1 with the Python client: each plan is the bandit's,
    and each completion (the edge's image or the device's report) is one update of its state."""
    from relaydiff.serve.app import create_app
    from relaydiff.serve.auth import TokenTable
    from relaydiff.serve.client import DeviceClient
    from relaydiff.serve.loopback import LoopbackServer

    app = create_app(tiny, _service_settings(), TokenTable({"alice": ALICE}))
    sched = app.state.service.decider.bandit
    assert isinstance(sched, BanditScheduler) and sched.policy.bandit.t == 0
    seen = []
    observe = sched.observe
    sched.observe = lambda job, report: seen.append((job.kind, report.latency_ms)) or observe(job, report)
    prompts = ["a red circle", "two blue squares above a green triangle", "a small yellow star", "a purple circle"]
    with LoopbackServer(app) as server, DeviceClient(server.url, ALICE, tiny, timeout_s=30) as device:
        outs = []
        for i, p in enumerate(prompts):
            outs.append(device.run(p, seed=i, device_class=("phone-mid", "laptop")[i % 2]))
            assert _wait(lambda: sched.updates == i + 1), f"job {i}: {sched.updates} updates"
    bandit = sched.policy.bandit
    assert outs[0].job["kind"] == "edge_only" and outs[0].finished_by == "edge"  # cold: the arms in turn, arm 0 first
    assert bandit.t == 4 and int(bandit.counts.sum()) == 4 and not sched.pending
    assert not np.allclose(bandit.b, 0.0)
    assert [k for k, _ in seen] == [o.job["kind"] for o in outs]
    for (_, latency_ms), out in zip(seen, outs):
        if out.finished_by == "device":  # the device's own measurement is the reward's latency
            assert latency_ms == out.job["latency_ms"]
        else:
            assert 0.0 < latency_ms < 30_000.0


def test_a_device_that_vanishes_is_charged_the_fallback(tiny, word_features):
    """A device-only job whose device never fetches: the edge finishes it and the bandit learns the wait."""
    from relaydiff.serve.edge import EdgeService
    from relaydiff.serve.models import JobRequest

    service = EdgeService(tiny, _service_settings(fetch_timeout_s=0.3))
    sched = service.decider.bandit
    seen = []
    observe = sched.observe
    sched.observe = lambda job, report: seen.append((job.kind, job.id, report.latency_ms)) or observe(job, report)
    service.start()
    try:
        jobs = [JobRequest(prompt="a red circle", seed=1), JobRequest(prompt="a green square", seed=2)]
        edge_job, device_job = service.admit([("alice", j) for j in jobs])  # one round, cold: arms 0 and 1
        assert (edge_job.kind, device_job.kind) == ("edge_only", "device_only")
        assert _wait(lambda: sched.updates == 2)
        final = service.store.get(device_job.id)
        assert final.state == "done" and final.fallback
        waited = {job_id: ms for _, job_id, ms in seen}
        assert waited[device_job.id] >= 300.0  # at least the fetch timeout
        assert list(sched.policy.bandit.counts[:2]) == [1, 1] and sched.policy.bandit.t == 2
    finally:
        service.stop()


def test_an_unknown_scheduler_is_one_clear_line(tiny, tmp_path):
    from typer.testing import CliRunner

    from relaydiff.cli import app
    from relaydiff.serve.rounds import RoundDecider

    with pytest.raises(ValueError, match="unknown scheduler 'bandits'; available: bandit, .*greedy"):
        RoundDecider("bandits", "large", "small")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {ALICE}\n")
    res = CliRunner().invoke(app, ["serve", "edge", "--family", "tiny", "--tokens", str(tokens), "--db",
                                   str(tmp_path / "jobs.sqlite"), "--scheduler", "bandits"])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("error: unknown scheduler 'bandits'; available: bandit,")
