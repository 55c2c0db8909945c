"""Choosing the live bandit's exploration alpha on the simulator, before the live run.

The live run (``relaydiff bandit live``, :mod:`relaydiff.serve.bandit_live`) warm-starts its policy on
a simulated stream and then serves a short live stream; what alpha does there is a question about
that protocol, not about the bench's long streams. So this study runs the live protocol's simulated
twin: for each tuning seed s, the streams ``relaydiff bandit live --seed s`` would serve
(:func:`relaydiff.serve.bandit_live.live_streams`: the live stream of ``requests`` at ``rate``, with
the edge measured on this machine, and its ``warm_requests``-request warm-start stream). For each
alpha the policy is trained on the warm stream and then serves the live stream, learning as it goes
(as live); every fixed arm and the oracle serve the same live stream (common random numbers, so
every comparison is paired per seed).

Reported per alpha: the mean reward over seeds, the margin over each fixed arm (paired per seed:
mean and 95% t-interval over seeds), the margin over each stream's best fixed arm, the ratio to the
oracle (mean and worst seed), and the warm start's own ratio to the oracle (a policy that locks in
on one arm during the warm start shows there).

Rule (fixed before the figures): the chosen alpha is the one with the highest mean margin over each
stream's best fixed arm (the live target: beat every fixed arm), over the tuning seeds only. The
live run's own seed (``live_seed``) is reported apart as its twin and takes no part in the choice.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from relaydiff.bench.bandit import run_policy
from relaydiff.sched.bandit import make_bandit
from relaydiff.serve.bandit_live import (LiveConfig, live_scenario, live_streams, measured_edge_profile, new_bandit,
                                         table_guidance, train_in_simulator)
from relaydiff.sim.relay_stream import CONTEXT_FEATURES


@dataclass
class AlphaStudyConfig:
    """What the study runs (echoed in its JSON). ``live`` is the live run's config (seed aside)."""

    alphas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
    seeds: tuple[int, ...] = tuple(range(101, 111))  # tuning seeds, disjoint from the live run's
    live_seed: int = 0  # the live run's seed: its twin is reported, not used for the choice
    live: LiveConfig = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.live is None:
            self.live = LiveConfig(requests=200, arrival_rate_hz=0.31)
        if not self.alphas or not self.seeds:
            raise ValueError("the study needs at least one alpha and one seed")
        if any(not (np.isfinite(a) and a >= 0) for a in self.alphas):
            raise ValueError(f"alphas: each must be a finite number >= 0, got {self.alphas}")
        if self.live_seed in self.seeds:
            raise ValueError(f"seeds: the live run's seed {self.live_seed} must not be a tuning seed")


def _seed_runs(cfg: AlphaStudyConfig, seed: int, edge_profile: str | Path | None) -> dict[str, Any]:
    """One seed's live twin: every fixed arm, the oracle and the warm-started policy at each alpha."""
    live = replace(cfg.live, seed=seed)
    scenario = live_scenario(live, edge_profile)
    streams = live_streams(live, scenario)
    st, warm = streams.stream, streams.warm
    names, d = st.arm_names, len(CONTEXT_FEATURES)
    oracle = run_policy(st, make_bandit("oracle", names, d, seed=seed)).result.rewards
    fixed = {name: float(run_policy(st, make_bandit("fixed", names, d, arm=a, seed=seed)).result.rewards.mean())
             for a, name in enumerate(names)}
    warm_oracle = (float(run_policy(warm, make_bandit("oracle", names, d, seed=seed)).result.rewards.mean())
                   if warm is not None else None)
    policies = {}
    for alpha in cfg.alphas:
        bandit = new_bandit(replace(live, alpha=alpha), st.arms)
        warm_mean = train_in_simulator(bandit, warm) if warm is not None else None
        res = run_policy(st, bandit).result
        policies[alpha] = {"reward_mean": float(res.rewards.mean()), "warm_reward_mean": warm_mean,
                           "arm_counts": np.bincount(res.arms, minlength=len(names)).tolist()}
    return {"seed": seed, "arms": list(names), "oracle": float(oracle.mean()), "warm_oracle": warm_oracle,
            "fixed": fixed, "policies": policies}


def _interval(values: np.ndarray) -> dict[str, Any]:
    """Mean and 95% t-interval over seeds (None with one seed)."""
    # lazy: scipy.stats is slow to import; only the intervals need it
    from scipy import stats

    mean = float(values.mean())
    if len(values) < 2:
        return {"mean": mean, "ci95": None}
    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return {"mean": mean, "ci95": [mean - half, mean + half]}


