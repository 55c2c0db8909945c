"""Every solver of one round, by name: an explicit table (nothing registers itself at import).

A solver is a callable ``solver(instance) -> Solution`` (decision, objective, decision time);
environments and benches receive them as callables from :func:`get_solver`. A new solver is one
more entry in ``SOLVERS``; ``register_solver`` adds one at run time (tests, notebooks).
"""

from __future__ import annotations

from typing import Callable

from relaydiff.sched import baselines, exact
from relaydiff.sched.drl import policy as drl
from relaydiff.system.problem import RoundInstance, Solution

SolverFn = Callable[[RoundInstance], Solution]


def _drl(instance: RoundInstance) -> Solution:
    return drl.solve_drl(instance)


def _drl_ls(instance: RoundInstance) -> Solution:
    return drl.solve_drl(instance, improve=True)


SOLVERS: dict[str, SolverFn] = {
    "exact": exact.solve_exact,          # the MILP (HiGHS): the optimum, for N up to ~30
    "drl": _drl,                         # the shipped MaskablePPO policy (numpy) + closed-form bandwidth
    "drl+ls": _drl_ls,                   # the same, then the local-search improvement pass
    "greedy": baselines.greedy,
    "local_search": baselines.local_search,
    "random": baselines.random_policy,
    "all_edge": baselines.all_edge,
    "all_local": baselines.all_local,
}


def register_solver(name: str, fn: SolverFn) -> None:
    """Make ``fn(instance) -> Solution`` available as ``get_solver(name)`` in this process."""
    SOLVERS[name] = fn


def available_solvers() -> list[str]:
    return sorted(SOLVERS)


def get_solver(name: str) -> SolverFn:
    """The solver called ``name`` (ValueError listing the known names otherwise)."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; available: {', '.join(available_solvers())}")
    return SOLVERS[name]


def solve(name: str, instance: RoundInstance) -> Solution:
    """Run a solver by name."""
    return get_solver(name)(instance)
