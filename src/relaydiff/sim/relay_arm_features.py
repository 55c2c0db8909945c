"""Arm-context features for a bandit shared by all relay arms (:class:`relaydiff.sched.bandit.SharedLinUCB`).

Why: with one linear model per arm (disjoint LinUCB), each of the 8 arms must learn its own 16
weights from its own rewards, so about half of LinUCB's regret against the oracle on the stationary
stream is paid in the first 1000 requests, and a run that under-samples an arm early can stay 5-10%
below the oracle. Yet the arms differ in ways that are known before any request: their measured
fidelity per prompt complexity, their style fidelity, and how many steps run on the edge and on the
device. One model for all arms, over features that combine the context with these measured
descriptors, learns from every reward.

Arm a's feature vector is ``arm_features[a] * arm_context(x)`` (elementwise): column j pairs one
context quantity (``ARM_CONTEXT_FEATURES[j]``'s left part, read from the relay context
:data:`relaydiff.sim.relay_stream.CONTEXT_FEATURES`) with one arm descriptor (its right part):

- quality, w_q * Q: the fidelity the table measured at 1, 2 and 3 objects, each times w_q, w_q *
  tokens, w_q * rho and w_q * rho * tokens (the model learns how the prompt's length maps onto the
  three measured rows; the object count itself is never seen), and w_q * rho * the style fidelity;
- latency, -w_l * L / L_ref: the device's share of the chain ((T - k) / T times the measured cost of
  a step without guidance) times w_l and times w_l * decode / L_ref; for a user with a style
  adapter (w_l * styled) the extra device time its LoRA costs, the device's share times (the arm's
  measured adapter factor - 1); the edge's share k / T times the
  edge chain time; whether the arm hands off (k > 0) times the link time, the edge backlog and w_l *
  the edge occupancy;
- an intercept per arm (one-hot).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from relaydiff.sim.relay_stream import CONTEXT_FEATURES
from relaydiff.system.relay_arms import COMPLEXITY_CLASSES, RelayArm

_QUALITY_SOURCES = ("wq", "wq*tokens", "wq*rho", "wq*rho*tokens")
_LATENCY = (  # (context quantity, arm descriptor)
    ("wl", "device_frac"),
    ("wl*decode_s/ref", "device_frac"),
    ("wl*decode_s/ref", "1"),
    ("wl*styled", "device_frac_adapter"),
    ("wl*link_s/ref", "hands_off"),
    ("wl*edge_chain_s/ref", "edge_frac"),
    ("wl*edge_backlog_s/ref", "hands_off"),
    ("wl*edge_occupancy", "hands_off"),
)
_COLUMNS = ([(src, f"fidelity{c}") for c in COMPLEXITY_CLASSES for src in _QUALITY_SOURCES]
            + [("wq*rho", "style_fidelity")] + list(_LATENCY))


def arm_context_features(arm_names: Sequence[str]) -> tuple[str, ...]:
    """The names of the shared model's columns, ``context quantity x arm descriptor``."""
    return tuple(f"{src} x {desc}" for src, desc in _COLUMNS) + tuple(f"bias x arm={a}" for a in arm_names)


def arm_feature_matrix(arms: Sequence[RelayArm]) -> np.ndarray:
    """[arms, columns]: each arm's measured descriptors (see the module docstring)."""
    rows = []
    for i, a in enumerate(arms):
        device_frac = (a.steps - a.k) / a.steps * a.device_row_factor
        desc = {"1": 1.0, "style_fidelity": a.style_fidelity, "edge_frac": a.k / a.steps,
                "device_frac": device_frac, "device_frac_adapter": device_frac * (a.adapter_factor - 1.0),
                "hands_off": float(a.k > 0),
                **{f"fidelity{c}": f for c, f in zip(COMPLEXITY_CLASSES, a.fidelity)}}
        rows.append([desc[d] for _, d in _COLUMNS] + list(np.eye(len(arms))[i]))
    return np.array(rows)


_INDEX = {n: i for i, n in enumerate(CONTEXT_FEATURES)}
_OCCUPANCY = [j for j, (src, _) in enumerate(_COLUMNS) if src == "wl*edge_occupancy"][0]
_WL = _INDEX["wl"]
_OCC_SRC = _INDEX["edge_occupancy"]
_SOURCES: dict[int, np.ndarray] = {}  # per number of arms: where each column's context quantity is read


def _sources(n_arms: int) -> np.ndarray:
    """Where each column's context quantity is read in the relay context."""
    src = _SOURCES.get(n_arms)
    if src is None:
        src = _SOURCES[n_arms] = np.array([_INDEX.get(s, _INDEX["edge_occupancy"]) for s, _ in _COLUMNS]
                                          + [_INDEX["bias"]] * n_arms)
    return src


def arm_context(x: np.ndarray, n_arms: int) -> np.ndarray:
    """The relay context ``x`` (CONTEXT_FEATURES) as the shared model's context (one entry per column)."""
    g = x.take(_sources(n_arms))
    g[_OCCUPANCY] *= x[_WL]
    return g


def arm_context_lift(x: np.ndarray) -> np.ndarray:
    """The relay context with its one product appended, ``w_l * edge_occupancy``: ``arm_context(x)`` is a
    0/1 matrix (:func:`arm_context_projection`) times this vector (18 numbers for 29 columns)."""
    u = np.empty(len(x) + 1)
    u[:-1] = x
    u[-1] = x[_OCC_SRC] * x[_WL]
    return u


def arm_context_projection(n_arms: int) -> np.ndarray:
    """[columns, len(CONTEXT_FEATURES) + 1]: ``arm_context(x, n_arms) == proj @ arm_context_lift(x)``."""
    src = _sources(n_arms)
    proj = np.zeros((len(src), len(CONTEXT_FEATURES) + 1))
    proj[np.arange(len(src)), src] = 1.0
    proj[_OCCUPANCY] = 0.0
    proj[_OCCUPANCY, -1] = 1.0
    return proj


__all__ = ["arm_context", "arm_context_features", "arm_context_lift", "arm_context_projection", "arm_feature_matrix"]
