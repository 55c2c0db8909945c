"""The QoE actors' saturation over training, per fix variant (issue 15's second attempt).

``python -m relaydiff.bench.qoe_saturation --out docs/measurements/qoe_saturation.json`` trains our
DDPG and G-DDPG (bench qoe's settings: 2000 rounds, minibatch 64, curves every 250 rounds) under
each variant below, on a seed and evaluation rounds that the bench of record does not use (so that
picking a variant here does not select on the bench's draws), and records at each evaluation the
mean total QoE and the share of the used action entries at |a| > 0.99.

Variants: the action decoding (``learned``: the actor sets each group's shared steps; ``exact``:
the env picks them, :meth:`QoEEnv.best_shared_steps`; ``waterfill``: GDMOPT's power-allocation task
instead, bench qoe's 3000 steps, its ratio to the optimum) times the actor's action penalty
(:attr:`RLConfig.action_penalty`; 0 is the skeleton before the fix, exactly: the actor loss -Q1).
Runs record the penalty's form: ``hinge0.98`` (the skeleton's now: past |a| = 0.98, summed over the
entries), ``hinge`` (past |a| = 0.99 for tanh and at the clip for the diffusion actor, averaged over
the entries; f3333f9) or ``quadratic`` (mean u^2, the first try, 129e14d, which cost water-filling
its zero-power channels).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relaydiff.bench.qoe import QoEBenchConfig, rl_config
from relaydiff.engine.profile import hardware_info
from relaydiff.sched.rl.ddpg import evaluate, train
from relaydiff.sched.rl.gddpg import train_gddpg
from relaydiff.sim.qoe_env import QoEEnv
from relaydiff.sim.waterfill_env import WaterFillingEnv

DIAG_SEED = 100  # training seed (the bench of record trains seeds 0..4)
DIAG_EVAL_SEED = 20_000  # evaluation rounds (the bench of record evaluates on 10_000 + j)
VARIANTS = (("learned", 0.0), ("exact", 0.0), ("exact", 1.0), ("learned", 1.0), ("waterfill", 0.0), ("waterfill", 1.0))
PENALTY_FORM = "hinge0.98"  # what RLConfig.action_penalty weighs at this commit (hinge: at the squash's edge, mean over entries)


def saturation_run(algo: str, decoding: str, penalty: float, cfg: QoEBenchConfig, seed: int = DIAG_SEED,
                   eval_seed: int = DIAG_EVAL_SEED) -> dict[str, Any]:
    """One training run's curve: step, return (total QoE), action_saturation, unet_evals_saved."""
    torch.set_num_threads(1)
    fn = train if algo == "ddpg" else train_gddpg
    c0 = time.process_time()
    if decoding == "waterfill":
        rl = replace(rl_config(cfg, seed, cfg.waterfill_steps), action_penalty=penalty, eval_episodes=cfg.eval_rounds)
        res = fn(lambda s: WaterFillingEnv(seed=0), rl, info_keys=("ratio_to_optimum",), eval_seed=eval_seed)
    else:
        rl = replace(rl_config(cfg, seed, cfg.steps), action_penalty=penalty)
        res = fn(lambda s: QoEEnv(k_min=cfg.k_min, k_max=cfg.k_max, scenario=cfg.scenario,
                                  learned_shared_steps=decoding == "learned"),
                 rl, info_keys=("action_saturation", "unet_evals_saved"), eval_seed=eval_seed)
    return {"algo": algo, "decoding": decoding, "action_penalty": penalty, "penalty_form": PENALTY_FORM if penalty else "none",
            "seed": seed, "cpu_s": time.process_time() - c0, "curve": res.curve}


