"""Relay configurations (the bandit's arms), each priced from measurements only.

An arm is one way to serve a request of T steps: the large member on the edge for steps 0..k,
then the small member on the user's device for k..T (with the user's style adapter when they have
one), the device segment with the request's guidance or without classifier-free guidance
(``device_guidance = 1``). k = T is edge-only, k = 0 device-only.

Where each number comes from (nothing is invented):

- prompt fidelity per prompt complexity: the family's measured quality table (``relaydiff bench
  quality --json``): ``relay[k].by_objects`` (1, 2, 3-object prompts) at the request's guidance,
  ``relay_device_guidance.relay[k].by_objects`` without device guidance. The per-image spread is
  the table's standard error times sqrt(n_prompts).
- style fidelity of a user's adapter: ``personalization.styles[*].style_fidelity`` at k, averaged
  over the measured styles, measured with the device segment at the request's guidance. Arms
  without device guidance read ``style_fidelity_device_guidance`` (the same curves with the device
  segment at ``personalization.device_guidance``); a table older than that curve has only the guided
  one, which they then reuse (said in ``RelayArm.style_source``: live, it overstated styled users'
  quality on relay_k10_g1 / relay_k14_g1 by about 0.2).
- step costs: the edge and device profiles (:mod:`relaydiff.system.profiles`). A device segment
  without guidance runs one U-Net row a step instead of two; its cost factor is the ratio of the
  small member's measured step at the two guidances (``personalization.adapter_step_cost``'s plain
  steps, batch 1), or for an older table the single-request wall-time ratio of the device-only
  chain without and with guidance (said in ``RelayArm.row_source``). A device step
  with the user's style adapter (a LoRA) costs ``RelayArm.adapter_factor`` times a plain one: the
  table's ``personalization.adapter_step_cost`` (the small member with against without the adapter,
  batch 1, median over interleaved rounds) at the device segment's guidance; 1 for a table without
  it (said in ``RelayArm.adapter_source``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from relaydiff.shipped import read_json
from relaydiff.system.quality import REFERENCE_TABLE, QualityTableError

COMPLEXITY_CLASSES = ("1", "2", "3")  # objects in the prompt: the table's by_objects keys


@dataclass(frozen=True)
class ArmSpec:
    """A relay configuration to price: handoff step k and the device segment's guidance (None: the request's)."""

    k: int
    device_guidance: float | None = None

    def name(self, steps: int) -> str:
        """``edge_only``, ``device_only``, ``relay_k8``; ``_g1`` when the device runs without guidance."""
        base = "edge_only" if self.k == steps else "device_only" if self.k == 0 else f"relay_k{self.k}"
        if self.device_guidance is None or self.k == steps:
            return base
        return f"{base}_g{self.device_guidance:g}"


@dataclass(frozen=True)
class RelayArm:
    """One arm with its measured quality and cost inputs."""

    name: str
    k: int
    steps: int
    device_guidance: float | None
    fidelity: tuple[float, ...]  # mean prompt fidelity per complexity class (COMPLEXITY_CLASSES)
    fidelity_std: float  # per-image standard deviation of prompt fidelity
    style_fidelity: float  # mean style fidelity of a user's adapter at this k
    device_row_factor: float  # device step cost relative to a step with guidance (1, or the measured ratio)
    source: str
    style_source: str
    adapter_factor: float = 1.0  # a device step with the user's style adapter over one without (measured)
    adapter_source: str = "not measured"
    row_source: str = "the request's guidance"

    @property
    def edge_steps(self) -> int:
        return self.k

    @property
    def device_steps(self) -> int:
        return self.steps - self.k


DEFAULT_ARMS = (
    ArmSpec(20), ArmSpec(0), ArmSpec(0, 1.0), ArmSpec(8), ArmSpec(14),
    ArmSpec(6, 1.0), ArmSpec(10, 1.0), ArmSpec(14, 1.0),
)


def _read_table(path: str | Path) -> tuple[dict[str, Any], Path]:
    path = REFERENCE_TABLE if path == "auto" else Path(path)
    data = read_json(path, "quality table", QualityTableError)
    if not isinstance(data, dict):
        raise QualityTableError(f"{path}: expected a JSON object (relaydiff bench quality --json)")
    return data, path


def _points(entry: Any, field: str, path: Path) -> dict[int, dict[str, Any]]:
    if not isinstance(entry, list) or not entry or not all(isinstance(p, dict) and "k" in p for p in entry):
        raise QualityTableError(f"{path}: '{field}' must be a list of per-k points (relaydiff bench quality --json)")
    return {int(p["k"]): p for p in entry}


def _fidelity(point: dict[str, Any], field: str, path: Path) -> tuple[tuple[float, ...], float]:
    by = point.get("by_objects")
    if not isinstance(by, dict) or any(c not in by for c in COMPLEXITY_CLASSES):
        raise QualityTableError(f"{path}: '{field}' at k={point['k']} lacks by_objects for "
                                f"{', '.join(COMPLEXITY_CLASSES)} objects")
    se = point.get("fidelity_se")
    if se is None:
        raise QualityTableError(f"{path}: '{field}' at k={point['k']} lacks fidelity_se")
    return tuple(float(by[c]) for c in COMPLEXITY_CLASSES), float(se)


def _style_curve(pers: dict[str, Any], key: str, path: Path) -> dict[int, float]:
    """The mean over styles of ``personalization.styles[*][key]``, by split point."""
    curves = [s.get(key) for s in pers["styles"].values() if isinstance(s, dict)]
    if not curves or any(not isinstance(c, list) or len(c) != len(pers["split_points"]) for c in curves):
        raise QualityTableError(f"{path}: 'personalization' needs one {key} list per style, as long as split_points")
    try:
        mean = np.mean(np.asarray(curves, float), axis=0)
    except (TypeError, ValueError):
        raise QualityTableError(f"{path}: 'personalization' {key}: numbers expected") from None
    return dict(zip((int(k) for k in pers["split_points"]), (float(v) for v in mean)))


def _adapter_costs(entry: Any, path: Path) -> tuple[dict[float, float] | None, dict[float, float]]:
    """``personalization.adapter_step_cost`` per guidance, read once: the batch-1 factor's median
    (required when the entry is there; None: not in the table) and the small member's plain batch-1
    step in ms (median; only where measured: older tables lack it)."""
    if entry is None:
        return None, {}
    by = entry.get("by_guidance") if isinstance(entry, dict) else None
    factors, plain_ms = {}, {}
    for g, rows in (by.items() if isinstance(by, dict) else ()):
        try:
            factors[float(g)] = float(rows["batch1"]["factor"]["median"])
        except (KeyError, TypeError, ValueError):
            raise QualityTableError(f"{path}: 'personalization.adapter_step_cost.by_guidance.{g}' needs "
                                    "batch1.factor.median") from None
        try:
            v = float(rows["batch1"]["plain_ms"]["median"])
        except (KeyError, TypeError, ValueError):
            continue
        if np.isfinite(v) and v > 0:
            plain_ms[float(g)] = v
    if not factors or any(not np.isfinite(f) or f <= 0 for f in factors.values()):
        raise QualityTableError(f"{path}: 'personalization.adapter_step_cost' needs a positive batch-1 factor per "
                                "guidance (relaydiff bench quality --json)")
    return factors, plain_ms


def _adapter_factor(costs: dict[float, float] | None, guidance: Any, path: Path) -> tuple[float, str]:
    """The style adapter's step cost factor at the device segment's guidance, and where it comes from."""
    if costs is None:
        return 1.0, f"{path}: no personalization.adapter_step_cost (a styled device step priced as a plain one)"
    if guidance is None or float(guidance) not in costs:
        raise QualityTableError(f"{path}: 'personalization.adapter_step_cost' has no factor at guidance {guidance} "
                                f"(has {sorted(costs)})")
    return costs[float(guidance)], f"{path}: personalization.adapter_step_cost at guidance {float(guidance):g}, batch 1"


def _row_factor(plain_ms: dict[float, float], guidance: Any, device_guidance: float, relay: dict[int, Any],
                no_cfg: dict[int, Any], path: Path) -> tuple[float, str]:
    """A device step at ``device_guidance`` over one at the request's guidance: the per-step costs the
    table measured in the same interleaved rounds when it has them, else the device-only chain's
    single-request wall time at both guidances (text encoding and decoding included, which made it
    14-23% low against live device segments on the 8x8 family)."""
    if guidance is not None and float(guidance) in plain_ms and float(device_guidance) in plain_ms:
        return (plain_ms[float(device_guidance)] / plain_ms[float(guidance)],
                f"{path}: personalization.adapter_step_cost plain steps, batch 1, guidance "
                f"{float(device_guidance):g} over {float(guidance):g}")
    base = relay.get(0, {}).get("wall_s_single")
    mine = no_cfg.get(0, {}).get("wall_s_single")
    if not base or not mine:
        raise QualityTableError(f"{path}: device-only wall_s_single at both guidances is needed for the "
                                "cost of a device segment without guidance")
    return float(mine) / float(base), f"{path}: device-only wall_s_single without over with guidance"


def load_relay_arms(specs: tuple[ArmSpec, ...] = DEFAULT_ARMS, table: str | Path = "auto") -> list[RelayArm]:
    """The arms ``specs`` priced from a quality table; a clear error names any curve the table lacks."""
    data, path = _read_table(table)
    cfg = data.get("config") if isinstance(data.get("config"), dict) else {}
    steps, n_prompts = cfg.get("steps"), cfg.get("n_prompts")
    if not isinstance(steps, int) or not isinstance(n_prompts, int) or n_prompts < 2:
        raise QualityTableError(f"{path}: 'config' needs integer 'steps' and 'n_prompts'")
    relay = _points(data.get("relay"), "relay", path)
    pers = data.get("personalization")
    if not isinstance(pers, dict) or not isinstance(pers.get("styles"), dict) or "split_points" not in pers:
        raise QualityTableError(f"{path}: 'personalization' with split_points and styles is needed for the style curve")
    style_curve = _style_curve(pers, "style_fidelity", path)
    pers_dg = pers.get("device_guidance")
    has_unguided = isinstance(pers_dg, (int, float)) and all(isinstance(v, dict) and "style_fidelity_device_guidance" in v
                                               for v in pers["styles"].values())
    style_curve_dg = _style_curve(pers, "style_fidelity_device_guidance", path) if has_unguided else None
    adapter_cost, plain_steps = _adapter_costs(pers.get("adapter_step_cost"), path)
    request_guidance = cfg.get("guidance")
    dg = data.get("relay_device_guidance")
    no_cfg = _points(dg.get("relay"), "relay_device_guidance.relay", path) if isinstance(dg, dict) else {}
    arms = []
    for spec in specs:
        if not 0 <= spec.k <= steps:
            raise QualityTableError(f"arm k={spec.k}: handoff step outside 0..{steps}")
        guided = spec.device_guidance is not None and spec.k < steps
        if guided:
            if not no_cfg or float(dg.get("guidance", -1)) != float(spec.device_guidance):
                raise QualityTableError(f"{path}: no 'relay_device_guidance' curve at device guidance "
                                        f"{spec.device_guidance:g} (arm k={spec.k})")
            points, field = no_cfg, "relay_device_guidance.relay"
        else:
            points, field = relay, "relay"
        if spec.k not in points:
            raise QualityTableError(f"{path}: '{field}' has no point at k={spec.k} (has {sorted(points)})")
        fid, se = _fidelity(points[spec.k], field, path)
        if guided:
            row_factor, row_src = _row_factor(plain_steps, request_guidance, spec.device_guidance, relay, no_cfg, path)
        else:
            row_factor, row_src = 1.0, "the request's guidance"
        near = min(style_curve, key=lambda s: abs(s - spec.k))
        if guided and style_curve_dg is not None and float(pers_dg) == float(spec.device_guidance):
            style, style_src = style_curve_dg[near], f"personalization k={near} at device guidance {float(pers_dg):g}"
        else:
            style, style_src = style_curve[near], f"personalization k={near}"
            if guided:
                style_src += (" (measured with device guidance; the table has no style curve at device guidance "
                              f"{spec.device_guidance:g}: rerun relaydiff bench quality)")
        if spec.k == steps:
            factor, factor_src = 1.0, "no device segment"
        else:
            g = spec.device_guidance if guided else request_guidance
            factor, factor_src = _adapter_factor(adapter_cost, g, path)
        arms.append(RelayArm(
            name=spec.name(steps), k=spec.k, steps=steps, device_guidance=spec.device_guidance if guided else None,
            fidelity=fid, fidelity_std=se * float(np.sqrt(n_prompts)), style_fidelity=float(style),
            device_row_factor=row_factor, source=f"{path}: {field}[k={spec.k}]", style_source=style_src,
            adapter_factor=factor, adapter_source=factor_src, row_source=row_src))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise QualityTableError(f"arms: repeated configuration in {names}")
    return arms


__all__ = ["COMPLEXITY_CLASSES", "DEFAULT_ARMS", "ArmSpec", "RelayArm", "load_relay_arms"]
