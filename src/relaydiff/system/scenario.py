"""Scenario files: everything needed to draw rounds of the offloading problem.

A scenario is YAML or JSON (``scenarios/*.yaml`` ship with relaydiff), validated with pydantic;
unknown or bad fields raise :class:`ScenarioError` naming the field. Units are in the field names
(``_s`` seconds, ``_hz`` hertz, ``_bytes``, ``_m`` meters, ``_dbm``, ``_db``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from relaydiff.shipped import read_json, resolve, shipped_names

SCENARIOS_DIR = Path(__file__).parent / "scenarios"


class ScenarioError(ValueError):
    """A scenario file is missing or has a bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _range(v: tuple[float, float], name: str, lo: float | None = None, hi: float | None = None) -> tuple[float, float]:
    if v[0] > v[1]:
        raise ValueError(f"{name}: lower bound {v[0]} exceeds upper bound {v[1]}")
    if lo is not None and v[0] < lo:
        raise ValueError(f"{name}: must be >= {lo}, got {v[0]}")
    if hi is not None and v[1] > hi:
        raise ValueError(f"{name}: must be <= {hi}, got {v[1]}")
    return v


class EdgeSpec(_Strict):
    """The edge server: a profile, the member it runs, and its fluctuating compute share."""

    profile: str = "a100-sd15"
    member: str = "large"  # the cluster-wide model the edge batches
    capacity: tuple[float, float] = (0.5, 1.0)  # fraction c of the GPU available this round, uniform
    max_batch: int | None = Field(default=None, ge=1)  # overrides the profile's memory limit

    @field_validator("capacity")
    @classmethod
    def _cap(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] <= 0:
            raise ValueError(f"capacity must be > 0, got {v[0]}")
        return _range(v, "capacity", 0.0, 1.0)


class WirelessSpec(_Strict):
    """Downlink shared by the admitted users; each user's uplink is its own (e.g. a fixed RB)."""

    bandwidth_hz: float = Field(default=10e6, gt=0)
    bs_tx_power_dbm: float = 46.0  # 3GPP TR 36.814 macro BS, 10 MHz
    bs_noise_figure_db: float = Field(default=9.0, ge=0)  # UE receiver noise figure (TR 36.814)
    uplink_bandwidth_hz: float = Field(default=1e6, gt=0)
    ue_tx_power_dbm: float = 23.0  # TR 36.814 UE max power
    ue_noise_figure_db: float = Field(default=5.0, ge=0)  # BS receiver noise figure (TR 36.814)
    distance_m: tuple[float, float] = (35.0, 500.0)  # uniform in area over this annulus
    path_loss_1km_db: float = 128.1
    path_loss_exponent: float = Field(default=3.76, gt=0)

    @field_validator("distance_m")
    @classmethod
    def _dist(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _range(v, "distance_m", 1.0)


class PayloadSpec(_Strict):
    """Bytes on the air: the prompt up, the handoff latent down (engine's handoff accounting)."""

    prompt_bytes: float = Field(default=512.0, gt=0)
    # The handoff down: a 4x64x64 fp16 latent (SD 1.5 at 512x512, 32768 B) plus 1761 B of header,
    # schedule and plan, measured with relaydiff.engine.handoff.encode_handoff (DDIM, T = 20, fp16,
    # uncompressed; a multistep DPM-Solver++ 2M handoff also carries prev_x0: one more latent).
    latent_bytes: float = Field(default=34529.0, gt=0)


class PreferenceSpec(_Strict):
    """Per-user weights (quality, latency, energy) ~ Dirichlet(concentration); personalization rho."""

    concentration: tuple[float, float, float] = (2.0, 2.0, 1.0)
    personalization: tuple[float, float] = (0.0, 0.6)  # rho ~ uniform on this range
    complexity: tuple[float, float] = (0.0, 1.0)  # prompt complexity ~ uniform

    @field_validator("concentration")
    @classmethod
    def _conc(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        # Dirichlet needs every entry > 0 and finite (a nan or inf entry draws nan weights).
        if not all(math.isfinite(x) and x > 0 for x in v):
            raise ValueError(f"concentration entries must be finite and > 0, got {v}")
        return v

    @field_validator("personalization", "complexity")
    @classmethod
    def _unit(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _range(v, "range", 0.0, 1.0)


class QualitySpec(_Strict):
    """Quality curves: "auto" (the reference family's measured table when shipped, else the fitted
    curve), "fitted", or the path of a ``relaydiff bench quality --json`` file."""

    table: str = "auto"


class Scenario(_Strict):
    """One scenario: the round's sizes plus the specs above."""

    name: str = "default"
    description: str = ""
    steps: int = Field(default=20, ge=1, le=1000)
    splits: tuple[int, ...] = (4, 8, 12, 16, 20)
    n_users: int = Field(default=10, ge=1)
    edge: EdgeSpec = EdgeSpec()
    wireless: WirelessSpec = WirelessSpec()
    payload: PayloadSpec = PayloadSpec()
    device_member: str = "small"  # the member each device runs (with the user's adapter)
    devices: dict[str, float] = Field(
        default_factory=lambda: {"phone-flagship": 0.3, "phone-mid": 0.35, "phone-low": 0.2, "laptop": 0.15}
    )
    preferences: PreferenceSpec = PreferenceSpec()
    quality: QualitySpec = QualitySpec()

    @model_validator(mode="after")
    def _check(self) -> "Scenario":
        if not self.splits:
            raise ValueError("splits: need at least one split point")
        if list(self.splits) != sorted(set(self.splits)):
            raise ValueError(f"splits: must be strictly increasing, got {list(self.splits)}")
        if self.splits[0] < 1 or self.splits[-1] > self.steps:
            raise ValueError(f"splits: each split must be in 1..steps={self.steps}, got {list(self.splits)}")
        if not self.devices:
            raise ValueError("devices: need at least one device class")
        if any(p < 0 for p in self.devices.values()) or sum(self.devices.values()) <= 0:
            raise ValueError(f"devices: mix weights must be >= 0 with a positive sum, got {self.devices}")
        return self


def _format_error(exc: ValidationError, where: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"  {loc}: {err['msg']}")
    return f"invalid scenario {where}:\n" + "\n".join(lines)


def validate_scenario(model: Any, data: Any, where: str) -> Any:
    """``data`` validated as the pydantic ``model`` (a kind of scenario); the error lists every bad
    field by its dotted path."""
    if not isinstance(data, dict):
        raise ScenarioError(f"invalid scenario {where}: expected a mapping at the top level")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(_format_error(exc, where)) from None


def parse_scenario(data: Any, where: str = "<scenario>") -> Scenario:
    """Validate a scenario mapping; the error lists every bad field by its dotted path."""
    return validate_scenario(Scenario, data, where)


def available_scenarios() -> list[str]:
    """Names of the shipped scenarios."""
    return shipped_names(SCENARIOS_DIR, ".yaml")


def load_scenario(name_or_path: str | Path | Scenario) -> Scenario:
    """A shipped scenario by name, or a YAML/JSON file by path (a :class:`Scenario` is returned as is)."""
    if isinstance(name_or_path, Scenario):
        return name_or_path
    path = resolve(name_or_path, SCENARIOS_DIR, ".yaml", "scenario", ScenarioError)
    return parse_scenario(read_scenario_file(path), str(path))


def read_scenario_file(path: Path) -> Any:
    """The mapping in a scenario file (YAML, or JSON by its suffix), or a clear ScenarioError."""
    if path.suffix == ".json":
        return read_json(path, "scenario", ScenarioError)
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ScenarioError(f"invalid scenario {path}: cannot parse ({exc})") from None
