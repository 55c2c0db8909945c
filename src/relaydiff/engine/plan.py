"""Requests and plans: who runs which steps of a denoising chain, with which member and adapter.

A plan is a list of contiguous segments covering steps ``0..T``. The text form used on the
command line is ``member[+adapter][@node]:start-end`` joined by commas, for example
``large@edge:0-4,small+style_a@device:4-8``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

MAX_STEPS = 1000
MAX_NAME_CHARS = 256

# The field types of a request and a plan, defined once: the engine's models below, the handoff
# reader (through them) and the service's HTTP models (serve.models) all validate with these.
Steps = Annotated[int, Field(strict=True, ge=1, le=MAX_STEPS)]
Seed = Annotated[int, Field(strict=True, ge=0, lt=2**63)]
Guidance = Annotated[float, Field(strict=True, ge=0.0, le=50.0, allow_inf_nan=False)]
StepIndex = Annotated[int, Field(strict=True, ge=0)]  # the cover of 0..steps: validate_plan
Name = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=MAX_NAME_CHARS,
                                        pattern=r"^[^\x00-\x1f\x7f]+$")]


class PlanError(ValueError):
    """A request or plan that cannot run (gaps, overlaps, unknown members or adapters, bad T)."""


def describe_validation_error(exc: ValidationError, where: str) -> str:
    """One line naming the first field that failed (and how many others did), e.g.
    ``request['steps']: input should be less than or equal to 1000, got 2000``."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = "".join(f"[{part}]" if isinstance(part, int) else f"['{part}']" for part in first["loc"])
    msg = first["msg"][:1].lower() + first["msg"][1:]
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    elif first["type"] != "missing":
        got = repr(first.get("input"))
        msg += f", got {got if len(got) <= 60 else got[:57] + '...'}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}{loc}: {msg}{more}"


class _Schema(BaseModel):
    """Frozen, with strict field types; built in Python it takes positional fields in order, and a bad value
    raises PlanError with one line that names the field (pydantic's ValidationError elsewhere,
    e.g. when the service's HTTP models nest these)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    _where: ClassVar[str] = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = list(type(self).model_fields)
        if len(args) > len(names):
            raise PlanError(f"{type(self).__name__} takes at most {len(names)} positional fields, got {len(args)}")
        for name, value in zip(names, args):
            if name in kwargs:
                raise PlanError(f"{self._where}['{name}'] given twice")
            kwargs[name] = value
        try:
            super().__init__(**kwargs)
        except ValidationError as exc:
            raise PlanError(describe_validation_error(exc, self._where)) from None


class Request(_Schema):
    """What a user asked for; everything needed to (re)build the chain's conditioning."""

    _where: ClassVar[str] = "request"

    prompt: Annotated[str, Field(strict=True)]
    negative_prompt: Annotated[str, Field(strict=True)] = ""
    steps: Steps = 8
    guidance: Guidance = 3.0
    seed: Seed = 0
    sampler: Name = "ddim"
    sampler_options: dict[str, Any] = Field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Request":
        if not isinstance(d, dict):
            raise PlanError(f"a request is a dict of fields, got {type(d).__name__}")
        unknown = set(d) - set(cls.model_fields)
        if unknown:
            raise PlanError(f"unknown request fields: {sorted(map(str, unknown))}")
        return cls(**d)


class Segment(_Schema):
    """Steps ``start..end`` of a chain, run by ``member`` (with ``adapter``) on ``node``."""

    _where: ClassVar[str] = "segment"

    member: Name
    start: StepIndex
    end: StepIndex
    adapter: Name | None = None
    node: Name = "local"
    # classifier-free guidance of this segment's steps; None: the request's. 1 (or less) turns CFG
    # off, which halves the segment's U-Net rows: late steps need little guidance (guidance in a
    # limited interval, Kynkaanniemi et al. 2024), so a device segment can run without it.
    guidance: Guidance | None = None

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump()
        if d["guidance"] is None:  # plans without segment guidance read as before
            del d["guidance"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Segment":
        if not isinstance(d, dict):
            raise PlanError(f"malformed segment {d!r}: a segment is a dict of fields")
        try:
            return cls(**d)
        except PlanError as exc:
            raise PlanError(f"malformed {exc}") from None


class Plan(_Schema):
    """Contiguous segments over steps 0..T (`validate_plan` checks the cover against a request)."""

    _where: ClassVar[str] = "plan"

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
        segs = []
        for i, d in enumerate(items):
            try:
                segs.append(Segment.from_dict(d))
            except PlanError as exc:
                raise PlanError(str(exc).replace("malformed segment", f"malformed plan[{i}]", 1)) from None
        return cls(tuple(segs))

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
