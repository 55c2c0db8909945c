"""The QoE actors' saturation over training, per fix variant (issue 15's second attempt).

``python -m relaydiff.bench.qoe_saturation --out docs/measurements/qoe_saturation.json`` trains our
DDPG and G-DDPG (bench qoe's settings: 2000 rounds, minibatch 64, curves every 250 rounds) under
each variant below, on a seed and evaluation rounds that the bench of record does not use (so that
picking a variant here does not select on the bench's draws), and records at each evaluation the
mean total QoE and the share of the used action entries at |a| > 0.99.

Variants: the action decoding (``learned``: the actor sets each group's shared steps; ``exact``:
the env picks them, :meth:`QoEEnv.best_shared_steps`) times the actor's action penalty
(:attr:`RLConfig.action_penalty`; 0 is the skeleton before the fix, exactly: the actor loss -Q1).
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
from relaydiff.sched.rl.ddpg import train
from relaydiff.sched.rl.gddpg import train_gddpg
from relaydiff.sim.qoe_env import QoEEnv

DIAG_SEED = 100  # training seed (the bench of record trains seeds 0..4)
DIAG_EVAL_SEED = 20_000  # evaluation rounds (the bench of record evaluates on 10_000 + j)
VARIANTS = (("learned", 0.0), ("exact", 0.0), ("exact", 0.1), ("exact", 1.0), ("learned", 0.1))


def saturation_run(algo: str, decoding: str, penalty: float, cfg: QoEBenchConfig, seed: int = DIAG_SEED,
                   eval_seed: int = DIAG_EVAL_SEED) -> dict[str, Any]:
    """One training run's curve: step, return (total QoE), action_saturation, unet_evals_saved."""
    torch.set_num_threads(1)
    rl = replace(rl_config(cfg, seed, cfg.steps), action_penalty=penalty)
    fn = train if algo == "ddpg" else train_gddpg
    c0 = time.process_time()
    res = fn(lambda s: QoEEnv(k_min=cfg.k_min, k_max=cfg.k_max, scenario=cfg.scenario,
                              learned_shared_steps=decoding == "learned"),
             rl, info_keys=("action_saturation", "unet_evals_saved"), eval_seed=eval_seed)
    return {"algo": algo, "decoding": decoding, "action_penalty": penalty, "seed": seed,
            "cpu_s": time.process_time() - c0, "curve": res.curve}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/qoe_saturation.json")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--variants", default=",".join(f"{d}:{p}" for d, p in VARIANTS),
                    help="comma-separated decoding:penalty pairs")
    args = ap.parse_args(argv)
    cfg = QoEBenchConfig(steps=args.steps)
    variants = [(v.split(":")[0], float(v.split(":")[1])) for v in args.variants.split(",")]
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.is_file() else {}
    runs = [r for r in old.get("runs", []) if (r["decoding"], r["action_penalty"]) not in variants
            or r["curve"][-1]["step"] != args.steps]
    for decoding, penalty in variants:
        for algo in ("ddpg", "gddpg"):
            r = saturation_run(algo, decoding, penalty, cfg)
            last = r["curve"][-1]
            print(f"{algo} {decoding} penalty={penalty}: QoE {last['return']:.2f} saturation "
                  f"{last['action_saturation']:.3f} saved {last['unet_evals_saved']:.3f} ({r['cpu_s']:.0f} s cpu)",
                  flush=True)
            runs.append(r)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"hardware": hardware_info(), "bench_config": asdict(cfg), "seed": DIAG_SEED,
                                       "eval_seed": DIAG_EVAL_SEED, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
