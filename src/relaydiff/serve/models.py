"""The service's HTTP schema: pydantic models over the engine's Request and Plan.

The request fields are the engine's :class:`~relaydiff.engine.plan.Request` fields, typed with the
engine's own field types (plus what the scheduler needs: preferences, device class, style adapter;
:meth:`JobRequest.engine_request` converts), and a plan is a list of the engine's own pydantic
:class:`~relaydiff.engine.plan.Segment`: one schema from the handoff reader to the HTTP API.
Limits live here so that the OpenAPI schema states them and FastAPI answers 422 with the field
that broke them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from relaydiff.engine.plan import Guidance, Request, Seed, Segment
from relaydiff.engine.samplers import SAMPLERS

MAX_PROMPT_CHARS = 400
MAX_SERVICE_STEPS = 100     # a service limit (edge cost per job), below the engine's own 1000
NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
JOB_STATES = ("queued", "running", "awaiting_device", "on_device", "fallback", "done", "cancelled", "failed")
JobState = Literal["queued", "running", "awaiting_device", "on_device", "fallback", "done", "cancelled", "failed"]
TERMINAL_STATES = frozenset({"done", "cancelled", "failed"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Preferences(_Strict):
    """How much the user cares about quality, latency and energy (any non-negative weights; normalized)."""

    quality: float = Field(1.0, ge=0.0, le=1000.0)
    latency: float = Field(1.0, ge=0.0, le=1000.0)
    energy: float = Field(0.5, ge=0.0, le=1000.0)

    @model_validator(mode="after")
    def _positive_total(self) -> "Preferences":
        if self.quality + self.latency + self.energy <= 0:
            raise ValueError("preferences need a positive total weight (quality + latency + energy > 0)")
        return self

    def normalized(self) -> tuple[float, float, float]:
        total = self.quality + self.latency + self.energy
        return self.quality / total, self.latency / total, self.energy / total


class JobRequest(_Strict):
    """``POST /v1/jobs``: the engine's request fields and what the scheduler decides on."""

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    steps: int | None = Field(None, ge=1, le=MAX_SERVICE_STEPS, description="default: the family's")
    guidance: Guidance = 3.0
    seed: Seed = 0
    sampler: Literal[SAMPLERS] = "ddim"  # type: ignore[valid-type]
    preferences: Preferences = Field(default_factory=Preferences)
    device_class: str = Field("phone-mid", pattern=NAME_PATTERN, description="a device profile name")
    adapter: str | None = Field(None, pattern=NAME_PATTERN, description="the user's style adapter")
    idempotency_key: str | None = Field(None, pattern=NAME_PATTERN,
                                        description="resubmitting with the same key returns the same job")

    def engine_request(self, default_steps: int) -> Request:
        return Request(prompt=self.prompt, negative_prompt=self.negative_prompt,
                       steps=self.steps or default_steps, guidance=self.guidance, seed=self.seed,
                       sampler=self.sampler)


class JobView(_Strict):
    """A job as its owner sees it."""

    job_id: str
    state: JobState
    plan: list[Segment] = Field(description="the engine's plan segments, contiguous over 0..steps")
    plan_text: str
    handoff_step: int = Field(description="steps the edge runs before the device takes over (0: device only)")
    kind: Literal["edge_only", "relay", "device_only"]
    request: dict
    round_id: int
    shared_steps: int = Field(0, description="edge steps run once for a group of similar prompts in its round "
                                             "(0: none), conditioned on the group leader's prompt and seed")
    fallback: bool = False
    error: str | None = None
    latency_ms: float | None = None
    quality: float | None = None
    created_s: float
    updated_s: float


class CompletionReport(_Strict):
    """``POST /v1/jobs/{id}/complete``: what the device measured (the learning scheduler's reward)."""

    ok: bool = True
    latency_ms: float | None = Field(None, ge=0.0, le=86_400_000.0)
    quality: float | None = Field(None, ge=0.0, le=1.0)
    error: str | None = Field(None, max_length=500)

    @model_validator(mode="after")
    def _latency_when_ok(self) -> "CompletionReport":
        if self.ok and self.latency_ms is None:
            raise ValueError("a successful completion report needs latency_ms")
        return self


class ErrorBody(_Strict):
    detail: str
