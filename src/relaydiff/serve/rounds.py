"""Deciding a round of live jobs with a scheduler (seed 000: admission, split, bandwidth).

The jobs of one round (``serve.app.RoundBatcher``: arrivals closer than a quiet gap, capped at
the round window) become one :class:`~relaydiff.system.problem.RoundInstance`:
per-user numbers come from the job (its preferences, its device class's measured profile, its
prompt's complexity and whether it wants a personal style), the edge and the wireless cell from a
scenario (the channel draw is seeded by the round id: the edge does not see the real radio). The
scheduler's split k per job becomes an engine plan: k = 0 runs on the device alone, 0 < k < T is
a relay (the large member on the edge for 0..k, the small member with the user's adapter on the
device), k = T runs on the edge alone.

``bandit`` is the one scheduler that is not a round solver: the relay contextual bandit
(:class:`relaydiff.serve.bandit_scheduler.BanditScheduler`) decides each job of the round from its
own context (prompt text, preferences, device class, link, the edge's queue), picks the device
segment's guidance too, and learns from each job's completion (``observe``).

Shared prefixes (seed 002): among a round's jobs that start on the edge (k >= 1) with the same
step count and sampler, prompts are grouped by MiniLM cosine similarity
(:func:`~relaydiff.system.grouping.group_prompts`, complete linkage at ``GROUP_THRESHOLD``); a
group's edge runs its first s steps once, conditioned on the leader's prompt and seed, then every
member continues with its own prompt (members with the same request and plan as one fork:
:class:`~relaydiff.serve.edge.EdgeService`). No scheduler decides s yet, so the documented default is
the largest s that keeps the group's least similar follower whose prompt is not the leader's at
>= ``SHARE_RETENTION`` of its prompt fidelity on the family's measured shared-prefix curves
(:func:`~relaydiff.system.grouping.shared_steps_caps`, the QoE env's rule: a follower with the
leader's very prompt loses nothing to the prefix and does not bind), and never past any member's
own edge part (its k).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from relaydiff.engine.plan import Plan
from relaydiff.sched.registry import available_solvers, get_solver
from relaydiff.system.grouping import (GROUP_THRESHOLD, group_prompts, load_sharing_cost, same_prompt_followers,
                                       SHARE_MAX_GROUP, SHARE_RETENTION, shared_steps_caps, SharingCost)
from relaydiff.system.problem import device_numbers, RoundInstance, sample_instance
from relaydiff.system.profiles import load_profile, ProfileError
from relaydiff.system.quality import load_quality, QualityModel
from relaydiff.system.scenario import load_scenario, Scenario

# a prompt of this many words counts as fully complex (the reference world's longest prompts: ~16)
COMPLEX_PROMPT_WORDS = 16
PERSONALIZATION_WITH_ADAPTER = 0.5
_EMBEDDING_CACHE = 4096      # prompts whose embedding the decider keeps
BANDIT_SCHEDULER = "bandit"  # the relay contextual bandit (not a round solver; see the module docstring)


def scheduler_names() -> list[str]:
    """What ``--scheduler`` accepts: the relay bandit and every registered round solver."""
    return [BANDIT_SCHEDULER, *available_solvers()]


@dataclass(frozen=True)
class RoundJob:
    """What the scheduler needs to know about one job."""

    steps: int
    prompt: str
    weights: tuple[float, float, float]   # quality, latency, energy (sum 1)
    device_class: str
    adapter: str | None
    sampler: str = "ddim"


@dataclass(frozen=True)
class SharedPrefix:
    """A job's place in a shared-prefix group: the round's ``leader`` job index runs ``steps`` for all."""

    leader: int
    steps: int


@dataclass(frozen=True)
class Decided:
    plan: Plan
    k: int
    kind: str   # edge_only | relay | device_only


def plan_for(k: int, steps: int, large: str, small: str, adapter: str | None) -> Decided:
    """The engine plan of split ``k`` (see the module docstring)."""
    if k <= 0:
        return Decided(Plan.single(small, steps, adapter, node="device"), 0, "device_only")
    if k >= steps:
        return Decided(Plan.single(large, steps, node="edge"), steps, "edge_only")
    return Decided(Plan.relay(large, small, k, steps, adapter), k, "relay")


class RoundDecider:
    """Turns a list of jobs into plans with one solver call per distinct step count."""

    def __init__(self, scheduler: str, large: str, small: str, scenario: str | Scenario = "default",
                 quality: QualityModel | None = None, share_prefix: bool = True,
                 sharing_cost: SharingCost | None = None, embed: Callable[[list[str]], np.ndarray] | None = None):
        if scheduler != BANDIT_SCHEDULER and scheduler not in available_solvers():
            raise ValueError(f"unknown scheduler {scheduler!r}; available: {', '.join(scheduler_names())}")
        self.bandit = None
        if scheduler == BANDIT_SCHEDULER:
            # lazy: serve.bandit_scheduler imports this module (RoundJob, Decided)
            from relaydiff.serve.bandit_scheduler import BanditScheduler

            self.bandit = BanditScheduler(large, small).prepare()
        # the bandit has observe(): EdgeService.decider_observe hands it every completion
        self.solver = self.bandit if self.bandit is not None else get_solver(scheduler)
        self._greedy = get_solver("greedy")
        self.fallbacks: list[str] = []           # rounds the configured solver could not decide
        self.scheduler = scheduler
        self.large, self.small = large, small
        self.scenario = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
        self.quality = quality or load_quality()
        self.device_classes = tuple(sorted(self.scenario.devices))
        self._devices = {c: device_numbers(load_profile(c), self.scenario.device_member)
                         for c in self.device_classes}
        self.sharing = (sharing_cost or load_sharing_cost()) if share_prefix else None
        self.embed = embed or _minilm
        self._embeddings: dict[str, np.ndarray] = {}

    def check_device_class(self, name: str) -> None:
        if name not in self._devices:
            raise ProfileError(f"unknown device class {name!r}; known: {', '.join(self.device_classes)}")

    def splits(self, steps: int) -> np.ndarray:
        """As many split points as the scenario has (a trained policy expects that count), spread evenly
        over 1..T and ending at T (edge only)."""
        n = len(self.scenario.splits)
        return np.unique(np.clip(np.round(np.linspace(steps / n, steps, n)), 1, steps).astype(np.int64))

    def instance(self, jobs: list[RoundJob], round_id: int) -> RoundInstance:
        """The round problem of ``jobs`` (all with the same step count)."""
        steps = jobs[0].steps
        base = sample_instance(self.scenario, n_users=len(jobs), seed=round_id, capacity=1.0,
                               quality_model=self.quality)
        dev = np.array([self._devices[j.device_class] for j in jobs], dtype=float)
        w = np.array([j.weights for j in jobs], dtype=float)
        complexity = np.array([min(1.0, len(j.prompt.split()) / COMPLEX_PROMPT_WORDS) for j in jobs])
        personal = np.array([PERSONALIZATION_WITH_ADAPTER if j.adapter else 0.0 for j in jobs])
        return dataclasses.replace(
            base, steps=steps, splits=self.splits(steps),
            device_step_s=dev[:, 0], device_step_j=dev[:, 1], decode_s=dev[:, 2], decode_j=dev[:, 3],
            tx_power_w=dev[:, 4], rx_power_w=dev[:, 5],
            quality=self.quality.table(steps, complexity, personal),
            w_quality=w[:, 0], w_latency=w[:, 1], w_energy=w[:, 2],
            device_class=tuple(j.device_class for j in jobs),
            meta={**base.meta, "round_id": round_id, "source": "live jobs"})

    def decide(self, jobs: list[RoundJob], round_id: int, edge_remaining: list[int] | None = None) -> list[Decided]:
        """One plan per job (``edge_remaining``: edge steps left per chain on the edge now; the bandit reads it)."""
        if self.bandit is not None:
            return self.bandit.decide_jobs(jobs, round_id, edge_remaining or ())
        out: list[Decided | None] = [None] * len(jobs)
        for steps in sorted({j.steps for j in jobs}):
            idx = [i for i, j in enumerate(jobs) if j.steps == steps]
            instance = self.instance([jobs[i] for i in idx], round_id)
            try:
                solution = self.solver(instance)
            except ValueError as exc:  # e.g. a trained policy that does not fit this step count
                self.fallbacks.append(f"round {round_id}: {self.scheduler} failed ({exc}); greedy decided it")
                solution = self._greedy(instance)
            for i, k in zip(idx, np.asarray(solution.decision.k).tolist()):
                out[i] = plan_for(int(k), steps, self.large, self.small, jobs[i].adapter)
        return [d for d in out if d is not None]

    def shared_steps(self, similarity: float, steps: int) -> int:
        """The default s for a follower at ``similarity`` (see the module docstring)."""
        return 0 if self.sharing is None else self.sharing.longest_sharing(similarity, steps, SHARE_RETENTION)

    def _vectors(self, prompts: list[str]) -> np.ndarray:
        missing = sorted({p for p in prompts if p not in self._embeddings})
        if missing:
            if len(self._embeddings) + len(missing) > _EMBEDDING_CACHE:
                self._embeddings.clear()
            self._embeddings.update(zip(missing, np.asarray(self.embed(missing), dtype=float)))
        return np.stack([self._embeddings[p] for p in prompts])

    def share(self, jobs: list[RoundJob], decided: list[Decided]) -> list[SharedPrefix | None]:
        """Shared-prefix groups of a decided round (``None``: the job runs alone)."""
        out: list[SharedPrefix | None] = [None] * len(jobs)
        if self.sharing is None:
            return out
        keys = sorted({(j.steps, j.sampler) for j, d in zip(jobs, decided) if d.k >= 1})
        for steps, sampler in keys:
            idx = [i for i, (j, d) in enumerate(zip(jobs, decided)) if d.k >= 1 and (j.steps, j.sampler) == (steps, sampler)]
            if len(idx) < 2:
                continue
            prompts = [jobs[i].prompt for i in idx]
            # of the distinct prompts, as the QoE env groups (a copy joins its prompt's group; the edge
            # runs the copies' continuations once, serve.edge)
            groups = group_prompts(self._vectors(prompts), GROUP_THRESHOLD, SHARE_MAX_GROUP, prompts)
            # the QoE env's rule: the least similar follower whose prompt is not the leader's binds
            caps = shared_steps_caps(groups, self.sharing, steps, SHARE_RETENTION,
                                     same_prompt_followers(groups, prompts))
            for g in range(groups.n_groups):
                members = groups.members(g)
                if members.size < 2:
                    continue
                s = min(int(caps[g]), min(decided[idx[m]].k for m in members))
                if s >= 1:
                    for m in members:
                        out[idx[m]] = SharedPrefix(idx[int(groups.leader[g])], s)
        return out


def _minilm(prompts: list[str]) -> np.ndarray:
    from relaydiff.quality.similarity import prompt_embeddings  # lazy: loads MiniLM (transformers)

    return prompt_embeddings(prompts)
