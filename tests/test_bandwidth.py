"""The closed-form bandwidth allocation against a generic solver (SLSQP)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from relaydiff.system.bandwidth import allocate_bandwidth, inverse_cost_shares, inverse_cost_value
from relaydiff.system.problem import Decision, evaluate, sample_instance
from relaydiff.system.scenario import load_scenario

DEFAULT = load_scenario("default")  # resolved once, as the CLI does


def _slsqp(c: np.ndarray, budget: float, floor: float) -> float:
    """Generic constrained minimization of sum c_i / b_i (costs rescaled for conditioning)."""
    scale = float(c.max())
    c = c / scale
    n = c.size
    x0 = np.full(n, budget / n)
    res = minimize(
        lambda b: float(np.sum(c / b)),
        x0,
        jac=lambda b: -c / b**2,
        bounds=[(max(floor, 1e-9), budget)] * n,
        constraints=[{"type": "ineq", "fun": lambda b: budget - b.sum(), "jac": lambda b: -np.ones(n)}],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    b = res.x
    assert b.sum() <= budget + 1e-8 and np.all(b >= floor - 1e-9)  # feasible, even if not converged
    return float(np.sum(c / b)) * scale


@pytest.mark.parametrize("seed", range(20))
def test_closed_form_matches_slsqp(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 12))
    c = rng.lognormal(0.0, 1.5, size=n)
    budget = float(rng.uniform(0.5, 2.0))
    floor = 0.0 if seed % 2 == 0 else float(rng.uniform(0.0, 0.9) * budget / n)
    b = inverse_cost_shares(c, budget, floor)
    assert b.sum() == pytest.approx(budget)
    assert np.all(b >= floor - 1e-12)
    closed = inverse_cost_value(c, b)
    assert closed <= _slsqp(c, budget, floor) * (1 + 1e-6)
    assert closed == pytest.approx(_slsqp(c, budget, floor), rel=1e-4)
    if floor == 0.0:
        assert closed == pytest.approx(np.sqrt(c).sum() ** 2 / budget)


def test_floor_binds_for_cheap_users() -> None:
    c = np.array([4.0, 1.0, 1e-6])
    b = inverse_cost_shares(c, 1.0, floor=0.1)
    assert b[2] == pytest.approx(0.1)
    assert b == pytest.approx([0.6, 0.3, 0.1])


def test_zero_costs_and_bad_input() -> None:
    assert inverse_cost_shares(np.zeros(4)) == pytest.approx(np.full(4, 0.25))
    with pytest.raises(ValueError, match="costs"):
        inverse_cost_shares(np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="floor"):
        inverse_cost_shares(np.ones(3), 1.0, floor=0.5)
    with pytest.raises(ValueError, match="budget"):
        inverse_cost_shares(np.ones(3), 0.0)


@pytest.mark.parametrize("seed", range(5))
def test_round_bandwidth_is_optimal(seed: int) -> None:
    """In a round, the closed-form shares beat any other feasible shares (random perturbations)."""
    inst = sample_instance(DEFAULT, n_users=8, seed=seed)
    k = np.where(np.arange(8) % 3 == 0, 0, inst.splits[-1])
    best, bd = evaluate(inst, Decision(k))
    assert bd.bandwidth.sum() == pytest.approx(1.0)
    assert np.all(bd.bandwidth[k == 0] == 0)
    rng = np.random.default_rng(seed)
    for _ in range(20):
        b = np.where(k > 0, bd.bandwidth * rng.uniform(0.7, 1.3, size=8), 0.0)
        b /= b.sum()
        assert evaluate(inst, Decision(k, b))[0] <= best + 1e-12
    assert allocate_bandwidth(inst.bw_cost, k > 0) == pytest.approx(bd.bandwidth)
