"""Requests and plans: who runs which steps of a denoising chain, with which member and adapter.

A plan is a list of contiguous segments covering steps ``0..T``. The text form used on the
command line is ``member[+adapter][@node]:start-end`` joined by commas, for example
``large@edge:0-4,small+style_a@device:4-8``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

MAX_STEPS = 1000


class PlanError(ValueError):
    """A request or plan that cannot run (gaps, overlaps, unknown members or adapters, bad T)."""


@dataclass(frozen=True)
class Request:
    """What a user asked for; everything needed to (re)build the chain's conditioning."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 8
    guidance: float = 3.0
    seed: int = 0
    sampler: str = "ddim"
    sampler_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise PlanError("prompt must be a string")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS:
            raise PlanError(f"steps must be an integer in 1..{MAX_STEPS}, got {self.steps!r}")
        if not (self.guidance == self.guidance) or not 0.0 <= float(self.guidance) <= 50.0:
            raise PlanError(f"guidance must be in [0, 50], got {self.guidance!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise PlanError(f"seed must be a non-negative 64-bit integer, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Request":
        known = {"prompt", "negative_prompt", "steps", "guidance", "seed", "sampler", "sampler_options"}
        unknown = set(d) - known
        if unknown:
            raise PlanError(f"unknown request fields: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class Segment:
    member: str
    start: int
    end: int
    adapter: str | None = None
    node: str = "local"
    # classifier-free guidance of this segment's steps; None: the request's. 1 (or less) turns CFG
    # off, which halves the segment's U-Net rows: late steps need little guidance (guidance in a
    # limited interval, Kynkaanniemi et al. 2024), so a device segment can run without it.
    guidance: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["guidance"] is None:  # plans without segment guidance read as before
            del d["guidance"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Segment":
        try:
            g = d.get("guidance")
            return cls(member=str(d["member"]), start=int(d["start"]), end=int(d["end"]),
                       adapter=None if d.get("adapter") is None else str(d["adapter"]),
                       node=str(d.get("node", "local")), guidance=None if g is None else float(g))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"malformed segment {d!r}: {exc}") from exc


@dataclass(frozen=True)
class Plan:
    segments: tuple[Segment, ...]

    @property
    def steps(self) -> int:
        return self.segments[-1].end if self.segments else 0

    def segment_at(self, step: int) -> Segment:
        for seg in self.segments:
            if seg.start <= step < seg.end:
                return seg
        raise PlanError(f"step {step} is outside the plan (0..{self.steps})")

    def boundaries(self) -> list[int]:
        return [s.end for s in self.segments]

    def to_list(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.segments]

    @classmethod
    def from_list(cls, items: list[dict[str, Any]]) -> "Plan":
        if not isinstance(items, list):
            raise PlanError("a plan is a list of segments")
        return cls(tuple(Segment.from_dict(d) for d in items))

    @classmethod
    def single(cls, member: str, steps: int, adapter: str | None = None, node: str = "local") -> "Plan":
        return cls((Segment(member, 0, steps, adapter, node),))

    @classmethod
    def relay(cls, first: str, second: str, k: int, steps: int, adapter: str | None = None,
              device_guidance: float | None = None) -> "Plan":
        """``first`` on the edge for steps 0..k, ``second`` (with ``adapter``) on the device for k..T,
        at ``device_guidance`` there when given (1: no CFG on the device)."""
        segs = []
        if k > 0:
            segs.append(Segment(first, 0, k, None, "edge"))
        if k < steps:
            segs.append(Segment(second, k, steps, adapter, "device", device_guidance))
        return cls(tuple(segs))

    def __str__(self) -> str:
        return ",".join(
            f"{s.member}{'+' + s.adapter if s.adapter else ''}{'@' + s.node if s.node != 'local' else ''}:{s.start}-{s.end}"
            f"{f'[g={s.guidance:g}]' if s.guidance is not None else ''}"
            for s in self.segments)


_SEGMENT_RE = re.compile(r"^\s*([A-Za-z0-9_.-]+)(?:\+([A-Za-z0-9_.-]+))?(?:@([A-Za-z0-9_.-]+))?:(\d+)-(\d+)"
                         r"(?:\[g=(\d+(?:\.\d*)?)\])?\s*$")


def parse_plan(text: str) -> Plan:
    """Parse ``large:0-4,small+style_a@device:4-8`` (``[g=1]`` after a segment sets its guidance)."""
    segs = []
    for part in text.split(","):
        m = _SEGMENT_RE.match(part)
        if not m:
            raise PlanError(f"cannot parse plan segment {part!r}; expected member[+adapter][@node]:start-end[[g=G]]")
        member, adapter, node, a, b, g = m.groups()
        segs.append(Segment(member, int(a), int(b), adapter, node or "local", None if g is None else float(g)))
    return Plan(tuple(segs))


def validate_plan(plan: Plan, steps: int, members: set[str] | None = None,
                  adapters: dict[str, str] | None = None) -> Plan:
    """Check that the plan covers 0..steps exactly; ``adapters`` maps adapter name -> its member."""
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise PlanError(f"steps must be in 1..{MAX_STEPS}, got {steps!r}")
    if not plan.segments:
        raise PlanError("the plan has no segments")
    expected = 0
    for seg in plan.segments:
        if seg.end <= seg.start:
            raise PlanError(f"segment {seg.member}:{seg.start}-{seg.end} is empty or reversed")
        if seg.start > expected:
            raise PlanError(f"gap in the plan: steps {expected}..{seg.start} are not assigned")
        if seg.start < expected:
            raise PlanError(f"overlap in the plan: step {seg.start} is assigned twice")
        expected = seg.end
        if seg.guidance is not None and not (isinstance(seg.guidance, (int, float)) and 0.0 <= seg.guidance <= 50.0):
            raise PlanError(f"segment {seg.member}:{seg.start}-{seg.end} guidance must be in [0, 50], "
                            f"got {seg.guidance!r}")
        if members is not None and seg.member not in members:
            raise PlanError(f"unknown member {seg.member!r}; known: {sorted(members)}")
        if seg.adapter is not None and adapters is not None:
            if seg.adapter not in adapters:
                raise PlanError(f"unknown adapter {seg.adapter!r}; known: {sorted(adapters)}")
            if adapters[seg.adapter] != seg.member:
                raise PlanError(f"adapter {seg.adapter!r} belongs to member {adapters[seg.adapter]!r}, "
                                f"not {seg.member!r}")
    if expected != steps:
        raise PlanError(f"the plan ends at step {expected} but the request has {steps} steps")
    return plan
