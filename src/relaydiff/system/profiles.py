"""Hardware profiles: measured or published per-step latency (and energy) of a family member.

One JSON format for everything (the shipped defaults in ``profiles/*.json`` and what
``relaydiff profile`` measures)::

    {
      "format": "relaydiff.profile/1",
      "kind": "edge" | "device",
      "name": "...", "hardware": "...",
      "members": {"<member>": {"step_latency_s": {"<batch size>": seconds per batched step, ...},
                                "source": "...", "estimate": bool}},
      "max_batch": int,                       # edge: largest batch that fits in memory
      "decode_s": s, "decode_j": J,          # device: VAE decode time and energy
      "step_power_w": W,                      # device: average power while denoising
      "tx_power_w": W, "rx_power_w": W,       # device: radio power while sending / receiving
      "sources": {"<field>": "citation; 'estimate' when not measured"}
    }

Units: seconds, joules, watts. A step latency includes classifier-free guidance (two U-Net
evaluations per chain, as the engine measures it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from relaydiff.shipped import read_json, resolve, shipped_names

PROFILE_FORMAT = "relaydiff.profile/1"
PROFILES_DIR = Path(__file__).parent / "profiles"


class ProfileError(ValueError):
    """A profile file is missing, malformed or lacks a field the caller needs."""


@dataclass(frozen=True)
class MemberLatency:
    """Per-step latency of one member as a function of the batch size."""

    batch_sizes: tuple[int, ...]
    step_latency_s: tuple[float, ...]
    source: str = ""
    estimate: bool = False

    def fit_linear(self) -> tuple[float, float]:
        """(alpha, beta) of t(n) = alpha + beta * n by least squares, both >= 0.

        With a single batch size the whole time is charged per chain (alpha = 0), the
        pessimistic reading: batching then saves nothing.
        """
        n = np.asarray(self.batch_sizes, dtype=float)
        t = np.asarray(self.step_latency_s, dtype=float)
        if len(n) == 1:
            return 0.0, float(t[0] / n[0])
        beta, alpha = np.polyfit(n, t, 1)
        if alpha < 0:  # force through the origin
            return 0.0, float((n @ t) / (n @ n))
        if beta < 0:
            return float(t.mean()), 0.0
        return float(alpha), float(beta)

    def at(self, batch: int) -> float:
        """Step latency at a batch size (linear interpolation / the linear fit outside the range)."""
        if self.batch_sizes[0] <= batch <= self.batch_sizes[-1]:
            return float(np.interp(batch, self.batch_sizes, self.step_latency_s))
        alpha, beta = self.fit_linear()
        return alpha + beta * batch


@dataclass(frozen=True)
class Profile:
    """A parsed profile file (see the module docstring for the fields)."""

    kind: Literal["edge", "device"]
    name: str
    hardware: str
    members: dict[str, MemberLatency]
    max_batch: int | None = None
    decode_s: float | None = None
    decode_j: float | None = None
    step_power_w: float | None = None
    tx_power_w: float | None = None
    rx_power_w: float | None = None
    sources: dict[str, str] = field(default_factory=dict)
    path: str = ""

    def member(self, name: str | None = None) -> MemberLatency:
        """The named member, or the only/first one when ``name`` is None."""
        if name is None:
            return next(iter(self.members.values()))
        if name not in self.members:
            raise ProfileError(f"profile '{self.name}' has no member '{name}' (has: {sorted(self.members)})")
        return self.members[name]

    def require(self, *names: str) -> None:
        """Raise a clear error when a field the caller needs is absent."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ProfileError(f"profile '{self.name}' ({self.path}) lacks {', '.join(missing)}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (inverse of :func:`parse_profile`)."""
        out: dict[str, Any] = {"format": PROFILE_FORMAT, "kind": self.kind, "name": self.name, "hardware": self.hardware}
        out["members"] = {
            k: {
                "step_latency_s": {str(b): t for b, t in zip(m.batch_sizes, m.step_latency_s)},
                "source": m.source,
                "estimate": m.estimate,
            }
            for k, m in self.members.items()
        }
        for key in ("max_batch", "decode_s", "decode_j", "step_power_w", "tx_power_w", "rx_power_w"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["sources"] = dict(self.sources)
        return out


def _positive(data: dict[str, Any], key: str, where: str, integer: bool = False) -> Any:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ProfileError(f"{where}: '{key}' must be a positive number, got {value!r}")
    if integer and int(value) != value:
        raise ProfileError(f"{where}: '{key}' must be an integer, got {value!r}")
    return int(value) if integer else float(value)


def parse_profile(data: Any, where: str = "<profile>") -> Profile:
    """Validate a profile's JSON object; errors name the file and the field."""
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: a profile must be a JSON object")
    if data.get("format", PROFILE_FORMAT) != PROFILE_FORMAT:
        raise ProfileError(f"{where}: 'format' must be {PROFILE_FORMAT!r}, got {data.get('format')!r}")
    kind = data.get("kind")
    if kind not in ("edge", "device"):
        raise ProfileError(f"{where}: 'kind' must be 'edge' or 'device', got {kind!r}")
    members_raw = data.get("members")
    if not isinstance(members_raw, dict) or not members_raw:
        raise ProfileError(f"{where}: 'members' must be a non-empty object")
    members: dict[str, MemberLatency] = {}
    for name, m in members_raw.items():
        lat = m.get("step_latency_s") if isinstance(m, dict) else None
        if not isinstance(lat, dict) or not lat:
            raise ProfileError(f"{where}: members.{name}.step_latency_s must map batch sizes to seconds")
        try:
            pairs = sorted((int(b), float(t)) for b, t in lat.items())
        except (TypeError, ValueError) as exc:
            raise ProfileError(f"{where}: members.{name}.step_latency_s: {exc}") from exc
        if any(b <= 0 or t <= 0 for b, t in pairs):
            raise ProfileError(f"{where}: members.{name}.step_latency_s needs batch sizes >= 1 and times > 0")
        members[name] = MemberLatency(
            tuple(b for b, _ in pairs), tuple(t for _, t in pairs), str(m.get("source", "")), bool(m.get("estimate", False))
        )
    sources = data.get("sources", {})
    if not isinstance(sources, dict):
        raise ProfileError(f"{where}: 'sources' must be an object")
    return Profile(
        kind=kind,
        name=str(data.get("name", Path(where).stem)),
        hardware=str(data.get("hardware", "")),
        members=members,
        max_batch=_positive(data, "max_batch", where, integer=True),
        decode_s=_positive(data, "decode_s", where),
        decode_j=_positive(data, "decode_j", where),
        step_power_w=_positive(data, "step_power_w", where),
        tx_power_w=_positive(data, "tx_power_w", where),
        rx_power_w=_positive(data, "rx_power_w", where),
        sources={str(k): str(v) for k, v in sources.items()},
        path=where,
    )


def available_profiles() -> list[str]:
    """Names of the shipped default profiles."""
    return shipped_names(PROFILES_DIR, ".json")


_CACHE: dict[tuple[str, int], Profile] = {}


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name (``available_profiles()``) or any profile file by path.

    Parsed profiles are cached per file and modification time; treat them as read-only.
    """
    path = resolve(name_or_path, PROFILES_DIR, ".json", "profile", ProfileError)
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _CACHE:  # sampling a round reads several profiles: parse each file once
        _CACHE[key] = parse_profile(read_json(path, "profile", ProfileError), str(path))
    return _CACHE[key]


def save_profile(profile: Profile, path: str | Path) -> Path:
    """Write a profile as JSON (the format ``load_profile`` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_dict(), indent=2) + "\n")
    return path
