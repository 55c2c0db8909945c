"""One request's denoising chain: its latents, position, sampler state, randomness and accounting.

A chain is the unit that executors batch, that stops at a handoff and resumes elsewhere, and
that forks after a shared prefix. Everything needed to continue it is in the chain itself, so a
handoff is a faithful copy of it (see :mod:`relaydiff.engine.handoff`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from relaydiff.engine.family import Family
from relaydiff.engine.plan import Plan, Request, Segment, validate_plan
from relaydiff.engine.samplers import Sampler, Schedule, make_sampler

_ids = itertools.count()


@dataclass
class Accounting:
    """What a chain cost: the numbers that profiles and the simulator read."""

    unet_evals: dict[str, int] = field(default_factory=dict)   # per-sample U-Net forwards per member (CFG: 2 a step)
    segments: list[dict[str, Any]] = field(default_factory=list)  # member, adapter, node, start, end, wall_s, compute_s
    handoff_bytes: int = 0
    shared_steps: int = 0

    def record_step(self, seg: Segment, step: int, rows: int, t0: float, t1: float, compute_s: float) -> None:
        self.unet_evals[seg.member] = self.unet_evals.get(seg.member, 0) + rows
        last = self.segments[-1] if self.segments else None
        if last is None or (last["member"], last["adapter"], last["node"], last["start"]) != (
                seg.member, seg.adapter, seg.node, seg.start) or last["end"] != step:
            last = {"member": seg.member, "adapter": seg.adapter, "node": seg.node, "start": step, "end": step,
                    "t_start": t0, "wall_s": 0.0, "compute_s": 0.0}
            self.segments.append(last)
        last["end"] = step + 1
        last["wall_s"] = t1 - last["t_start"]
        last["compute_s"] += compute_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "unet_evals": dict(self.unet_evals),
            "segments": [{k: v for k, v in s.items() if k != "t_start"} for s in self.segments],
            "handoff_bytes": self.handoff_bytes,
            "shared_steps": self.shared_steps,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Accounting":
        acc = cls(unet_evals={str(k): int(v) for k, v in dict(d.get("unet_evals", {})).items()},
                  handoff_bytes=int(d.get("handoff_bytes", 0)), shared_steps=int(d.get("shared_steps", 0)))
        acc.segments = [dict(s, t_start=0.0) for s in d.get("segments", [])]
        return acc


@dataclass
class Chain:
    """A request in flight. ``step`` is the index of the next step to run."""

    request: Request
    plan: Plan
    latents: torch.Tensor
    step: int
    schedule: Schedule
    sampler: Sampler
    sampler_state: dict[str, torch.Tensor]
    generator: torch.Generator
    cond: torch.Tensor
    uncond: torch.Tensor | None
    stop_at: int | None = None
    accounting: Accounting = field(default_factory=Accounting)
    id: int = field(default_factory=lambda: next(_ids))

    @property
    def steps(self) -> int:
        return self.request.steps

    @property
    def done(self) -> bool:
        return self.step >= self.request.steps

    @property
    def stopped(self) -> bool:
        return self.stop_at is not None and self.step >= self.stop_at and not self.done

    @property
    def segment(self) -> Segment:
        return self.plan.segment_at(self.step)

    def guidance_at(self, seg: Segment) -> float:
        """The guidance a segment runs at: its own, else the request's."""
        return self.request.guidance if seg.guidance is None else float(seg.guidance)

    def rows_at(self, seg: Segment) -> int:
        """U-Net rows per step of a segment: 2 with classifier-free guidance, else 1."""
        return 2 if self.uncond is not None and self.guidance_at(seg) > 1.0 else 1

    @property
    def guidance(self) -> float:
        return self.guidance_at(self.segment)

    @property
    def uses_cfg(self) -> bool:
        return self.rows == 2

    @property
    def rows(self) -> int:
        return self.rows_at(self.segment)

    def fork(self, request: Request, plan: Plan, family: Family) -> "Chain":
        """A copy that continues from here under another request's conditioning (shared prefix)."""
        plan = family.native_plan(plan)
        cond, uncond = conditioning(family, request, plan)
        gen = torch.Generator().set_state(self.generator.get_state())
        return Chain(request=request, plan=plan, latents=self.latents.clone(), step=self.step,
                     schedule=self.schedule, sampler=self.sampler, sampler_state={k: v.clone() for k, v in self.sampler_state.items()},
                     generator=gen, cond=cond, uncond=uncond,
                     accounting=Accounting(shared_steps=self.step))


def conditioning(family: Family, request: Request, plan: Plan | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings [1, L, D] (and the negative prompt's when guidance is on, as in SD: g > 1,
    for the request or for any segment of the plan)."""
    segment_cfg = plan is not None and any(s.guidance is not None and s.guidance > 1.0 for s in plan.segments)
    if request.guidance > 1.0 or segment_cfg:
        emb = family.encode_prompt([request.prompt, request.negative_prompt])
        return emb[:1], emb[1:]
    return family.encode_prompt([request.prompt]), None


def new_chain(family: Family, request: Request, plan: Plan, stop_at: int | None = None) -> Chain:
    """Start a chain: validated plan, schedule, seeded initial noise (drawn on the CPU: same on any device)."""
    validate_plan(plan, request.steps, set(family.members), {n: s.member for n, s in family.adapters.items()})
    plan = family.native_plan(plan)
    if stop_at is not None and not 0 <= stop_at <= request.steps:
        raise ValueError(f"stop_at must be in 0..{request.steps}, got {stop_at}")
    sampler = make_sampler(request.sampler, family.scheduler_config, **request.sampler_options)
    schedule = sampler.schedule(request.steps)
    generator = torch.Generator().manual_seed(request.seed)
    noise = torch.randn((1, *family.latent_shape), generator=generator, dtype=torch.float32)
    latents = noise * float(sampler.init_noise_sigma(schedule))
    cond, uncond = conditioning(family, request, plan)
    return Chain(request=request, plan=plan, latents=latents, step=0, schedule=schedule, sampler=sampler,
                 sampler_state=sampler.initial_state(), generator=generator, cond=cond, uncond=uncond,
                 stop_at=stop_at)
