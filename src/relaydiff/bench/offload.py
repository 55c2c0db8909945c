"""``relaydiff bench offload``: optimality and speed of the one-round solvers, as one JSON object.

- ``optimality``: for N in {5, 10, 20, 30}, seeded rounds of the scenario, every solver's
  objective divided by the exact MILP optimum (``ratio_mean``, ``ratio_min``) and its decision
  time (``ms_median``). Where HiGHS stops at its time limit without proving optimality, the
  reference is the best objective any solver found on that round (and ``exact_proven`` says how
  many rounds were proven); the exact solver's own ratio then shows the shortfall.
- ``scaling``: for N in {100, 1000}, every scalable solver's ``ms_median`` and its objective
  relative to greedy (``vs_greedy_mean``, ``vs_greedy_min``).
- ``families``: perturbation families (:data:`relaydiff.sim.families.FAMILIES`: edge compute share,
  edge memory, pooled edges, slow edge, quality tables, channel, weights, device mix, steps) at
  several N, each reported apart and marked ``in_training`` when the shipped policy's training mix
  contains it (the others are held out).
Every part reports, beside the plain ratio, the share of the possible gain a solver captured,
``gain = (objective - all_local) / (optimum - all_local)`` (mean and minimum): each user's utility
carries a constant, so objective / optimum is 0.4-0.7 even for all-local, and a ratio of 0.97 can
hide a third of the possible improvement lost. Rounds where no gain is possible are left out of the
gain (``no_gain_rounds`` counts them).
``ms_median`` is the solver's own decision wall time; ``cpu_ms_median`` the process CPU time of the
whole call (including the final ``evaluate``), which a busy shared machine inflates far less (a
preempted call's wall time can be several times its CPU time).
Objectives are sums of user utilities, positive by construction (:mod:`relaydiff.system.problem`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np

from relaydiff.engine.profile import hardware_info
from relaydiff.sched.drl.policy import load_policy, solve_drl
from relaydiff.sched.registry import SolverFn, get_solver
from relaydiff.sim.families import get_families
from relaydiff.system.problem import RoundInstance, objective_value, sample_instance
from relaydiff.system.scenario import Scenario

OPT_SOLVERS = ("exact", "drl", "drl+ls", "greedy", "local_search", "random", "all_edge", "all_local")
SCALE_SOLVERS = ("drl", "drl+ls", "greedy", "local_search", "random", "all_edge", "all_local")


FAMILY_SOLVERS = ("exact", "drl", "drl+ls", "greedy", "local_search")


def _stats(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.min(values))


def gain_share(objective: float, optimum: float, all_local: float) -> float | None:
    """(objective - all_local) / (optimum - all_local): the share of the possible gain captured.

    None where no gain is possible (the optimum is all-local, to 1e-9 relative).
    """
    possible = optimum - all_local
    if possible <= 1e-9 * max(1.0, abs(optimum)):
        return None
    return (objective - all_local) / possible


def _quality_scores(sols: dict[str, list[Any]], names: Sequence[str], ref: list[float], local: list[float],
                    cpu: dict[str, list[float]]) -> tuple[dict[str, dict[str, Any]], int]:
    """Per solver: ratio and gain (mean, min) against ``ref``, decision times; and the no-gain round count."""
    out: dict[str, dict[str, Any]] = {}
    no_gain = sum(gain_share(ref[r], ref[r], local[r]) is None for r in range(len(ref)))
    for name in names:
        ratios = [s.objective / ref[r] for r, s in enumerate(sols[name])]
        gains = [g for r, s in enumerate(sols[name]) if (g := gain_share(s.objective, ref[r], local[r])) is not None]
        entry: dict[str, Any] = {"ratio_mean": float(np.mean(ratios)), "ratio_min": float(np.min(ratios)),
                                 "gain_mean": float(np.mean(gains)) if gains else None,
                                 "gain_min": float(np.min(gains)) if gains else None,
                                 "rounds_below_0.98": int(sum(x < 0.98 for x in ratios)),
                                 "ms_median": 1e3 * float(np.median([s.wall_s for s in sols[name]]))}
        if name in cpu:
            entry["cpu_ms_median"] = 1e3 * float(np.median(cpu[name]))
        out[name] = entry
    return out, no_gain


def _all_local_objective(inst: RoundInstance) -> float:
    return objective_value(inst, np.zeros(inst.n_users, dtype=np.int64))


def _solver(name: str, policy: str | Path | None) -> SolverFn:
    """The registry's solver, except that ``drl`` and ``drl+ls`` run ``policy`` when one is given (a candidate)."""
    if policy is None or name not in ("drl", "drl+ls"):
        return get_solver(name)
    return lambda inst: solve_drl(inst, policy, improve=name == "drl+ls")


def training_mix(policy: str | Path | None = None) -> set[str]:
    """Family names the policy was trained on, from its own metadata (its ``families``, else its scenarios,
    which are the families of the same name)."""
    config = load_policy(policy).meta.get("config", {})
    return {s.strip() for s in str(config.get("families") or config.get("scenario", "")).split(",") if s.strip()}


