"""Run solvers (by registry name) against a multi-round scenario and write CSV, JSON and PNG plots.

Every policy sees the same rounds (same seed; the dynamics do not depend on the actions), so the
per-round curves are directly comparable.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from relaydiff.sched.registry import get_solver
from relaydiff.sim.scenario_env import Dynamics, ScenarioEnv
from relaydiff.system.scenario import Scenario

COLUMNS = ("policy", "round", "n_users", "admitted", "rejected", "capacity", "objective", "utility_mean",
           "quality_mean", "latency_mean_s", "latency_max_s", "energy_mean_j", "decision_ms")
PLOTS = {"utility": "utility_mean", "latency": "latency_mean_s", "quality": "quality_mean"}


def run_policy(env: ScenarioEnv, name: str, seed: int, on_round: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """All rounds of the scenario decided by solver ``name``; one row per round."""
    solver = get_solver(name)
    env.reset(seed=seed)
    rows: list[dict[str, Any]] = []
    n_max = env.dynamics.n_max
    while True:
        inst = env.instance
        sol = solver(inst)
        action = np.zeros(n_max, dtype=np.int64)
        action[: inst.n_users] = inst.option_index(sol.decision.k)
        _, reward, terminated, _, info = env.step(action)
        s = info["summary"]
        rows.append({
            "policy": name, "round": info["round"], "n_users": inst.n_users, "admitted": s["admitted"],
            "rejected": info["rejected"], "capacity": inst.capacity, "objective": reward,
            "utility_mean": s["utility_mean"], "quality_mean": s["quality_mean"], "latency_mean_s": s["latency_mean_s"],
            "latency_max_s": s["latency_max_s"], "energy_mean_j": s["energy_mean_j"], "decision_ms": 1e3 * sol.wall_s,
        })
        if on_round is not None:
            on_round()
        if terminated:
            return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per policy: means over rounds of every numeric column."""
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == name]
        out[name] = {c: float(np.mean([r[c] for r in mine])) for c in COLUMNS[2:]}
        out[name]["rounds"] = len(mine)
    return out


def write_results(rows: list[dict[str, Any]], out_dir: Path, meta: dict[str, Any]) -> list[Path]:
    """rounds.csv, summary.json and one PNG per metric (per policy over rounds)."""
    import matplotlib  # lazy: slow to import, and only the plots need it

    matplotlib.use("Agg")
    # lazy: matplotlib is slow to import; only the plots need it
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "rounds.csv", out_dir / "summary.json"]
    with paths[0].open("w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=COLUMNS)
        wr.writeheader()
        wr.writerows(rows)
    paths[1].write_text(json.dumps({**meta, "policies": summarize(rows)}, indent=2))
    names = list(dict.fromkeys(r["policy"] for r in rows))
    for plot, col in PLOTS.items():
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for name in names:
            mine = [r for r in rows if r["policy"] == name]
            ax.plot([r["round"] for r in mine], [r[col] for r in mine], label=name, lw=1.4)
        ax.set_xlabel("round")
        ax.set_ylabel(col)
        ax.set_title(f"{meta.get('scenario', '')}: {plot} per round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{plot}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def simulate(
    scenario: Scenario,
    policies: list[str],
    out_dir: str | Path,
    dynamics: Dynamics | None = None,
    seed: int = 0,
    on_round: Callable[[], None] | None = None,
) -> tuple[dict[str, Any], list[Path]]:
    """Run every policy over the same rounds; returns the summary and the files written."""
    if not policies:
        raise ValueError("give at least one policy")
    for name in policies:
        get_solver(name)  # unknown names fail before any work
    env = ScenarioEnv(scenario, dynamics)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for name in policies:
        rows += run_policy(env, name, seed, on_round)
    meta = {"scenario": env.scenario.name, "seed": seed, "dynamics": env.dynamics.__dict__.copy(),
            "wall_s": time.perf_counter() - t0,
            "objective_note": "sum of user utilities u_i = wq Q + wl (1 - L/Lref) + we (1 - E/Eref) (relaydiff.system.problem)"}
    paths = write_results(rows, Path(out_dir), meta)
    return {**meta, "policies": summarize(rows)}, paths
