"""Quality of a split chain as a function of the handoff step.

Quality of user i at split k (k edge steps on the large model, T - k on the user's personalized
device model) mixes two fidelities, weighted by how much the user cares about personal style
(``personalization`` rho in [0, 1]):

    Q_i(k) = (1 - rho_i) * F(k / T, complexity_i) + rho_i * P(k / T)

- F, prompt fidelity of the relay, rises with the share of large-model steps: it goes from the
  small model's fidelity (k = 0) to the large model's (k = T). Complex prompts widen the gap.
- P, personal-style fidelity, falls when too few late steps run on the personalized model.

Both curves default to the logistic family ``L / (1 + exp(kappa (x - x0))) + C`` used by HIS
(iimxinyi/HIS) to fit quality against the number of shared steps. The default parameters are
*estimates* shaped on public figures (BK-SDM: COCO CLIP score 0.2958 for SD-v1.4 vs 0.2653 for
BK-SDM-Tiny, i.e. the small U-Net keeps ~90% of the large one's prompt alignment; RISE / Hybrid-SD
report full-model quality with the first ~40-60% of steps on the large model). A measured table
(``relaydiff bench quality --json``: ``relay`` and ``personalization`` entries, fidelity vs
handoff step k) replaces them: by default the reference family's table when it is shipped
(``assets/reference/quality.json``), or any file a scenario names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from relaydiff.shipped import read_json


class QualityTableError(ValueError):
    """A quality table file is missing or malformed."""


def logistic(x: np.ndarray, height: float, kappa: float, x0: float, floor: float) -> np.ndarray:
    """The HIS curve L / (1 + exp(kappa (x - x0))) + C (kappa < 0 makes it increasing)."""
    return height / (1.0 + np.exp(kappa * (np.asarray(x, dtype=float) - x0))) + floor


def _curve_at(x: np.ndarray, xs, ys, kappa: float, x0: float) -> tuple[np.ndarray, float, float]:
    """A curve's shape at x and at its two ends: the measured points where the table has them,
    else the HIS logistic."""
    if xs is not None and ys is not None:
        return np.interp(x, xs, ys), ys[0], ys[-1]
    ends = logistic(np.array([0.0, 1.0]), 1.0, kappa, x0, 0.0)
    return logistic(x, 1.0, kappa, x0, 0.0), ends[0], ends[1]


def _share(value: np.ndarray, start: float, end: float) -> np.ndarray:
    """How far along from ``start`` to ``end`` each value is (1 where the curve is flat)."""
    return (value - start) / (end - start) if end != start else np.ones_like(value)


@dataclass(frozen=True)
class QualityModel:
    """Fidelity curves on the normalized handoff position x = k / T in [0, 1].

    ``relay_x``/``relay_y`` and ``style_x``/``style_y``, when set, are measured points that are
    interpolated linearly (and rescaled so that the full-large-model point maps to
    ``large_fidelity``) instead of the logistic defaults.
    """

    small_fidelity: float = 0.86  # F(0) for a prompt of complexity 0.5 (estimate, BK-SDM CLIP ratio ~0.90)
    large_fidelity: float = 0.96  # F(1) (estimate)
    complexity_gap: float = 0.10  # extra loss of the small model per unit of complexity above 0.5
    relay_kappa: float = -12.0  # steepness of F (negative: increasing in k)
    relay_x0: float = 0.30  # half of the gain reached with 30% of the steps on the large model
    style_kappa: float = 14.0  # steepness of P (positive: decreasing in k)
    style_x0: float = 0.80  # half of the style lost when fewer than 20% of the steps are personal
    style_floor: float = 0.35  # style fidelity with no personalized step (estimate)
    relay_x: tuple[float, ...] | None = None
    relay_y: tuple[float, ...] | None = None
    style_x: tuple[float, ...] | None = None
    style_y: tuple[float, ...] | None = None
    source: str = "default fitted logistic curve (estimate; see relaydiff.system.quality)"

    def __post_init__(self) -> None:
        if not 0.0 <= self.small_fidelity <= self.large_fidelity <= 1.0:
            raise ValueError(
                "quality: need 0 <= small_fidelity <= large_fidelity <= 1, got "
                f"{self.small_fidelity}, {self.large_fidelity}"
            )
        if not 0.0 <= self.style_floor <= 1.0:
            raise ValueError(f"quality: style_floor must be in [0, 1], got {self.style_floor}")

    def relay_fidelity(self, x: np.ndarray, complexity: np.ndarray) -> np.ndarray:
        """F(x, complexity) in [0, 1]; broadcasts x against complexity."""
        x = np.clip(np.asarray(x, dtype=float), 0.0, 1.0)
        cx = np.asarray(complexity, dtype=float)
        lo = np.clip(self.small_fidelity - self.complexity_gap * (cx - 0.5), 0.0, self.large_fidelity)
        shape, y0, y1 = _curve_at(x, self.relay_x, self.relay_y, self.relay_kappa, self.relay_x0)
        frac = _share(shape, y0, y1)
        return lo + (self.large_fidelity - lo) * frac

    def style_fidelity(self, x: np.ndarray) -> np.ndarray:
        """P(x) in [style_floor, 1]: 1 with all steps personalized, floor with none."""
        x = np.clip(np.asarray(x, dtype=float), 0.0, 1.0)
        shape, y0, y1 = _curve_at(x, self.style_x, self.style_y, self.style_kappa, self.style_x0)
        frac = _share(shape, y1, y0)
        return self.style_floor + (1.0 - self.style_floor) * frac

    def table(self, steps: int, complexity: np.ndarray, personalization: np.ndarray) -> np.ndarray:
        """Q[i, k] for k = 0..steps: the per-user quality table used by the round problem."""
        cx = np.asarray(complexity, dtype=float)[:, None]
        rho = np.asarray(personalization, dtype=float)[:, None]
        x = np.arange(steps + 1, dtype=float)[None, :] / steps
        q = (1.0 - rho) * self.relay_fidelity(x, cx) + rho * self.style_fidelity(x)
        return np.clip(q, 0.0, 1.0)


def _curve(entry: Any, name: str, path: Path, steps: float | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Read one fidelity-vs-k curve as normalized x = k / T and y, from any accepted layout.

    Accepted: ``{"k": [...], "fidelity": [...], "steps": T}``; a list of ``{"k": .., "fidelity": ..}``
    (the ``relay`` entry of ``bench quality``); or ``{"split_points": [...], "styles": {style:
    {"style_fidelity": [...]}}}`` (its ``personalization`` entry, averaged over styles).
    T comes from the entry, then from ``steps`` (the bench's ``config.steps``), then the largest k.
    """
    if isinstance(entry, dict) and "split_points" in entry and isinstance(entry.get("styles"), dict):
        ks = list(entry["split_points"])
        curves = [v.get("style_fidelity") for v in entry["styles"].values() if isinstance(v, dict)]
        if not curves or any(c is None or len(c) != len(ks) for c in curves):
            raise QualityTableError(f"{path}: '{name}' needs one style_fidelity list per style, as long as split_points")
        ys, t = list(np.mean(np.asarray(curves, dtype=float), axis=0)), None
    elif isinstance(entry, dict) and "k" in entry:
        ks, ys, t = entry["k"], entry.get("fidelity", entry.get("score")), entry.get("steps")
    elif isinstance(entry, list) and entry and isinstance(entry[0], dict):
        ks = [p.get("k", p.get("handoff_step")) for p in entry]
        ys = [p.get("fidelity", p.get("score")) for p in entry]
        t = entry[0].get("steps")
    else:
        raise QualityTableError(
            f"{path}: '{name}' must be a list of {{k, fidelity}} points, a dict with 'k' and 'fidelity' lists, "
            "or a dict with 'split_points' and 'styles'"
        )
    if ys is None or len(ks) != len(ys) or len(ks) < 2 or any(v is None for v in list(ks) + list(ys)):
        raise QualityTableError(f"{path}: '{name}' needs at least two (k, fidelity) points of equal length")
    total = float(t if t is not None else steps if steps is not None else max(ks))
    order = np.argsort(np.asarray(ks, dtype=float))
    x = tuple(float(ks[i]) / total for i in order)
    y = tuple(float(ys[i]) for i in order)
    if any(b <= a for a, b in zip(x, x[1:])):
        raise QualityTableError(f"{path}: '{name}' has repeated handoff steps")
    if x[0] < 0 or x[-1] > 1:
        raise QualityTableError(f"{path}: '{name}' has handoff steps outside 0..{total:g}")
    return x, y


