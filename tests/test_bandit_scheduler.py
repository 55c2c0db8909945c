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
    assert not sched.observe(recs[1], SimpleNamespace(latency_ms=4000.0, quality=None))  # nothing to learn from
    assert sched.observe(recs[1], ok) and sched.observe(recs[2], ok)
    assert not sched.observe(recs[2], ok)  # each decision is learned from once
    assert sched.updates == 3 and not sched.pending


def test_the_reward_is_the_simulators_utility():
    from relaydiff.sim.relay_arm_features import arm_context
    from relaydiff.system.profiles import load_profile

    sched = BanditScheduler("large", "small", featurizer=_words)
    job = _jobs()[0]
    (d,) = sched.decide_jobs([job], 1)
    a, x, _, _ = sched.pending[1, job.prompt, d.k][0]
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