def plot(data: dict[str, Any], path: str | Path) -> Path:
    """Saturation (top) and total QoE (bottom) vs training steps, DDPG left and G-DDPG right, a line a variant."""
    # lazy: matplotlib is slow to import; only the plot needs it
    import matplotlib

    matplotlib.use("Agg")
    # lazy: matplotlib is slow to import; only the plot needs it
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    for col, (algo, title) in enumerate((("ddpg", "DDPG (ours)"), ("gddpg", "G-DDPG"))):
        for r in (r for r in data["runs"] if r["algo"] == algo and r["decoding"] != "waterfill"):
            x = [p["step"] for p in r["curve"]]
            form = f" {r.get('penalty_form', 'quadratic')}" if r["action_penalty"] else ""
            label = f"{r['decoding']} s, penalty {r['action_penalty']:g}{form}"
            ls = "-" if r["action_penalty"] else ":"
            axes[0, col].plot(x, [p["action_saturation"] for p in r["curve"]], ls=ls, label=label)
            axes[1, col].plot(x, [p["return"] for p in r["curve"]], ls=ls, label=label)
        for key, level in data.get("heuristics", {}).items():
            axes[1, col].axhline(level, lw=0.7, color="gray", ls="--")
            axes[1, col].annotate(key, (0, level), fontsize=7, color="gray", va="bottom")
        axes[0, col].set_title(title)
        axes[0, col].set_ylim(-0.02, 1.02)
        axes[1, col].set_xlabel("training steps (rounds)")
    axes[0, 0].set_ylabel("used action entries at |a| > 0.99")
    axes[1, 0].set_ylabel(f"total QoE, {data['bench_config']['eval_rounds'] // 2} fixed rounds")
    axes[0, 1].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def heuristic_levels(cfg: QoEBenchConfig, episodes: int = 32) -> dict[str, float]:
    """The heuristics' total QoE on the same evaluation rounds: equal shares with the exact shared
    steps (the default decoding) and with no sharing (what the learned decoding starts from)."""
    out = {}
    for label, kw in (("equal, exact s", {}), ("equal, no sharing", {"allow_sharing": False})):
        env = QoEEnv(k_min=cfg.k_min, k_max=cfg.k_max, scenario=cfg.scenario, **kw)
        out[label] = evaluate(lambda o, env=env: env.heuristic_action("equal"), env, episodes, DIAG_EVAL_SEED)["return"]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/qoe_saturation.json")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--variants", default=",".join(f"{d}:{p}" for d, p in VARIANTS),
                    help="comma-separated decoding:penalty pairs")
    ap.add_argument("--plot", default=None, help="redraw the plot from --out (no training) into this PNG")
    args = ap.parse_args(argv)
    cfg = QoEBenchConfig(steps=args.steps)
    if args.plot:
        data = json.loads(Path(args.out).read_text())
        for r in data["runs"]:
            r["penalty_form"] = r.get("penalty_form", "quadratic") if r["action_penalty"] else "none"
        data["heuristics"] = heuristic_levels(cfg)
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
        print(plot(data, args.plot))
        return
    variants = [(v.split(":")[0], float(v.split(":")[1])) for v in args.variants.split(",")]
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.is_file() else {}
    for r in old.get("runs", []):  # runs from before the form was recorded: the quadratic
        r["penalty_form"] = r.get("penalty_form", "quadratic") if r["action_penalty"] else "none"
    rerun = {(d, p, PENALTY_FORM if p else "none") for d, p in variants}
    runs = [r for r in old.get("runs", []) if (r["decoding"], r["action_penalty"], r["penalty_form"]) not in rerun]
    for decoding, penalty in variants:
        for algo in ("ddpg", "gddpg"):
            r = saturation_run(algo, decoding, penalty, cfg)
            last = r["curve"][-1]
            print(f"{algo} {decoding} penalty={penalty} ({PENALTY_FORM}): "
                  + " ".join(f"{k} {v:.3f}" for k, v in last.items() if k != "step") + f" ({r['cpu_s']:.0f} s cpu)",
                  flush=True)
            runs.append(r)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"hardware": hardware_info(), "bench_config": asdict(cfg), "seed": DIAG_SEED,
                                       "eval_seed": DIAG_EVAL_SEED, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
