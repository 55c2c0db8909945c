"""The convex half of DRL + convex: the shared downlink split in closed form, once the discrete choices are made.

Given who is admitted and where each chain is cut, the only continuous resource left in the
round model is the shared downlink: its utility cost is sum_i c_i / b_i over the admitted users
(c_i from :attr:`RoundInstance.bw_cost`). Minimizing it over the simplex has a closed form from
the KKT conditions (c_i / b_i^2 = nu for every user above its floor):

    b_i = max(floor, sqrt(c_i / nu)),  sum_i b_i = budget,

which without floors is b_i = budget sqrt(c_i) / sum_j sqrt(c_j), value (sum_i sqrt(c_i))^2 / budget.
Edge compute is not split per user: the users share it by being batched (the batch interaction is
in the discrete part of the problem), so there is no separate compute-share allocation.
"""

from __future__ import annotations

import numpy as np


def inverse_cost_shares(costs: np.ndarray, budget: float = 1.0, floor: float = 0.0) -> np.ndarray:
    """argmin_b sum_i c_i / b_i s.t. sum_i b_i = budget, b_i >= floor (c_i >= 0), in O(n log n).

    Users with zero cost get the floor (they are indifferent); with all costs zero the budget is
    split equally.
    """
    c = np.asarray(costs, dtype=float)
    if c.ndim != 1:
        raise ValueError(f"costs must be a 1-D array, got shape {c.shape}")
    if np.any(c < 0) or not np.all(np.isfinite(c)):
        raise ValueError("costs must be finite and >= 0")
    if budget <= 0:
        raise ValueError(f"budget must be > 0, got {budget}")
    n = c.size
    if n == 0:
        return c.copy()
    if floor < 0 or floor * n > budget * (1 + 1e-12):
        raise ValueError(f"floor {floor} x {n} users exceeds the budget {budget}")
    r = np.sqrt(c)
    if r.sum() <= 0:
        return np.full(n, budget / n)
    # Users sorted by sqrt(c) descending: the top j are above the floor for the right j.
    order = np.argsort(-r, kind="stable")
    rs = r[order]
    csum = np.cumsum(rs)
    j = np.arange(1, n + 1)
    rest = budget - floor * (n - j)  # budget left for the top j users
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = (rs * rest / csum >= floor - 1e-15) & (csum > 0)
    # The KKT set is the largest prefix whose smallest member stays above the floor.
    top = int(np.max(np.flatnonzero(ok))) + 1 if ok.any() else 0
    out = np.full(n, floor)
    if top:
        out[order[:top]] = rs[:top] * rest[top - 1] / csum[top - 1]
    return out


def inverse_cost_value(costs: np.ndarray, shares: np.ndarray) -> float:
    """sum_i c_i / b_i (inf where a positive cost gets no share)."""
    c, b = np.asarray(costs, dtype=float), np.asarray(shares, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(c > 0, c / b, 0.0)
    return float(terms.sum())


def allocate_bandwidth(bw_cost: np.ndarray, admitted: np.ndarray, budget: float = 1.0, floor: float = 0.0) -> np.ndarray:
    """Shares for all N users: the closed form over the admitted ones, 0 for local users."""
    adm = np.asarray(admitted, dtype=bool)
    out = np.zeros(adm.shape[0])
    if adm.any():
        out[adm] = inverse_cost_shares(np.asarray(bw_cost)[adm], budget, floor)
    return out
