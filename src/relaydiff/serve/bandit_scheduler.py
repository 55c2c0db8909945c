"""The relay bandit as the service's scheduler: one decision per job, learning from each device report.

The one-round solvers of :mod:`relaydiff.sched.registry` see a ``RoundInstance``; the bandit needs
what an instance does not carry (the prompt's text, the edge's queue) and a reward per job. So the
service makes one call per round in place of the solver call, and learns through the hook it already
has (``EdgeService.decider_observe`` calls ``decider.solver.observe(job, report)``)::

    decided = scheduler.decide_jobs(jobs, round_id, edge_remaining)  # one Decided per RoundJob
    ...
    scheduler.observe(job_record, completion_report)                  # reward -> bandit update

Per job, the context is the simulator's (:func:`relaydiff.sim.relay_stream.relay_context`): prompt
features from its text, w_q = quality / (quality + latency) preference, the style weight
(``PERSONALIZATION_WITH_ADAPTER`` when the job has an adapter), the device class's measured profile,
the relay scenario's link at its median distance (the edge does not see the real radio, as in
:mod:`relaydiff.serve.rounds`) and the edge's queue (remaining edge steps of the chains in its
executor, plus the round's earlier jobs). Arms are priced for the quality table's T steps; a job of
S steps hands off at round(k S / T).

The reward is the simulator's utility (:func:`relaydiff.sim.relay_stream.relay_utility`) of a
quality and a latency:

- the device's completion report: its measured latency (submit to image in hand) and its quality
  reading when it sends one;
- the edge's own completions (edge-only jobs, and fallbacks after a device vanished or failed): the
  edge's measured time from accepting the job to the image, so a plan that waited on a device that
  never came back is charged the wait;
- without a quality reading the quality is the arm's measured expected quality (the table's prompt
  fidelity averaged over its complexity classes, mixed with the style fidelity for a styled job):
  the reward then teaches the measured latency and the table's quality.

Each decision is learned from once (the first completion that names it). The scheduler is called
from the edge's round thread (``decide_jobs``) and from its handlers and worker (``observe``): one
lock serializes them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from relaydiff.engine.plan import Plan
from relaydiff.sched.relay_policy import RELAY_BANDIT, RelayBandit
from relaydiff.serve.bandit_prompts import calibration_featurizer
from relaydiff.serve.rounds import Decided, PERSONALIZATION_WITH_ADAPTER, RoundJob
from relaydiff.sim.relay_stream import relay_context, relay_utility
from relaydiff.system import channel
from relaydiff.system.profiles import load_profile
from relaydiff.system.relay_arms import ArmSpec, load_relay_arms
from relaydiff.system.relay_scenario import load_relay_scenario


class BanditScheduler:
    """The relay bandit behind the service's round interface (see the module docstring)."""

    def __init__(self, large: str, small: str, relay_scenario: str = "stationary", policy: RelayBandit | None = None,
                 featurizer: Callable[[list[str]], np.ndarray] | None = None, seed: int = 0, alpha: float = 0.1,
                 l2: float = 0.1):
        sc = self.scenario = load_relay_scenario(relay_scenario)
        specs = tuple(ArmSpec(k, g) for k, g in sc.arms) if sc.arms else None
        self.arms = load_relay_arms(specs, sc.quality_table) if specs else load_relay_arms(table=sc.quality_table)
        names = tuple(a.name for a in self.arms)
        self.policy = policy or RelayBandit.make(RELAY_BANDIT, self.arms, seed=seed, alpha=alpha, l2=l2)
        if self.policy.arms != names:
            raise ValueError(f"bandit policy: arms {self.policy.arms} are not the scenario's {names}")
        self.large, self.small = large, small
        edge = load_profile(sc.edge.profile)
        cap = int(sc.edge.max_batch or edge.max_batch or 1)
        self.edge_step_s = np.array([edge.member(sc.edge.member).at(b) for b in range(1, cap + 1)])
        lk = sc.link
        median_m = float(np.sqrt((lk.distance_m[0] ** 2 + lk.distance_m[1] ** 2) / 2))  # uniform in area
        snr = channel.snr_linear(np.array([median_m]), np.ones(1), lk.bs_tx_power_dbm, lk.bandwidth_hz,
                                 lk.bs_noise_figure_db, lk.path_loss_1km_db, lk.path_loss_exponent)
        self.down_bps = float(max(lk.downlink_hz * channel.spectral_efficiency(snr)[0], 1.0))
        self.link_s = 8.0 * sc.payload.latent_bytes / self.down_bps
        self._featurizer = featurizer
        self._devices: dict[str, tuple[float, float]] = {}
        self.pending: dict[tuple[int, str, int], list[tuple[int, np.ndarray, float, float, float]]] = {}
        self.updates = 0
        self.expected_quality = [(float(np.mean(a.fidelity)), float(a.style_fidelity)) for a in self.arms]
        self._lock = threading.Lock()

    def _device(self, name: str) -> tuple[float, float]:
        """(small-member step s, decode s) of a device class's measured profile."""
        if name not in self._devices:
            prof = load_profile(name)
            prof.require("decode_s")
            self._devices[name] = (prof.member(self.scenario.device_member).at(1), float(prof.decode_s))
        return self._devices[name]

    def prepare(self) -> "BanditScheduler":
        """Fit the prompt featurizer now (MiniLM over the calibration prompts, seconds), not in the first round."""
        if self._featurizer is None:
            self._featurizer = calibration_featurizer(0)
        return self

    def _features(self, prompts: list[str]) -> np.ndarray:
        return np.asarray(self.prepare()._featurizer(prompts), dtype=float)  # type: ignore[misc]

    def decide_jobs(self, jobs: Sequence[RoundJob], round_id: int, edge_remaining: Sequence[int] = ()) -> list[Decided]:
        """One plan per job; ``edge_remaining``: edge steps left per chain now on the edge."""
        feats = self._features([j.prompt for j in jobs])
        rem = [int(r) for r in edge_remaining]
        out = []
        with self._lock:
            for job, f in zip(jobs, feats):
                wq_raw, wl_raw = job.weights[0], job.weights[1]
                wq = wq_raw / (wq_raw + wl_raw) if wq_raw + wl_raw > 0 else 0.5
                rho = PERSONALIZATION_WITH_ADAPTER if job.adapter else 0.0
                step_s, decode_s = self._device(job.device_class)
                x = relay_context(f, wq, rho, step_s, decode_s, self.down_bps, self.link_s, rem, self.edge_step_s,
                                  job.steps)
                a = self.policy.decide(x)
                arm = self.arms[a]
                k = int(round(arm.k * job.steps / arm.steps))
                kind = "edge_only" if k >= job.steps else "device_only" if k <= 0 else "relay"
                d = Decided(Plan.relay(self.large, self.small, k, job.steps, job.adapter,
                                       device_guidance=arm.device_guidance), k, kind)
                ref = job.steps * step_s + decode_s
                self.pending.setdefault((round_id, job.prompt, d.k), []).append((a, x, wq, ref, rho))
                out.append(d)
                if d.k > 0:
                    rem.append(d.k)  # the next job of the round sees this one on the edge
        return out

    def observe(self, job: Any, report: Any) -> bool:
        """Learn from a finished job (``report``: latency_ms, optional quality; see the module docstring);
        False when there is nothing to learn (no pending decision, e.g. after a restart, or no latency)."""
        key = (int(job.round_id), str(job.request.get("prompt", "")), int(job.handoff_step))
        with self._lock:
            waiting = self.pending.get(key)
            if not waiting or report.latency_ms is None:
                return False
            a, x, wq, ref, rho = waiting.pop(0)
            if not waiting:
                del self.pending[key]
            if report.quality is None:
                prompt_q, style_q = self.expected_quality[a]
                quality = (1.0 - rho) * prompt_q + rho * style_q
            else:
                quality = float(report.quality)
            reward = float(relay_utility(wq, quality, report.latency_ms / 1e3, ref, self.scenario.latency_cap))
            self.policy.update(a, x, reward)
            self.updates += 1
        return True


__all__ = ["BanditScheduler"]
