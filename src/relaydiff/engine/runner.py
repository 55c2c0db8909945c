"""Run requests end to end: plans, batching, handoffs and shared prefixes, in one process.

This is the engine's front door for the CLI, the benches and the service. Chains that stop at
``stop_at`` come back as handoffs; :func:`resume` continues a handoff in any process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from relaydiff.engine.chain import Accounting, Chain, conditioning as encode, new_chain
from relaydiff.engine.executor import Executor
from relaydiff.engine.family import Family
from relaydiff.engine.handoff import Handoff, HandoffError
from relaydiff.engine.plan import Plan, PlanError, Request


@dataclass
class Result:
    """A finished image, or a handoff when the chain was stopped."""

    request: Request
    plan: Plan
    latents: torch.Tensor
    accounting: dict[str, Any]
    image: np.ndarray | None = None        # uint8 [H, W, 3] when finished
    handoff: Any = None                     # relaydiff.engine.handoff.Handoff when stopped


def finish_chains(family: Family, chains: list[Chain], max_batch: int = 16) -> list[Result]:
    """Results in chain order; finished chains are decoded together, ``max_batch`` latents a VAE call
    (8 images on the 16x16 VAE: 69 ms one call each, 34 ms in one call, 2-core CPU)."""
    results = [Result(request=c.request, plan=c.plan, latents=c.latents.clone(), accounting=c.accounting.to_dict())
               for c in chains]
    done = [i for i, c in enumerate(chains) if c.done]
    for start in range(0, len(done), max_batch):
        rows = done[start : start + max_batch]
        for i, image in zip(rows, family.decode(torch.cat([chains[i].latents for i in rows]))):
            results[i].image = image
    for res, c in zip(results, chains):
        if not c.done:
            res.handoff = to_handoff(family, c)
    return results


def generate(family: Family, requests: list[Request], plans: list[Plan], *, max_batch: int = 16,
             stop_at: int | None = None) -> list[Result]:
    """Run every request under its plan with continuous batching; results in request order."""
    if len(requests) != len(plans):
        raise PlanError(f"{len(requests)} requests but {len(plans)} plans")
    return run_chains(family, [new_chain(family, r, p, stop_at) for r, p in zip(requests, plans)],
                      max_batch=max_batch)


def run_chains(family: Family, chains: list[Chain], *, max_batch: int = 16) -> list[Result]:
    """Continue chains that already exist (resumed handoffs, forks)."""
    ex = Executor(family, node=None, max_batch=max_batch)
    for c in chains:
        if not (c.done or c.stopped):
            ex.submit(c)
    ex.run()
    return finish_chains(family, chains, max_batch)


# ---- handoffs -----------------------------------------------------------------------------

def to_handoff(family: Family, chain: Chain):
    """The chain as a self-describing handoff (no copy of the weights, a reference to the family)."""
    return Handoff(
        family_id=family.id, family_version=family.version, request=chain.request.to_dict(),
        plan=chain.plan.to_list(), step=chain.step, latents=chain.latents.clone(),
        schedule=chain.schedule.tensors(), sampler_state={k: v.clone() for k, v in chain.sampler_state.items()},
        generator_state=chain.generator.get_state() if chain.sampler.stochastic else None,
        accounting=chain.accounting.to_dict(),
    )


def from_handoff(family: Family, handoff, stop_at: int | None = None) -> Chain:
    """Rebuild the chain a handoff describes, on this family (which must be the same family)."""
    if (handoff.family_id, handoff.family_version) != (family.id, family.version):
        raise HandoffError(f"handoff is for family {handoff.family_id}@{handoff.family_version}, "
                           f"this node has {family.id}@{family.version}")
    try:
        request = Request.from_dict(dict(handoff.request))
        plan = Plan.from_list(list(handoff.plan))
        chain = new_chain(family, request, plan, stop_at=stop_at)
    except (PlanError, ValueError, TypeError) as exc:
        raise HandoffError(f"handoff describes an impossible chain: {exc}") from exc
    if tuple(handoff.latents.shape) != (1, *family.latent_shape):
        raise HandoffError(f"handoff latents have shape {tuple(handoff.latents.shape)}, this family needs "
                           f"{(1, *family.latent_shape)}")
    if not 0 <= handoff.step <= request.steps:
        raise HandoffError(f"handoff step {handoff.step} is outside 0..{request.steps}")
    try:
        schedule = type(chain.schedule).from_tensors(handoff.schedule)
    except (KeyError, ValueError, TypeError) as exc:
        raise HandoffError(f"handoff schedule is invalid: {exc}") from exc
    if len(schedule.timesteps) != request.steps:
        raise HandoffError(f"handoff schedule has {len(schedule.timesteps)} steps, the request {request.steps}")
    chain.schedule = schedule  # new_chain built the sampler and the conditioning from the same request
    chain.latents = handoff.latents.to(torch.float32).clone()
    chain.step = int(handoff.step)
    chain.sampler_state = {k: v.clone() for k, v in handoff.sampler_state.items()}
    if handoff.generator_state is not None:
        try:
            chain.generator.set_state(handoff.generator_state.to(torch.uint8))
        except RuntimeError as exc:
            raise HandoffError(f"handoff generator state is invalid: {exc}") from exc
    chain.accounting = Accounting.from_dict(handoff.accounting or {})
    return chain


def resume(family: Family, handoff, *, stop_at: int | None = None, max_batch: int = 16) -> Result:
    return run_chains(family, [from_handoff(family, handoff, stop_at)], max_batch=max_batch)[0]


# ---- shared prefix ------------------------------------------------------------------------

@dataclass
class SharedPrefixResult:
    results: list[Result]
    shared_steps: int
    leader: int
    conditioning: str
    unet_evals: dict[str, int] = field(default_factory=dict)           # what the group actually ran
    unet_evals_unshared: dict[str, int] = field(default_factory=dict)  # what the requests would run alone
    # the prefix's own accounting (its segments' wall and compute time): run once, for the whole group
    prefix_accounting: dict[str, Any] = field(default_factory=dict)

    @property
    def saved_fraction(self) -> float:
        total, alone = sum(self.unet_evals.values()), sum(self.unet_evals_unshared.values())
        return 1.0 - total / alone if alone else 0.0


def generate_shared_prefix(family: Family, requests: list[Request], plans: list[Plan], shared_steps: int, *,
                           leader: int = 0, conditioning: str = "leader",
                           max_batch: int = 16) -> SharedPrefixResult:
    """Run the first ``shared_steps`` once for the group, then one continuation per request.

    The group's prefix is conditioned on the leader's prompt (``conditioning="leader"``; the
    leader is the request most representative of the group, chosen by the caller) or on the mean
    of the group's prompt embeddings (``"mean"``). The prefix uses the leader's seed, guidance and
    plan segments; every request's plan must agree on the segments before ``shared_steps``.
    """
    if not requests or len(requests) != len(plans):
        raise PlanError("a shared-prefix group needs one plan per request, at least one request")
    if conditioning not in ("leader", "mean"):
        raise PlanError(f"conditioning must be 'leader' or 'mean', got {conditioning!r}")
    if not 0 <= leader < len(requests):
        raise PlanError(f"leader index {leader} is outside the group of {len(requests)}")
    lead_req = requests[leader]
    for r, p in zip(requests, plans):
        if (r.steps, r.sampler, r.sampler_options) != (lead_req.steps, lead_req.sampler, lead_req.sampler_options):
            raise PlanError("a shared-prefix group must share steps, sampler and sampler options")
        if not 0 <= shared_steps <= r.steps:
            raise PlanError(f"shared_steps must be in 0..{r.steps}, got {shared_steps}")
        if _prefix(p, shared_steps) != _prefix(plans[leader], shared_steps):
            raise PlanError("every plan in a shared-prefix group must agree on the shared steps")
    prefix = new_chain(family, lead_req, plans[leader], stop_at=shared_steps)
    if conditioning == "mean":
        conds = [encode(family, r) for r in requests]
        prefix.cond = torch.stack([c for c, _ in conds]).mean(0)
    ex = Executor(family, max_batch=max_batch)
    if shared_steps > 0:
        ex.submit(prefix)
        ex.run()
    forks = [prefix.fork(r, p, family) for r, p in zip(requests, plans)]
    results = run_chains(family, forks, max_batch=max_batch)
    group_evals = dict(prefix.accounting.unet_evals)
    alone: dict[str, int] = {}
    for r, p, fork, res in zip(requests, plans, forks, results):
        for member, n in res.accounting["unet_evals"].items():
            group_evals[member] = group_evals.get(member, 0) + n
        for seg in p.segments:
            alone[seg.member] = alone.get(seg.member, 0) + (seg.end - seg.start) * fork.rows_at(seg)
    return SharedPrefixResult(results=results, shared_steps=shared_steps, leader=leader, conditioning=conditioning,
                              unet_evals=group_evals, unet_evals_unshared=alone,
                              prefix_accounting=prefix.accounting.to_dict())


def _prefix(plan: Plan, k: int) -> list[tuple]:
    return [(s.member, s.adapter, s.guidance, s.start, min(s.end, k)) for s in plan.segments if s.start < k]