def run_families(families: Sequence[str], sizes: Sequence[int], rounds: int, seed: int = 0,
                 solvers: Sequence[str] = FAMILY_SOLVERS, exact_max_n: int = 30,
                 on_progress: Callable[[str], None] | None = None, policy: str | Path | None = None) -> list[dict[str, Any]]:
    """Every solver on the same seeded rounds of each family and N; the reference is the exact optimum
    where proven, else the best objective any solver found (``exact_proven`` counts the proofs). The
    MILP runs only up to ``exact_max_n`` users; above, the reference is the best found (``reference``)."""
    mix = training_mix(policy)
    out: list[dict[str, Any]] = []
    for fi, fam in enumerate(get_families(families)):
        fname = fam.name
        sc = fam.scenario()
        row: dict[str, Any] = {"family": fname, "about": fam.about, "in_training": fname in mix, "by_n": []}
        pooled: dict[str, list[tuple[float, float | None]]] = {s: [] for s in solvers}
        for n in sizes:
            rng = np.random.default_rng([seed, fi, n])
            here = [s for s in solvers if s != "exact" or n <= exact_max_n]
            sols: dict[str, list[Any]] = {s: [] for s in here}
            cpu: dict[str, list[float]] = {s: [] for s in here}
            local: list[float] = []
            for _ in range(rounds):
                inst = fam.sample(sc, n, rng)
                local.append(_all_local_objective(inst))
                for name in here:
                    sols[name].append(_call(_solver(name, policy), inst, cpu[name]))
                if on_progress:
                    on_progress(f"families {fname} N={n}")
            proven = [s.status == "optimal" for s in sols["exact"]] if "exact" in sols else [False] * rounds
            ref = [sols["exact"][r].objective if proven[r] else max(sols[s][r].objective for s in here) for r in range(rounds)]
            scores, no_gain = _quality_scores(sols, here, ref, local, cpu)
            row["by_n"].append({"n": n, "rounds": rounds, "reference": "exact" if all(proven) else "best_found",
                                "exact_proven": int(sum(proven)), "no_gain_rounds": no_gain, **scores})
            for name in here:
                pooled[name] += [(s.objective / ref[r], gain_share(s.objective, ref[r], local[r])) for r, s in enumerate(sols[name])]
        for name in solvers:
            if not pooled[name]:
                continue
            ratios = [r for r, _ in pooled[name]]
            gains = [g for _, g in pooled[name] if g is not None]
            row[name] = {"ratio_min": float(np.min(ratios)), "gain_mean": float(np.mean(gains)) if gains else None,
                         "gain_min": float(np.min(gains)) if gains else None,
                         "rounds_below_0.98": int(sum(x < 0.98 for x in ratios))}
        out.append(row)
    return out


def _call(solver: Callable[[Any], Any], inst: Any, cpu: list[float]) -> Any:
    """Run a solver, appending the process CPU time of the call (robust to a shared, busy machine)."""
    t0 = time.process_time()
    sol = solver(inst)
    cpu.append(time.process_time() - t0)
    return sol