def _summarize(cfg: AlphaStudyConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per alpha over the seeds of ``runs``: reward, margins over the fixed arms, ratio to the oracle."""
    names = runs[0]["arms"]
    oracle = np.array([r["oracle"] for r in runs])
    fixed = {n: np.array([r["fixed"][n] for r in runs]) for n in names}
    best_fixed = np.max(np.stack(list(fixed.values())), axis=0)  # each stream's best fixed arm
    out: dict[str, Any] = {"oracle_reward_mean": float(oracle.mean()),
                           "fixed_reward_mean": {n: float(v.mean()) for n, v in fixed.items()}, "alphas": {}}
    for alpha in cfg.alphas:
        r = np.array([run["policies"][alpha]["reward_mean"] for run in runs])
        ratio = r / oracle
        margin = r - best_fixed
        warm = [run["policies"][alpha]["warm_reward_mean"] / run["warm_oracle"] for run in runs if run["warm_oracle"]]
        out["alphas"][str(alpha)] = {
            "reward_mean": float(r.mean()), "reward_sd": float(r.std(ddof=1)) if len(r) > 1 else None,
            "ratio_to_oracle_mean": float(ratio.mean()), "ratio_to_oracle_min": float(ratio.min()),
            "margin_over_best_fixed": {**_interval(margin), "per_seed": margin.round(4).tolist(),
                                       "seeds_above": int((margin > 0).sum())},
            "margin_over_fixed": {n: _interval(r - v) for n, v in fixed.items()},
            "beats_every_fixed_arm_on_mean": bool(all(r.mean() > v.mean() for v in fixed.values())),
            "warm_ratio_to_oracle_mean": float(np.mean(warm)) if warm else None,
            "arm_counts": np.sum([run["policies"][alpha]["arm_counts"] for run in runs], axis=0).tolist()}
    return out


def alpha_study(cfg: AlphaStudyConfig, edge_profile: str | Path | None = None,
                say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the study (see the module docstring); ``edge_profile`` None: the scenario's own edge."""
    t0 = time.perf_counter()
    tuning = []
    for seed in cfg.seeds:
        tuning.append(_seed_runs(cfg, seed, edge_profile))
        say(f"seed {seed}: oracle {tuning[-1]['oracle']:.4f}, best fixed {max(tuning[-1]['fixed'].values()):.4f}, "
            + ", ".join(f"alpha {a}: {p['reward_mean']:.4f}" for a, p in tuning[-1]["policies"].items()))
    summary = _summarize(cfg, tuning)
    margins = {a: s["margin_over_best_fixed"]["mean"] for a, s in summary["alphas"].items()}
    chosen = max(margins, key=margins.get)
    twin = _seed_runs(cfg, cfg.live_seed, edge_profile)
    return {"config": {**asdict(cfg), "live": asdict(cfg.live)}, "arms": tuning[0]["arms"],
            "rule": "the alpha with the highest mean margin over each tuning stream's best fixed arm "
                    "(fixed before the figures; the live seed's twin takes no part)",
            "chosen_alpha": float(chosen), "tuning": summary,
            "per_seed": [{**r, "policies": {str(a): p for a, p in r["policies"].items()}} for r in tuning],
            "live_twin": {**_summarize(cfg, [twin]), "seed": cfg.live_seed},
            "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m relaydiff.bench.bandit_alpha",
                                 description="Choose the live bandit's alpha on the live protocol's simulated twin.")
    ap.add_argument("--family", default="reference", help="family whose large member is measured as the edge")
    ap.add_argument("--alphas", default="0.05,0.1,0.2,0.3,0.5")
    ap.add_argument("--seeds", type=int, default=10, help="tuning seeds 101..100+N")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rate", type=float, default=0.31)
    ap.add_argument("--scenario", default="stationary")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args(argv)
    try:
        alphas = tuple(float(x) for x in a.alphas.split(",") if x.strip())
        if a.seeds < 1 or a.requests < 1 or not a.rate > 0:
            raise ValueError("--seeds and --requests must be >= 1, --rate > 0")
        cfg = AlphaStudyConfig(alphas=alphas, seeds=tuple(range(101, 101 + a.seeds)),
                               live=LiveConfig(family=a.family, requests=a.requests, arrival_rate_hz=a.rate,
                                               scenario=a.scenario))
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    # lazy: torch and the family only for measuring this machine as the edge
    import torch

    from relaydiff.engine.family import load_family
    from relaydiff.engine.profile import hardware
    from relaydiff.system.profiles import load_profile

    torch.set_num_threads(cfg.live.threads)
    family = load_family(cfg.live.family, trace=True)
    with tempfile.TemporaryDirectory() as tmp:
        prof = measured_edge_profile(family, "large", cfg.live.max_batch, table_guidance(cfg.live.scenario), Path(tmp), cfg.live.clock)
        edge = load_profile(prof).member("large")
        print(f"edge = this machine: large-member step {edge.at(1) * 1e3:.1f} ms at batch 1, "
              f"{edge.at(cfg.live.max_batch) * 1e3:.1f} ms at {cfg.live.max_batch}", flush=True)
        result = alpha_study(cfg, prof, say=lambda s: print(s, flush=True))
    result = {"hardware": hardware(), "edge_step_latency_s": dict(zip(map(str, edge.batch_sizes), edge.step_latency_s)),
              **result}
    text = json.dumps(result, indent=1)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    best = result["tuning"]["alphas"][str(result["chosen_alpha"])]
    print(json.dumps({"chosen_alpha": result["chosen_alpha"], "margin_over_best_fixed": best["margin_over_best_fixed"],
                      "ratio_to_oracle_mean": best["ratio_to_oracle_mean"]}, indent=1))


__all__ = ["AlphaStudyConfig", "alpha_study"]


if __name__ == "__main__":
    main()
