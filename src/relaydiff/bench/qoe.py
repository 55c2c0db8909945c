"""``relaydiff bench qoe``: G-DDPG against DDPG on the QoE round, checked on water-filling first.

What it measures (one JSON object; plots in ``out``):

- ``waterfill``: each actor trained on GDMOPT's power-allocation task, its mean sum rate over
  fixed evaluation draws as a ratio to the water-filling optimum (and the equal split's);
- ``algorithms``: per algorithm, the mean total QoE of a round (sum of the surrogate agents'
  1-10 scores) over ``eval_rounds`` fixed rounds, averaged over seeds (``qoe_mean``; ``qoe_std``
  the spread over seeds), and ``decide_ms`` (median of single decisions, 1 thread). Our DDPG and
  G-DDPG (same skeleton, only the actor differs), Stable-Baselines3's DDPG, TD3 and SAC as library
  references (same env and step budget, their default hyperparameters), and the heuristics;
- ``gddpg_vs_ddpg``: G-DDPG's relative QoE gain over our DDPG, the mean over seeds of the paired
  (same seed, same evaluation rounds) ratios minus 1, with a bootstrap 95% CI over seeds;
- ``sharing``: the trained G-DDPG policies with sharing against the same policies with the shared
  steps forced to 0, on the same rounds: edge U-Net evaluations saved, relative QoE loss (negative:
  sharing raised QoE) and energy saved (edge + devices). By default the env decides each group's
  shared steps exactly for the policy's shares (:meth:`QoEEnv.best_shared_steps`, at most the
  service's cap, ``share_retention``) and the actors
  set bandwidth and compute only; with ``learned_shared_steps`` the actors set the steps too, and
  ``exact_shared_steps`` adds the same policies' shares with the steps chosen exactly
  (:func:`exact_sharing`), which separates the policy's step choice from what the curves allow.
  The heuristics run under the same decoding, and once more with no sharing (``*_no_sharing``).
  ``sharing.service_rule``: the same policies' shares with every group sharing its cap, the
  service's own rule (``serve/rounds.py``; ``QoEEnv(shared_steps_rule="cap")``), against the same
  no-sharing rounds: the exact choice maximizes the agents' QoE and ignores the edge's energy;
- ``bound``: on the same rounds, the best allocation found knowing each round whole
  (:meth:`QoEEnv.best_allocation`, numerical, per round): an upper bound on what any actor could
  reach, so ``max_gain_over_ddpg`` is the most any actor, G-DDPG's included, could gain over our
  DDPG here, and ``over_equal`` how far the optimum lies from equal shares (paired per round,
  bootstrap CI over rounds).

Every training run is seeded; evaluation rounds are the same for every algorithm. The trained
DDPG and G-DDPG actors are saved under ``out/policies/`` (safetensors + JSON, ``Policy.from_pretrained``).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from relaydiff.engine.profile import hardware_info
from relaydiff.sched.rl.ddpg import evaluate, Policy, RLConfig, train
from relaydiff.sched.rl.gddpg import train_gddpg
from relaydiff.sim.qoe_env import check_shared_steps_rule, HEURISTICS, K_MAX, K_MIN, QoEEnv
from relaydiff.sim.waterfill_env import WaterFillingEnv
from relaydiff.system.grouping import load_sharing_cost, SHARE_RETENTION

EVAL_SEED = 10_000  # evaluation rounds are env.reset(seed=EVAL_SEED + j), for every algorithm
SB3_REFERENCES = ("sb3_ddpg", "sb3_td3", "sb3_sac")
CURVE_KEYS = ("unet_evals_saved", "action_saturation")  # recorded at each point of the training curves


@dataclass(frozen=True)
class QoEBenchConfig:
    """Defaults sized to finish in under 30 minutes on ONE core of this host (measured: the note of
    issue 15): 5 seeds, minibatch 64 (DDPG's, Lillicrap et al. 2016), curves every 250 rounds."""

    seeds: int = 5
    steps: int = 2000  # environment steps per RL training run (QoE): the curves flatten by then
    waterfill_steps: int = 3000
    eval_rounds: int = 64
    eval_every: int = 250
    k_min: int = K_MIN  # users a round: the env's range
    k_max: int = K_MAX
    scenario: str = "congested"
    sb3: bool = True  # train the Stable-Baselines3 references (one run each, seed 0)
    workers: int = 1  # training processes (each 1 torch thread); 2 on a free 2-core machine halves the time
    batch_size: int = 64
    learned_shared_steps: bool = False  # the actors set each group's shared steps (the first attempt's decoding)
    # a group shares at most the steps that keep its least similar follower at this share of its
    # prompt fidelity on the measured curves (the service's rule); None: up to T (before 2026-12-03)
    share_retention: float | None = SHARE_RETENTION
    sharing_table: str | None = None  # a quality.json whose shared-prefix curves the env reads (None: the shipped one)
    # how the edge picks each group's shared steps for the actors' shares (QoEEnv.shared_steps_rule):
    # "exact" (QoE-optimal for the shares) or "cap" (the service's rule: every group shares its cap)
    shared_steps_rule: str = "exact"
    bound: bool = True  # compute the per-round best allocation on the evaluation rounds (about 30 s)
    action_penalty: float = RLConfig.action_penalty  # the actors' pre-squash penalty (0: the plain -Q1 loss)
    # water-filling's optimum lies on the action box's edge (channels at zero power), where the
    # saturation penalty would pull it away (G-DDPG 0.995 -> 0.976 of the optimum): that task trains
    # with the plain loss; QoE's optimum lies inside the box, where the penalty does not act
    waterfill_action_penalty: float = 0.0
    out: str = "out/bench_qoe"
    resume: bool = False  # reuse the runs a cut-short bench left in out/runs (same settings only)

    def __post_init__(self) -> None:
        if self.seeds < 2:
            raise ValueError("seeds must be >= 2 (the CI is over seeds)")
        if min(self.steps, self.waterfill_steps, self.eval_rounds, self.eval_every, self.workers) < 1:
            raise ValueError("steps, waterfill_steps, eval_rounds, eval_every and workers must be >= 1")
        if not 1 <= self.k_min <= self.k_max:
            raise ValueError(f"need 1 <= k_min <= k_max, got {self.k_min}, {self.k_max}")
        check_shared_steps_rule(self.shared_steps_rule, self.learned_shared_steps)  # before any training starts
        for name in ("action_penalty", "waterfill_action_penalty"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def rl_config(cfg: QoEBenchConfig, seed: int, steps: int) -> RLConfig:
    return RLConfig(seed=seed, total_steps=steps, learning_starts=min(500, steps // 5), batch_size=cfg.batch_size,
                    eval_every=cfg.eval_every, eval_episodes=min(cfg.eval_rounds, 32), action_penalty=cfg.action_penalty)


def _env_factory(cfg: QoEBenchConfig, **kw: Any) -> Callable[[int], QoEEnv]:
    cost = load_sharing_cost(cfg.sharing_table) if cfg.sharing_table else None
    kw = {"shared_steps_rule": cfg.shared_steps_rule, **kw}
    return lambda seed: QoEEnv(k_min=cfg.k_min, k_max=cfg.k_max, scenario=cfg.scenario, sharing_cost=cost,
                               learned_shared_steps=cfg.learned_shared_steps, share_retention=cfg.share_retention, **kw)


def decide_ms(fn: Callable[[np.ndarray], np.ndarray], observations: list[np.ndarray], repeats: int = 3) -> float:
    """Median milliseconds of one decision (after one warm-up pass)."""
    for o in observations[:8]:
        fn(o)
    times = []
    for _ in range(repeats):
        for o in observations:
            t0 = time.perf_counter()
            fn(o)
            times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _rollout(policy_fn: Callable[[np.ndarray], np.ndarray], env: QoEEnv, rounds: int) -> dict[str, Any]:
    """Per-round summaries on the fixed evaluation rounds, plus (similarity, shared steps) pairs."""
    rows, pairs = [], []
    for j in range(rounds):
        obs, _ = env.reset(seed=EVAL_SEED + j)
        action = policy_fn(obs)
        _, _, _, _, info = env.step(action)
        rows.append(info)  # action_saturation: the share of the used entries at |a| > 0.99
        g = env.round.groups
        _, _, shared = env.decode_action(action)
        for gi in range(g.n_groups):
            m = [i for i in g.members(gi) if i != g.leader[gi]]
            if m:
                pairs.append((float(np.mean(g.similarity[m])), int(shared[gi])))
    keys = rows[0].keys()
    return {"per_round": {k: [float(r[k]) for r in rows] for k in keys}, "pairs": pairs}


def exact_sharing(policy_fn: Callable[[np.ndarray], np.ndarray], env: QoEEnv) -> Callable[[np.ndarray], np.ndarray]:
    """The policy's bandwidth and compute shares, each group's shared steps from
    :meth:`QoEEnv.best_shared_steps` (exact given those shares) instead of the policy's."""

    def decide(obs: np.ndarray) -> np.ndarray:
        action = policy_fn(obs)
        bandwidth, compute, _ = env.decode_action(action)
        return env.shared_steps_action(action, env.best_shared_steps(bandwidth, compute))

    return decide


def _train_one(args: tuple[str, QoEBenchConfig, int]) -> dict[str, Any]:
    """One training run (a worker process): returns its curve, evaluations and timing."""
    name, cfg, seed = args
    torch.set_num_threads(1)
    if name.startswith("waterfill_"):
        kind = name.removeprefix("waterfill_")
        fn = train if kind == "ddpg" else train_gddpg
        c0 = time.process_time()
        rl = replace(rl_config(cfg, seed, cfg.waterfill_steps), eval_episodes=cfg.eval_rounds,
                     action_penalty=cfg.waterfill_action_penalty)
        res = fn(lambda s: WaterFillingEnv(seed=0), rl,
                 info_keys=("ratio_to_optimum",), eval_seed=EVAL_SEED)
        return {"name": name, "seed": seed, "ratio": res.curve[-1]["ratio_to_optimum"], "wall_s": res.wall_s,
                "cpu_s": time.process_time() - c0}
    make = _env_factory(cfg)
    env, env_off = make(0), _env_factory(cfg, allow_sharing=False)(0)
    obs_pool = [env.reset(seed=EVAL_SEED + j)[0] for j in range(min(cfg.eval_rounds, 32))]
    if name in ("ddpg", "gddpg"):
        fn = train if name == "ddpg" else train_gddpg
        c0 = time.process_time()
        res = fn(make, rl_config(cfg, seed, cfg.steps), info_keys=CURVE_KEYS, eval_seed=EVAL_SEED)
        policy: Policy = res.policy
        policy.reseed(EVAL_SEED)
        out = {"curve": res.curve, "wall_s": res.wall_s, "cpu_s": time.process_time() - c0, "eval": _rollout(policy.decide, env, cfg.eval_rounds)}
        if name == "gddpg":
            policy.reseed(EVAL_SEED)
            out["eval_no_sharing"] = _rollout(policy.decide, env_off, cfg.eval_rounds)
            if cfg.learned_shared_steps:
                policy.reseed(EVAL_SEED)
                out["eval_exact_sharing"] = _rollout(exact_sharing(policy.decide, env), env, cfg.eval_rounds)
            elif cfg.shared_steps_rule != "cap":  # the same shares under the service's rule
                policy.reseed(EVAL_SEED)
                out["eval_service_rule"] = _rollout(policy.decide, _env_factory(cfg, shared_steps_rule="cap")(0),
                                                    cfg.eval_rounds)
        out["decide_ms"] = decide_ms(policy.decide, obs_pool)
        out["policy"] = str(policy.save_pretrained(Path(cfg.out) / "policies" / f"{name}_seed{seed}"))
        return {"name": name, "seed": seed, **out}
    # Stable-Baselines3 references: the library's defaults (learning rates, networks, tau, SAC's
    # entropy tuning) except what our two share, so that the step budget buys the same: the
    # minibatch, the random warm-up and, for DDPG/TD3 (whose default is no noise at all), our
    # Gaussian exploration noise. The same evaluation rounds make its curve.
    # lazy: Stable-Baselines3 is slow to import; only the library references need it
    import stable_baselines3 as sb3
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.noise import NormalActionNoise

    rl = rl_config(cfg, seed, cfg.steps)
    algo = {"sb3_ddpg": sb3.DDPG, "sb3_td3": sb3.TD3, "sb3_sac": sb3.SAC}[name]
    kw: dict[str, Any] = {}
    if name != "sb3_sac":
        act_dim = int(np.prod(env.action_space.shape))
        kw["action_noise"] = NormalActionNoise(np.zeros(act_dim), np.full(act_dim, rl.exploration_noise))
    t0, c0 = time.perf_counter(), time.process_time()
    model = algo("MlpPolicy", make(seed), seed=seed, verbose=0, device="cpu", learning_starts=rl.learning_starts,
                 batch_size=rl.batch_size, **kw)

    def fn_sb3(o: np.ndarray) -> np.ndarray:
        return model.predict(o, deterministic=True)[0]

    eval_env, curve = make(seed), []

    class Curve(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % rl.eval_every == 0:
                curve.append({"step": float(self.num_timesteps),
                              **evaluate(fn_sb3, eval_env, rl.eval_episodes, EVAL_SEED, CURVE_KEYS)})
            return True

    curve.append({"step": 0.0, **evaluate(fn_sb3, eval_env, rl.eval_episodes, EVAL_SEED, CURVE_KEYS)})
    model.learn(total_timesteps=cfg.steps, callback=Curve())
    if curve[-1]["step"] != cfg.steps:
        curve.append({"step": float(cfg.steps), **evaluate(fn_sb3, eval_env, rl.eval_episodes, EVAL_SEED, CURVE_KEYS)})
    return {"name": name, "seed": seed, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "curve": curve, "eval": _rollout(fn_sb3, env, cfg.eval_rounds), "decide_ms": decide_ms(fn_sb3, obs_pool)}


def _run_settings(cfg: QoEBenchConfig) -> dict[str, Any]:
    """What a run's result depends on (not where it is written, how many workers, or resuming)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("out", "workers", "resume", "bound")}


def _load_run(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """A finished run's result if ``path`` holds one made with the same settings (else None)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.pop("settings", None) != settings:
        return None
    return data


def _bootstrap_ci(x: np.ndarray, rng: np.random.Generator, n: int = 10_000) -> list[float]:
    idx = rng.integers(0, len(x), size=(n, len(x)))
    means = x[idx].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def bench_qoe(cfg: QoEBenchConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run everything the module docstring lists; returns the JSON-ready report."""
    t0 = time.perf_counter()
    say = log or (lambda m: None)
    # the paired comparison first, so that a cut-short run's runs/ folder holds whole pairs
    jobs: list[tuple[str, QoEBenchConfig, int]] = [(n, cfg, s) for s in range(cfg.seeds) for n in ("gddpg", "ddpg")]
    if cfg.sb3:
        jobs += [(n, cfg, 0) for n in SB3_REFERENCES]
    jobs += [("waterfill_ddpg", cfg, 0), ("waterfill_gddpg", cfg, 0)]
    results: list[dict[str, Any]] = []
    runs_dir = Path(cfg.out) / "runs"  # each run's result as it finishes (a cut-short bench keeps them)
    runs_dir.mkdir(parents=True, exist_ok=True)
    settings = _run_settings(cfg)

    def run_file(name: str, seed: int) -> Path:
        return runs_dir / f"{name}_seed{seed}.json"

    def done(r: dict[str, Any]) -> None:
        results.append(r)
        run_file(r["name"], r["seed"]).write_text(json.dumps({**r, "settings": settings}) + "\n")
        say(f"{r['name']} seed {r['seed']} done ({r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s cpu)")

    if cfg.resume:
        for j in list(jobs):
            kept = _load_run(run_file(j[0], j[2]), settings)
            if kept is not None:
                results.append(kept)
                jobs.remove(j)
                say(f"{j[0]} seed {j[2]} reused from {run_file(j[0], j[2])}")
    if cfg.workers == 1:
        for j in jobs:
            done(_train_one(j))
    else:
        with ProcessPoolExecutor(max_workers=cfg.workers) as pool:
            for r in pool.map(_train_one, jobs):
                done(r)

    by = {(r["name"], r["seed"]): r for r in results}
    seeds = list(range(cfg.seeds))
    algorithms: dict[str, dict[str, float]] = {}
    for name in ("gddpg", "ddpg") + (SB3_REFERENCES if cfg.sb3 else ()):
        runs = [by[(name, s)] for s in (seeds if name in ("gddpg", "ddpg") else [0])]
        per_seed = np.array([np.mean(r["eval"]["per_round"]["qoe"]) for r in runs])
        algorithms[name] = {"qoe_mean": float(per_seed.mean()), "qoe_std": float(per_seed.std(ddof=1)) if len(runs) > 1 else 0.0,
                            "decide_ms": float(np.median([r["decide_ms"] for r in runs])), "seeds": len(runs),
                            "unet_evals_saved": float(np.mean([np.mean(r["eval"]["per_round"]["unet_evals_saved"]) for r in runs])),
                            "action_saturation": float(np.mean([np.mean(r["eval"]["per_round"]["action_saturation"]) for r in runs])),
                            "train_wall_s": float(np.mean([r["wall_s"] for r in runs])),
                            "train_cpu_s": float(np.mean([r["cpu_s"] for r in runs]))}
    envs = {"": _env_factory(cfg)(0)}
    per_round: dict[str, list[float]] = {}  # the heuristics' (and the bound's) totals, round by round
    if not cfg.learned_shared_steps:  # the heuristics share nothing there already
        envs["_no_sharing"] = _env_factory(cfg, allow_sharing=False)(0)
    for suffix, env in envs.items():
        obs_pool = [env.reset(seed=EVAL_SEED + j)[0] for j in range(min(cfg.eval_rounds, 32))]
        for h in HEURISTICS:
            def fn_h(o: np.ndarray, h: str = h, env: QoEEnv = env) -> np.ndarray:
                return env.heuristic_action(h)

            ev = _rollout(fn_h, env, cfg.eval_rounds)
            per_round[h + suffix] = ev["per_round"]["qoe"]
            env.reset(seed=EVAL_SEED)
            algorithms[h + suffix] = {"qoe_mean": float(np.mean(ev["per_round"]["qoe"])), "qoe_std": 0.0,
                                      "decide_ms": decide_ms(fn_h, obs_pool[:1] * 32), "seeds": 0,
                                      "unet_evals_saved": float(np.mean(ev["per_round"]["unet_evals_saved"]))}
    steps_ms = None
    if not cfg.learned_shared_steps:  # what the env's exact step choice adds to a decision
        env = envs[""]
        times = []
        for j in range(min(cfg.eval_rounds, 32)):
            env.reset(seed=EVAL_SEED + j)
            bw, cp, _ = env.decode_action(env.heuristic_action("equal"))
            times.append(decide_ms(lambda o: env.best_shared_steps(bw, cp), [None] * 3))
        steps_ms = float(np.median(times))

    g = np.array([np.mean(by[("gddpg", s)]["eval"]["per_round"]["qoe"]) for s in seeds])
    d = np.array([np.mean(by[("ddpg", s)]["eval"]["per_round"]["qoe"]) for s in seeds])
    ratios = g / d - 1.0
    rng = np.random.default_rng(0)
    with_s = [by[("gddpg", s)]["eval"]["per_round"] for s in seeds]
    without = [by[("gddpg", s)]["eval_no_sharing"]["per_round"] for s in seeds]
    q_with, q_without = np.mean([np.mean(r["qoe"]) for r in with_s]), np.mean([np.mean(r["qoe"]) for r in without])
    e_with, e_without = np.mean([np.mean(r["energy_j"]) for r in with_s]), np.mean([np.mean(r["energy_j"]) for r in without])
    report: dict[str, Any] = {
        "seeds": cfg.seeds,
        "hardware": hardware_info(),
        "config": asdict(cfg),
        "algorithms": algorithms,
        "gddpg_vs_ddpg": {"gain": float(ratios.mean()), "ci95": _bootstrap_ci(ratios, rng),
                          "per_seed": [float(x) for x in ratios]},
        "waterfill": {"ddpg": by[("waterfill_ddpg", 0)]["ratio"], "gddpg": by[("waterfill_gddpg", 0)]["ratio"],
                      "equal": _equal_split_ratio(cfg.eval_rounds)},
        "sharing": {"decoding": "learned" if cfg.learned_shared_steps else "exact",
                    "unet_evals_saved": float(np.mean([np.mean(r["unet_evals_saved"]) for r in with_s])),
                    "qoe_loss": float(1.0 - q_with / q_without), "energy_saved": float(1.0 - e_with / e_without),
                    "qoe_with": float(q_with), "qoe_without": float(q_without),
                    "exact_steps_ms": steps_ms},  # median ms of best_shared_steps (exact decoding; None: learned)
    }
    if "eval_service_rule" in by[("gddpg", 0)]:  # the same shares, every group at its cap
        rule = [by[("gddpg", s)]["eval_service_rule"]["per_round"] for s in seeds]
        q_rule, e_rule = np.mean([np.mean(r["qoe"]) for r in rule]), np.mean([np.mean(r["energy_j"]) for r in rule])
        report["sharing"]["service_rule"] = {
            "unet_evals_saved": float(np.mean([np.mean(r["unet_evals_saved"]) for r in rule])),
            "qoe_loss": float(1.0 - q_rule / q_without), "energy_saved": float(1.0 - e_rule / e_without),
            "qoe": float(q_rule), "qoe_vs_exact": float(q_rule / q_with - 1.0)}
    if cfg.learned_shared_steps:  # the same shares, each group's s chosen exactly (best_shared_steps)
        exact = [by[("gddpg", s)]["eval_exact_sharing"]["per_round"] for s in seeds]
        q_exact, e_exact = np.mean([np.mean(r["qoe"]) for r in exact]), np.mean([np.mean(r["energy_j"]) for r in exact])
        report["sharing"]["exact_shared_steps"] = {
            "unet_evals_saved": float(np.mean([np.mean(r["unet_evals_saved"]) for r in exact])),
            "qoe_loss": float(1.0 - q_exact / q_without), "energy_saved": float(1.0 - e_exact / e_without),
            "qoe": float(q_exact)}
    report["targets"] = {
        "waterfill_gddpg>=0.98": report["waterfill"]["gddpg"] >= 0.98,
        "gddpg_gain>=0.15_ci_above_0": report["gddpg_vs_ddpg"]["gain"] >= 0.15 and report["gddpg_vs_ddpg"]["ci95"][0] > 0,
        "sharing_saves>=0.30_at_qoe_loss<=0.01": report["sharing"]["unet_evals_saved"] >= 0.30 and report["sharing"]["qoe_loss"] <= 0.01,
        "gddpg_decide_ms<2": algorithms["gddpg"]["decide_ms"] < 2.0,
    }
    for key in ("exact_shared_steps", "service_rule"):
        if key in report["sharing"]:
            ex = report["sharing"][key]
            report["targets"][f"{key}_sharing_saves>=0.30_at_qoe_loss<=0.01"] = ex["unet_evals_saved"] >= 0.30 and ex["qoe_loss"] <= 0.01
    if cfg.bound and not cfg.learned_shared_steps:
        say("the bound: the best allocation of each evaluation round")
        report["bound"] = allocation_bound(envs[""], cfg.eval_rounds, d.mean())
        per_round["bound"] = report["bound"].pop("per_round")
        algorithms["bound"] = {"qoe_mean": report["bound"]["qoe_mean"], "qoe_std": 0.0, "decide_ms": report["bound"]["decide_ms"],
                               "seeds": 0, "unet_evals_saved": report["bound"]["unet_evals_saved"]}
    report["policies"] = sorted(by[(n, s)]["policy"] for n in ("gddpg", "ddpg") for s in seeds)
    curve_rounds = min(cfg.eval_rounds, 32)  # the training curves' evaluation rounds (rl_config's eval_episodes)
    report["plots"] = _plots(cfg, by, seeds, {h: float(np.mean(per_round[h][:curve_rounds]))
                                              for h in HEURISTICS + ("bound",) if h in per_round})
    report["timing"] = {  # where the wall time went (cpu_s < wall_s: the core was shared)
        part: {"wall_s": float(sum(r["wall_s"] for r in results if r["name"].startswith(part))),
               "cpu_s": float(sum(r["cpu_s"] for r in results if r["name"].startswith(part)))}
        for part in ("waterfill_", "ddpg", "gddpg", "sb3_")}
    report["hardware"]["load_average_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    report["wall_s"] = time.perf_counter() - t0
    return report


def allocation_bound(env: QoEEnv, rounds: int, ddpg_qoe: float | None = None) -> dict[str, Any]:
    """The best allocation of each evaluation round (:meth:`QoEEnv.best_allocation`) against equal
    shares, paired per round: how much any actor could gain here at all."""
    best, equal, saved, seconds = [], [], [], []
    for j in range(rounds):
        env.reset(seed=EVAL_SEED + j)
        equal.append(env.step(env.heuristic_action("equal"))[1])
        t0 = time.perf_counter()
        b = env.best_allocation()
        seconds.append(time.perf_counter() - t0)
        best.append(b["qoe"])
        saved.append(env.step(b["action"])[4]["unet_evals_saved"])
    best_a, equal_a = np.array(best), np.array(equal)
    idx = np.random.default_rng(0).integers(0, rounds, size=(10_000, rounds))
    boot = best_a[idx].mean(1) / equal_a[idx].mean(1) - 1.0
    out: dict[str, Any] = {
        "qoe_mean": float(best_a.mean()), "unet_evals_saved": float(np.mean(saved)), "per_round": best,
        "over_equal": {"gain": float(best_a.mean() / equal_a.mean() - 1.0),
                       "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
                       "per_round_max": float(np.max(best_a / equal_a - 1.0))},
        "decide_ms": 1e3 * float(np.median(seconds))}
    if ddpg_qoe is not None:
        out["max_gain_over_ddpg"] = float(best_a.mean() / ddpg_qoe - 1.0)
    return out


def _equal_split_ratio(rounds: int) -> float:
    env = WaterFillingEnv(seed=0)
    ratios = []
    for j in range(rounds):
        env.reset(seed=EVAL_SEED + j)
        ratios.append(env.step(-np.ones(env.n_channels, np.float32))[4]["ratio_to_optimum"])
    return float(np.mean(ratios))


def _plots(cfg: QoEBenchConfig, by: dict, seeds: list[int], heuristics: dict[str, float]) -> list[str]:
    """QoE vs training steps (mean and min-max band over seeds; the SB3 references' one seed; the
    heuristics and the bound as levels, on the curves' own rounds), the actors' saturation vs training steps, and the shared steps chosen
    vs the group's similarity."""
    # lazy: matplotlib is slow to import; only the plots need it
    import matplotlib

    matplotlib.use("Agg")
    # lazy: matplotlib is slow to import; only the plots need it
    import matplotlib.pyplot as plt

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, label in (("gddpg", "G-DDPG"), ("ddpg", "DDPG (ours)")):
        curves = [by[(name, s)]["curve"] for s in seeds]
        x = np.array([p["step"] for p in curves[0]])
        y = np.array([[p["return"] for p in c] for c in curves])
        ax.plot(x, y.mean(0), label=f"{label}, mean of {len(seeds)} seeds", lw=2)
        ax.fill_between(x, y.min(0), y.max(0), alpha=0.25)
    for name in SB3_REFERENCES:
        if (name, 0) in by:
            c = by[(name, 0)]["curve"]
            ax.plot([p["step"] for p in c], [p["return"] for p in c], lw=1, ls="--",
                    label=f"SB3 {name.removeprefix('sb3_').upper()}, seed 0")
    x_end = max(p["step"] for p in by[("gddpg", seeds[0])]["curve"])
    for i, (h, q) in enumerate(heuristics.items()):  # labels staggered along the line: the levels lie close
        ax.axhline(q, lw=0.8, ls=":", color="gray")
        ax.annotate(f"{h} {q:.1f}", (x_end * (0.05 + 0.2 * i), q), fontsize=7, color="gray", va="bottom")
    ax.set_xlabel("training steps (rounds)")
    ax.set_ylabel("total QoE of a round (sum of 1-10 scores)")
    ax.legend(fontsize=7)
    ax.set_title(f"QoE on {min(cfg.eval_rounds, 32)} fixed rounds vs training (band: min-max over seeds)", fontsize=9)
    fig.tight_layout()
    p1 = out / "qoe_vs_steps.png"
    fig.savefig(p1, dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))  # the saturation diagnosis (RLConfig.action_penalty)
    for name, label in (("gddpg", "G-DDPG"), ("ddpg", "DDPG (ours)")) + tuple((n, f"SB3 {n[4:].upper()}") for n in SB3_REFERENCES):
        runs = [by[(name, s)]["curve"] for s in (seeds if name in ("gddpg", "ddpg") else [0]) if (name, s) in by]
        if runs and "action_saturation" in runs[0][0]:
            y = np.array([[p["action_saturation"] for p in c] for c in runs])
            ax.plot([p["step"] for p in runs[0]], y.mean(0), label=label, lw=2 if len(runs) > 1 else 1,
                    ls="-" if len(runs) > 1 else "--")
    ax.set_xlabel("training steps (rounds)")
    ax.set_ylabel("share of used action entries at |a| > 0.99")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p3 = out / "action_saturation_vs_steps.png"
    fig.savefig(p3, dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    series = (("eval", "G-DDPG's choice", 0.0), ("eval_exact_sharing", "exact given G-DDPG's shares (drawn +0.3)", 0.3)) \
        if cfg.learned_shared_steps else (("eval", "exact given G-DDPG's shares (the env's decoding)", 0.0),)
    for key, label, dy in series:
        pairs = np.array([pr for s in seeds for pr in by[("gddpg", s)][key]["pairs"]] or [(np.nan, np.nan)])
        ax.scatter(pairs[:, 0], pairs[:, 1] + dy, s=8, alpha=0.5, label=label)
    ax.set_xlabel("group similarity (followers' mean cosine with the leader)")
    ax.set_ylabel("shared steps of the group (of 20)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p2 = out / "shared_steps_vs_similarity.png"
    fig.savefig(p2, dpi=100)
    plt.close(fig)
    return [str(p1), str(p2), str(p3)]


__all__ = ["QoEBenchConfig", "allocation_bound", "bench_qoe", "decide_ms", "exact_sharing", "rl_config"]
