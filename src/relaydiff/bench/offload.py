"""``relaydiff bench offload``: optimality and speed of the one-round solvers, as one JSON object.

- ``optimality``: for N in {5, 10, 20, 30}, seeded rounds of the scenario, every solver's
  objective divided by the exact MILP optimum (``ratio_mean``, ``ratio_min``) and its decision
  time (``ms_median``). Where HiGHS stops at its time limit without proving optimality, the
  reference is the best objective any solver found on that round (and ``exact_proven`` says how
  many rounds were proven); the exact solver's own ratio then shows the shortfall.
- ``scaling``: for N in {100, 1000}, every scalable solver's ``ms_median`` and its objective
  relative to greedy (``vs_greedy_mean``, ``vs_greedy_min``).
``ms_median`` is the solver's own decision wall time; ``cpu_ms_median`` the process CPU time of the
whole call (including the final ``evaluate``), which a busy shared machine inflates far less.
Objectives are sums of user utilities, positive by construction (:mod:`relaydiff.system.problem`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from relaydiff.engine.profile import hardware_info
from relaydiff.sched.registry import get_solver
from relaydiff.system.problem import sample_instance
from relaydiff.system.scenario import Scenario

OPT_SOLVERS = ("exact", "drl", "drl+ls", "greedy", "local_search", "random", "all_edge", "all_local")
SCALE_SOLVERS = ("drl", "drl+ls", "greedy", "local_search", "random", "all_edge", "all_local")


def _stats(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.min(values))


def _call(solver: Callable[[Any], Any], inst: Any, cpu: list[float]) -> Any:
    """Run a solver, appending the process CPU time of the call (robust to a shared, busy machine)."""
    t0 = time.process_time()
    sol = solver(inst)
    cpu.append(time.process_time() - t0)
    return sol


def _run_rounds(sc: Scenario, n: int, rounds: int, solvers: Sequence[str], seed: int, what: str,
                on_progress: Callable[[str], None] | None) -> tuple[dict[str, list[Any]], dict[str, list[float]]]:
    """Every solver on the same ``rounds`` instances of ``n`` users (drawn from ``seed`` and ``n``)."""

    rng = np.random.default_rng([seed, n])
    sols: dict[str, list[Any]] = {s: [] for s in solvers}
    cpu: dict[str, list[float]] = {s: [] for s in solvers}
    for _ in range(rounds):
        inst = sample_instance(sc, n_users=n, seed=rng)
        for name in solvers:
            sols[name].append(_call(get_solver(name), inst, cpu[name]))
            if on_progress:
                on_progress(f"{what} N={n} {name}")
    return sols, cpu


def run(
    scenario: Scenario,
    seed: int = 0,
    opt_sizes: tuple[int, ...] = (5, 10, 20, 30),
    opt_rounds: int = 10,
    scale_sizes: tuple[int, ...] = (100, 1000),
    scale_rounds: int = 5,
    opt_solvers: tuple[str, ...] = OPT_SOLVERS,
    scale_solvers: tuple[str, ...] = SCALE_SOLVERS,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The bench: same seeded rounds for every solver."""
    if opt_rounds < 1 or scale_rounds < 1:
        raise ValueError("opt_rounds and scale_rounds must be >= 1")
    sc = scenario
    for name in set(opt_solvers) | set(scale_solvers):
        get_solver(name)
    t_start = time.perf_counter()
    # warm-up: policy load, lazy imports, first-call allocations are not decision time
    warm = sample_instance(sc, n_users=8, seed=12345)
    for name in set(opt_solvers) | set(scale_solvers):
        get_solver(name)(warm)

    optimality: list[dict[str, Any]] = []
    for n in opt_sizes:
        sols, cpu = _run_rounds(sc, n, opt_rounds, opt_solvers, seed, "optimality", on_progress)
        proven = [s.status == "optimal" for s in sols["exact"]] if "exact" in sols else [False] * opt_rounds
        ref = [max(sols[name][r].objective for name in opt_solvers) if not proven[r] else sols["exact"][r].objective
               for r in range(opt_rounds)]
        row: dict[str, Any] = {"n": n, "rounds": opt_rounds, "exact_proven": int(sum(proven))}
        for name in opt_solvers:
            mean, low = _stats([s.objective / ref[r] for r, s in enumerate(sols[name])])
            row[name] = {"ratio_mean": mean, "ratio_min": low, "ms_median": 1e3 * float(np.median([s.wall_s for s in sols[name]])),
                         "cpu_ms_median": 1e3 * float(np.median(cpu[name]))}
        optimality.append(row)

    scaling: list[dict[str, Any]] = []
    for n in scale_sizes:
        sols, cpu = _run_rounds(sc, n, scale_rounds, scale_solvers, seed, "scaling", on_progress)
        row = {"n": n, "rounds": scale_rounds}
        greedy = [s.objective for s in sols["greedy"]] if "greedy" in sols else None
        for name in scale_solvers:
            entry = {"ms_median": 1e3 * float(np.median([s.wall_s for s in sols[name]])),
                     "cpu_ms_median": 1e3 * float(np.median(cpu[name]))}
            if greedy is not None:
                entry["vs_greedy_mean"], entry["vs_greedy_min"] = _stats([s.objective / g for s, g in zip(sols[name], greedy)])
            row[name] = entry
        scaling.append(row)

    out: dict[str, Any] = {"scenario": sc.name, "seed": seed, "optimality": optimality, "scaling": scaling}
    out["targets"] = _targets(optimality, scaling)
    out["hardware"] = hardware_info()
    out["wall_s"] = time.perf_counter() - t_start
    out["notes"] = ("ratio = objective / exact optimum (best objective found where the MILP was not proven optimal); "
                    "ms = decision wall time per round, median; drl = MaskablePPO policy in numpy + closed-form bandwidth; "
                    "drl+ls = the same followed by the local-search baseline's improvement pass")
    return out


def _targets(optimality: list[dict[str, Any]], scaling: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, checked on this run."""
    t: dict[str, Any] = {}
    for name in ("drl", "drl+ls"):
        rows = [r for r in optimality if name in r and r["n"] <= 30]
        if rows:
            t[f"{name}_ratio_mean_min_over_n"] = min(r[name]["ratio_mean"] for r in rows)
            t[f"{name}_ratio_ge_0.98"] = all(r[name]["ratio_mean"] >= 0.98 for r in rows)
        r30 = [r for r in optimality if r["n"] == 30 and name in r and "exact" in r]
        if r30:
            t[f"{name}_speedup_vs_exact_n30"] = r30[0]["exact"]["ms_median"] / max(r30[0][name]["ms_median"], 1e-9)
            t[f"{name}_cpu_speedup_vs_exact_n30"] = r30[0]["exact"]["cpu_ms_median"] / max(r30[0][name]["cpu_ms_median"], 1e-9)
        r1000 = [r for r in scaling if r["n"] == 1000 and name in r]
        if r1000:
            t[f"{name}_ms_n1000"] = r1000[0][name]["ms_median"]
            t[f"{name}_cpu_ms_n1000"] = r1000[0][name]["cpu_ms_median"]
            t[f"{name}_n1000_under_100ms"] = r1000[0][name]["ms_median"] < 100.0
    return t