def _run_rounds(sc: Scenario, n: int, rounds: int, solvers: Sequence[str], seed: int, what: str,
                on_progress: Callable[[str], None] | None, policy: str | Path | None = None) -> tuple[dict[str, list[Any]], dict[str, list[float]], list[RoundInstance]]:
    """Every solver on the same ``rounds`` instances of ``n`` users (drawn from ``seed`` and ``n``)."""

    rng = np.random.default_rng([seed, n])
    sols: dict[str, list[Any]] = {s: [] for s in solvers}
    cpu: dict[str, list[float]] = {s: [] for s in solvers}
    insts: list[RoundInstance] = []
    for _ in range(rounds):
        inst = sample_instance(sc, n_users=n, seed=rng)
        insts.append(inst)
        for name in solvers:
            sols[name].append(_call(_solver(name, policy), inst, cpu[name]))
            if on_progress:
                on_progress(f"{what} N={n} {name}")
    return sols, cpu, insts


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
    families: Sequence[str] = (),
    family_sizes: tuple[int, ...] = (7, 20, 200),
    family_rounds: int = 5,
    policy: str | Path | None = None,
) -> dict[str, Any]:
    """The bench: same seeded rounds for every solver (``policy``: a candidate DRL policy instead of the shipped one)."""
    if opt_rounds < 1 or scale_rounds < 1:
        raise ValueError("opt_rounds and scale_rounds must be >= 1")
    sc = scenario
    for name in set(opt_solvers) | set(scale_solvers):
        get_solver(name)
    t_start = time.perf_counter()
    # warm-up: policy load, lazy imports, first-call allocations are not decision time
    warm = sample_instance(sc, n_users=8, seed=12345)
    for name in set(opt_solvers) | set(scale_solvers):
        _solver(name, policy)(warm)

    optimality: list[dict[str, Any]] = []
    for n in opt_sizes:
        sols, cpu, insts = _run_rounds(sc, n, opt_rounds, opt_solvers, seed, "optimality", on_progress, policy)
        proven = [s.status == "optimal" for s in sols["exact"]] if "exact" in sols else [False] * opt_rounds
        ref = [max(sols[name][r].objective for name in opt_solvers) if not proven[r] else sols["exact"][r].objective
               for r in range(opt_rounds)]
        local = [_all_local_objective(inst) for inst in insts]
        scores, no_gain = _quality_scores(sols, opt_solvers, ref, local, cpu)
        optimality.append({"n": n, "rounds": opt_rounds, "exact_proven": int(sum(proven)), "no_gain_rounds": no_gain, **scores})

    scaling: list[dict[str, Any]] = []
    for n in scale_sizes:
        sols, cpu, _ = _run_rounds(sc, n, scale_rounds, scale_solvers, seed, "scaling", on_progress, policy)
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
    if families:
        out["families"] = run_families(families, family_sizes, family_rounds, seed, on_progress=on_progress, policy=policy)
        out["policy_training_mix"] = sorted(training_mix(policy))
        out["targets"] = {**_targets(optimality, scaling), **_family_targets(out["families"])}
    out.setdefault("targets", _targets(optimality, scaling))
    out["hardware"] = hardware_info()
    out["wall_s"] = time.perf_counter() - t_start
    out["notes"] = ("ratio = objective / exact optimum (best objective found where the MILP was not proven optimal); "
                    "gain = (objective - all_local) / (optimum - all_local), the share of the possible gain captured; "
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


def _family_targets(families: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 18's bar on the held-out families: DRL captures at least local search's gain, never < 0.98 x optimum."""
    held = [f for f in families if not f["in_training"]]
    t: dict[str, Any] = {"held_out_families": len(held)}
    for name in ("drl", "drl+ls"):
        rows = [f for f in held if name in f and "local_search" in f and f[name]["gain_mean"] is not None]
        if rows:
            t[f"{name}_held_out_gain_mean"] = float(np.mean([f[name]["gain_mean"] for f in rows]))
            t[f"{name}_held_out_ratio_min"] = min(f[name]["ratio_min"] for f in rows)
            t[f"{name}_held_out_rounds_below_0.98"] = sum(f[name]["rounds_below_0.98"] for f in rows)
            t[f"{name}_matches_local_search_gain"] = all(f[name]["gain_mean"] >= f["local_search"]["gain_mean"] - 1e-9 for f in rows)
    ls = [f["local_search"]["gain_mean"] for f in held if "local_search" in f and f["local_search"]["gain_mean"] is not None]
    if ls:
        t["local_search_held_out_gain_mean"] = float(np.mean(ls))
    return t


def plot_offload(result: dict[str, Any], plot_dir: str | Path) -> list[str]:
    """PNGs of a ``run`` result: the gain lost to the optimum per family and solver (held-out families
    marked), and lost gain against decision CPU time. Redraws from the JSON of record alone."""
    # lazy: matplotlib is slow to import; only the plots need it
    import matplotlib

    matplotlib.use("Agg")
    # lazy: matplotlib is slow to import; only the plots need it
    import matplotlib.pyplot as plt

    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    fams = result.get("families", [])
    names = [s for s in ("drl", "drl+ls", "greedy", "local_search") if fams and s in fams[0]]
    paths: list[str] = []

    def lost(entry: dict[str, Any]) -> float:  # 1 - gain, floored for the log scale (None: no gain possible)
        return max(1.0 - (entry["gain_mean"] if entry["gain_mean"] is not None else 1.0), 1e-6)

    def finish(fig: Any, ax: Any, title: str, name: str) -> None:
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot_dir / name)
        plt.close(fig)
        paths.append(str(plot_dir / name))

    if fams:
        fig, ax = plt.subplots(figsize=(9.0, 4.0), dpi=80)
        x = np.arange(len(fams))
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            ax.bar(x + (j - (len(names) - 1) / 2) * width, [lost(f[name]) for f in fams], width, label=name)
        ax.set_yscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels([f["family"] + ("" if f["in_training"] else " *") for f in fams], rotation=40, ha="right", fontsize=7)
        ax.set_ylabel("share of the possible gain lost (1 - gain), mean")
        finish(fig, ax, "gap to exact per family (* = held out of the policy's training); 1e-6 = none lost",
               "bench_offload_families.png")
    rows = [r for r in result.get("optimality", []) if "exact" in r]
    if rows:
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=80)
        for name in [s for s in ("exact", *names) if s in rows[0]]:
            t = [r[name].get("cpu_ms_median", r[name]["ms_median"]) for r in rows]
            gap = [lost(r[name]) for r in rows]
            ax.plot(t, gap, marker="o", label=name)
            for r, ti, li in zip(rows, t, gap):
                ax.annotate(f"N={r['n']}", (ti, li), fontsize=6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("decision CPU time per round, median (ms)")
        ax.set_ylabel("share of the possible gain lost, mean")
        finish(fig, ax, f"{result.get('scenario', '')}: lost gain vs time (1e-6 = none lost)", "bench_offload_time.png")
    return paths