# Where the reference family's measured table lives when it is shipped: the output of
# ``relaydiff bench quality --json`` on the reference family, saved next to the family.
REFERENCE_TABLE = Path(__file__).resolve().parent.parent / "assets" / "reference" / "quality.json"


def load_quality(path: str | Path | None = "auto", **overrides: Any) -> QualityModel:
    """The quality model from a ``bench quality --json`` file, or the fitted default curve.

    ``"auto"`` (the default): the reference family's measured table when it is shipped
    (:data:`REFERENCE_TABLE`), else the fitted curve; ``None`` or ``"fitted"``: the fitted curve;
    anything else: that file.
    """
    if path == "auto":
        path = REFERENCE_TABLE if REFERENCE_TABLE.is_file() else None
    if path is None or path == "fitted":
        return QualityModel(**overrides)
    path = Path(path)
    data = read_json(path, "quality table", QualityTableError)
    if not isinstance(data, dict) or "relay" not in data:
        raise QualityTableError(f"{path}: expected a JSON object with a 'relay' entry (relaydiff bench quality --json)")
    cfg = data.get("config")
    steps = cfg.get("steps") if isinstance(cfg, dict) else None
    rx, ry = _curve(data["relay"], "relay", path, steps)
    kwargs: dict[str, Any] = {"relay_x": rx, "relay_y": ry, "source": f"measured table {path}"}
    # Measured endpoints set the small/large fidelities; the table is for the reference prompt mix.
    kwargs["small_fidelity"], kwargs["large_fidelity"] = float(min(ry[0], ry[-1])), float(max(ry[0], ry[-1]))
    pers = data.get("personalization")
    if isinstance(pers, dict) and "skipped" in pers:
        kwargs["source"] += f" (personalization: default curve, bench skipped it: {pers['skipped']})"
    elif pers is not None:
        sx, sy = _curve(pers, "personalization", path, steps)
        kwargs.update(style_x=sx, style_y=sy, style_floor=float(min(sy)) / max(float(max(sy)), 1e-12))
    kwargs.update(overrides)
    return QualityModel(**kwargs)


__all__ = ["REFERENCE_TABLE", "QualityModel", "QualityTableError", "load_quality", "logistic"]
