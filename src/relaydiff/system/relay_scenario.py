"""Relay workloads: a stream of requests for the relay bandit, as validated scenario YAML.

A relay scenario (``scenarios/relay/*.yaml``; a folder of its own, apart from the round scenarios) describes one stream: Poisson arrivals at the edge,
each request from a new user with a device class, a link, a quality/latency preference, maybe a
style adapter, and a prompt of 1-3 objects. ``phases`` change the workload from a request index
on (the complexity mix shifts, the network degrades, a load spike): each phase overrides the
fields it names, on top of the phases before it. Validated like the round scenarios
(:mod:`relaydiff.system.scenario`): unknown or bad fields raise :class:`ScenarioError` naming the
field by its dotted path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from relaydiff.shipped import resolve, shipped_names
from relaydiff.system.relay_arms import COMPLEXITY_CLASSES
from relaydiff.system.scenario import (
    SCENARIOS_DIR,
    PayloadSpec,
    ScenarioError,
    WirelessSpec,
    _range,
    _Strict,
    read_scenario_file,
    validate_scenario,
)


def _mix(v: dict[str, float] | None) -> dict[str, float] | None:
    if v is None:
        return v
    bad = sorted(set(v) - set(COMPLEXITY_CLASSES))
    if bad:
        raise ValueError(f"complexity classes are objects per prompt {list(COMPLEXITY_CLASSES)}, got {bad}")
    if any(p < 0 for p in v.values()) or sum(v.values()) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {v}")
    return v


class RelayEdgeSpec(_Strict):
    """The edge server that batches the large member's steps (continuous batching, oldest first)."""

    profile: str = "a100-sd15"
    member: str = "large"
    max_batch: int | None = Field(default=None, ge=1)  # None: the profile's


class RelayLinkSpec(WirelessSpec):
    """The cell's link budget (``bandwidth_hz``: the carrier the base station's power is spread over)
    plus the share of it one user gets while receiving a handoff; Shannon rate with Rayleigh fading."""

    downlink_hz: float = Field(default=1e6, gt=0)


class RelayUserSpec(_Strict):
    """Per-user preference: quality weight w_q ~ U(range) (latency weight 1 - w_q); style adapters."""

    quality_weight: tuple[float, float] = (0.2, 0.9)
    styled_fraction: float = Field(default=0.4, ge=0, le=1)  # users with a personal style adapter
    style_weight: tuple[float, float] = (0.3, 0.8)  # rho: their quality = (1 - rho) prompt + rho style

    @field_validator("quality_weight", "style_weight")
    @classmethod
    def _unit(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _range(v, "range", 0.0, 1.0)


class RelayPhase(_Strict):
    """A change of the workload from request index ``start`` on (fields left out keep their value)."""

    start: int = Field(ge=1)
    name: str
    complexity_mix: dict[str, float] | None = None
    arrival_rate_hz: float | None = Field(default=None, gt=0)
    extra_path_loss_db: float | None = Field(default=None, ge=0)  # added to every link (degradation)

    _mix_ok = field_validator("complexity_mix")(classmethod(lambda cls, v: _mix(v)))


class RelayScenario(_Strict):
    """One request stream (see the module docstring)."""

    name: str = "relay"
    description: str = ""
    requests: int = Field(default=1200, ge=1)
    steps: int = Field(default=20, ge=1)
    arrival_rate_hz: float = Field(default=4.0, gt=0)
    complexity_mix: dict[str, float] = Field(default_factory=lambda: {"1": 1.0, "2": 1.0, "3": 1.0})
    extra_path_loss_db: float = Field(default=0.0, ge=0)
    edge: RelayEdgeSpec = RelayEdgeSpec()
    device_member: str = "small"
    devices: dict[str, float] = Field(
        default_factory=lambda: {"phone-flagship": 0.3, "phone-mid": 0.35, "phone-low": 0.2, "laptop": 0.15})
    link: RelayLinkSpec = RelayLinkSpec()
    payload: PayloadSpec = PayloadSpec()
    users: RelayUserSpec = RelayUserSpec()
    latency_cap: float = Field(default=3.0, gt=0)  # latency/reference above this counts as this (reward floor)
    quality_table: str = "auto"
    arms: tuple[tuple[int, float | None], ...] | None = None  # (k, device guidance or null); None: the default arms
    phases: tuple[RelayPhase, ...] = ()

    _mix_ok = field_validator("complexity_mix")(classmethod(lambda cls, v: _mix(v)))

    @model_validator(mode="after")
    def _check(self) -> "RelayScenario":
        if not self.devices or any(p < 0 for p in self.devices.values()) or sum(self.devices.values()) <= 0:
            raise ValueError(f"devices: mix weights must be >= 0 with a positive sum, got {self.devices}")
        starts = [p.start for p in self.phases]
        if starts != sorted(set(starts)):
            raise ValueError(f"phases: starts must be strictly increasing, got {starts}")
        if starts and starts[-1] >= self.requests:
            raise ValueError(f"phases: start {starts[-1]} is past the stream's {self.requests} requests")
        for k, _ in self.arms or ():
            if not 0 <= k <= self.steps:
                raise ValueError(f"arms: handoff step {k} outside 0..{self.steps}")
        return self

    def phase_at(self, index: int) -> dict[str, Any]:
        """The workload fields in force at request ``index`` (the base, then each phase that started)."""
        out = {"name": "base", "complexity_mix": self.complexity_mix, "arrival_rate_hz": self.arrival_rate_hz,
               "extra_path_loss_db": self.extra_path_loss_db}
        for p in self.phases:
            if p.start <= index:
                out["name"] = p.name
                out.update({k: v for k, v in p.model_dump().items() if k in out and v is not None})
        return out


def parse_relay_scenario(data: Any, where: str = "<relay scenario>") -> RelayScenario:
    """Validate a relay scenario mapping; the error lists every bad field by its dotted path."""
    return validate_scenario(RelayScenario, data, where)


RELAY_SCENARIOS_DIR = SCENARIOS_DIR / "relay"


def available_relay_scenarios() -> list[str]:
    """Names of the shipped relay scenarios (``scenarios/relay/*.yaml``)."""
    return shipped_names(RELAY_SCENARIOS_DIR, ".yaml")


def load_relay_scenario(name_or_path: str | Path) -> RelayScenario:
    """A shipped relay scenario by name, or a YAML/JSON file by path."""
    path = resolve(name_or_path, RELAY_SCENARIOS_DIR, ".yaml", "relay scenario", ScenarioError)
    return parse_relay_scenario(read_scenario_file(path), str(path))


__all__ = ["RELAY_SCENARIOS_DIR", "RelayPhase", "RelayScenario", "available_relay_scenarios", "load_relay_scenario", "parse_relay_scenario"]
