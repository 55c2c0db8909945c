"""Baselines: incremental move scores are exact, capacity holds, heuristics scale to N = 1000."""

from __future__ import annotations

import time

import numpy as np
import pytest

from relaydiff.sched.registry import available_solvers, get_solver, register_solver, solve
from relaydiff.system.moves import MoveState
from relaydiff.system.problem import Decision, evaluate, objective_value, sample_instance
from relaydiff.system.scenario import load_scenario, parse_scenario

DEFAULT = load_scenario("default")  # resolved once, as the CLI does

NAMES = ("all_local", "all_edge", "random", "greedy", "local_search")


@pytest.mark.parametrize("seed", range(5))
def test_move_deltas_are_exact(seed: int) -> None:
    inst = sample_instance(DEFAULT, n_users=15, seed=seed)
    rng = np.random.default_rng(seed)
    st = MoveState(inst, rng.integers(0, len(inst.options), size=15))
    for _ in range(60):
        d = st.deltas()
        i, b = int(rng.integers(15)), int(rng.integers(len(inst.options)))
        before = objective_value(inst, st.k)
        st.move(i, b)
        after = objective_value(inst, st.k)
        if np.isfinite(d[i, b]):
            assert after - before == pytest.approx(d[i, b], abs=1e-9)
        assert st.objective() == pytest.approx(after, abs=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_solutions_are_feasible_and_scored_by_evaluate(name: str) -> None:
    sc = parse_scenario({"edge": {"max_batch": 4}})
    inst = sample_instance(sc, n_users=12, seed=3)
    sol = solve(name, inst)
    assert sol.solver == name and sol.wall_s >= 0
    assert (sol.decision.k > 0).sum() <= 4
    assert set(sol.decision.k.tolist()) <= set(inst.options.tolist())
    assert sol.objective == pytest.approx(evaluate(inst, Decision(sol.decision.k))[0])


def test_heuristics_order() -> None:
    inst = sample_instance(DEFAULT, n_users=20, seed=11)
    obj = {n: solve(n, inst).objective for n in NAMES}
    assert obj["local_search"] >= obj["greedy"] - 1e-12
    assert obj["greedy"] > obj["all_local"]
    assert obj["all_local"] == pytest.approx(float(np.sum(inst.w_quality * inst.quality[:, 0])))


def test_random_is_deterministic() -> None:
    inst = sample_instance(DEFAULT, n_users=30, seed=1)
    assert np.array_equal(solve("random", inst).decision.k, solve("random", inst).decision.k)


def test_all_edge_uses_one_split() -> None:
    inst = sample_instance(DEFAULT, n_users=8, seed=2)
    k = solve("all_edge", inst).decision.k
    assert np.all(k == inst.splits[len(inst.splits) // 2])


@pytest.mark.parametrize("n", [100, 1000])
def test_greedy_and_local_search_scale(n: int) -> None:
    sc = parse_scenario({"edge": {"max_batch": 256}})
    inst = sample_instance(sc, n_users=n, seed=5)
    t0 = time.perf_counter()
    g = solve("greedy", inst)
    ls = solve("local_search", inst)
    assert time.perf_counter() - t0 < 20.0
    assert ls.objective >= g.objective - 1e-9
    assert 0 < (ls.decision.k > 0).sum() <= 256


def test_registry() -> None:
    assert set(NAMES) | {"exact"} <= set(available_solvers())
    with pytest.raises(ValueError, match="unknown solver 'nope'"):
        get_solver("nope")
    register_solver("test_local", get_solver("all_local"))
    assert "test_local" in available_solvers()


def test_swap_repair_re_admits_the_user_drl_left_local() -> None:
    """Issue 18: on a 10x-loaded edge DRL admitted the wrong user and single moves could not repair it."""
    from relaydiff.sched.baselines import local_search_options, swap_repair_options
    from relaydiff.sched.exact import solve_exact
    from relaydiff.sim.families import get_families
    from relaydiff.system.problem import objective_value

    (fam,) = get_families(["slow_edge_10x"])
    rng = np.random.default_rng([0, 3, 7])
    for _ in range(4):
        inst = fam.sample(fam.scenario(), 7, rng)
    start = np.array([0, 3, 0, 0, 0, 0, 0])  # what the policy shipped before the retraining chose here
    stuck, _ = local_search_options(inst, start=start)
    repaired, _ = swap_repair_options(inst, start=start)
    best = solve_exact(inst)
    assert objective_value(inst, inst.options[stuck]) < best.objective - 1e-3  # single moves stay stuck
    assert objective_value(inst, inst.options[repaired]) == pytest.approx(best.objective, rel=1e-9)


@pytest.mark.parametrize("family", ["default", "edge_memory_4", "slow_edge_10x", "steps_10"])
def test_swap_deltas_are_the_exact_joint_changes(family: str) -> None:
    """Every evict-and-move swap scored at once equals the two moves applied and the objective recomputed."""
    from relaydiff.sched.baselines import swap_deltas
    from relaydiff.sim.families import get_families
    from relaydiff.system.moves import MoveState

    (fam,) = get_families([family])
    rng = np.random.default_rng(5)
    inst = fam.sample(fam.scenario(), 9, rng)
    opt = rng.integers(0, len(inst.options), size=inst.n_users)
    opt[np.flatnonzero(opt > 0)[inst.max_batch :]] = 0  # a feasible start, full edge included
    st = MoveState(inst, opt)
    joint, base = swap_deltas(st), st.objective()
    for row, e in enumerate(np.flatnonzero(st.opt > 0)):
        for r in range(inst.n_users):
            for b in range(len(inst.options)):
                if r == e or b == st.opt[r]:
                    assert joint[row, r, b] == -np.inf
                    continue
                after = MoveState(inst, st.opt)
                after.move(int(e), 0)
                after.move(r, b)
                assert joint[row, r, b] == pytest.approx(after.objective() - base, abs=1e-10)


@pytest.mark.parametrize("family", ["default", "slow_edge_10x", "three_edges", "poor_channel"])
def test_swap_candidates_never_drop_an_improving_swap(family: str) -> None:
    """The pruning bound is safe: every user left out has no swap that gains, and the kept columns are exact."""
    from relaydiff.sched.baselines import _swap_candidates, local_search_options, swap_deltas
    from relaydiff.sim.families import get_families
    from relaydiff.system.moves import MoveState

    (fam,) = get_families([family])
    rng = np.random.default_rng(11)
    pruned = 0
    for n in (12, 80):
        inst = fam.sample(fam.scenario(), n, rng)
        starts = [rng.integers(0, len(inst.options), size=n) * (rng.random(n) < 0.3) for _ in range(3)]
        starts.append(local_search_options(inst)[0])  # where the repair runs: a local optimum
        for opt in starts:
            opt[np.flatnonzero(opt > 0)[inst.max_batch :]] = 0
            st = MoveState(inst, opt)
            if st.admitted == 0:
                continue
            d = st.deltas(capacity=False)
            full, users = swap_deltas(st, d), _swap_candidates(st, d, 1e-12)
            left_out = np.setdiff1d(np.arange(n), users)
            assert np.all(full[:, left_out, :] <= 1e-12)
            np.testing.assert_array_equal(swap_deltas(st, d, users), full[:, users, :])
            pruned += left_out.size
    assert pruned > 0  # the bound does prune
