"""The shared-prefix cost measured on the QoE env's own groups (``python -m relaydiff.bench.qoe_pairs``).

The family's shared-prefix curves (``shared_prefix`` in ``quality.json``, ``relaydiff bench
quality``) were first measured only on that bench's pairs (a leader and four variants of its scene,
about ten followers a similarity bin), and overrated the env's groups, which also join prompts of
other scenes at cosine 0.75-0.9. Since 2026-12-03 the bench also measures followers of rounds drawn
as the env draws them, from a pool of another seed; this is the check on the env's own rounds and
pool (out of that sample), and identical prompts (users who drew the same pool prompt) apart. It
runs what those groups would get: the bench's fixed evaluation rounds (``env.reset(seed=EVAL_SEED + j)``),
each group of two or more on the engine with s shared steps for every s of a grid
(:func:`relaydiff.engine.runner.generate_shared_prefix`, the leader's prompt and seed for the
prefix, as ``relaydiff qoe live`` runs them; at the guidance the curves were measured at), every
follower's image read by the judge against its own prompt's scene. ``--table`` reads the curves
from another quality.json (a re-measured one, before it is installed). The report gives, per similarity bin (followers with the leader's own prompt
apart), the followers' mean fidelity at each s with its standard error, the measured retention
(mean F(s) / mean F(0)), what the family's curves predict for the same followers, and the
followers' fidelity at their group's cap (:func:`relaydiff.system.grouping.shared_steps_caps`);
``by_topic`` the same apart for followers of the leader's topic and of another topic (scene).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from relaydiff.bench.qoe import EVAL_SEED
from relaydiff.bench.qoe_live import curves_guidance
from relaydiff.bench.qoe_pool import pool_scenes
from relaydiff.engine.family import load_family
from relaydiff.engine.plan import Plan, Request
from relaydiff.engine.profile import hardware_info
from relaydiff.engine.runner import generate_shared_prefix
from relaydiff.quality.judge import load_judge
from relaydiff.quality.metrics import prompt_fidelity
from relaydiff.sim.qoe_env import QoEEnv
from relaydiff.system.grouping import SHARE_RETENTION, load_sharing_cost, shared_steps_caps

SIMILARITY_BINS = (0.75, 0.80, 0.85, 0.90, 1.0 + 1e-9)  # the env groups at cosine >= 0.75


@dataclass(frozen=True)
class PairsConfig:
    family: str = "reference"
    rounds: int = 16  # evaluation rounds whose groups run (EVAL_SEED + 0 .. rounds - 1)
    shared: tuple[int, ...] = (0, 2, 4, 6, 8, 10, 12, 16, 20)  # s grid (of the scenario's T)
    guidance: float | None = None  # None: the guidance the curves were measured at (as qoe live)
    table: str | None = None  # the quality.json whose shared-prefix curves predict (None: the shipped one)
    scenario: str = "congested"
    max_batch: int = 16
    out: str = "out/qoe_pairs.json"

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if not self.shared or self.shared[0] != 0 or list(self.shared) != sorted(set(self.shared)):
            raise ValueError(f"shared must be increasing and start at 0, got {self.shared}")


def measure_pairs(cfg: PairsConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the groups (see the module docstring); returns the JSON-ready report and writes ``out``."""
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    env = QoEEnv(scenario=cfg.scenario, sharing_cost=load_sharing_cost(cfg.table) if cfg.table else None)
    guidance = curves_guidance(cfg.guidance, env.sharing_cost)
    steps = env.steps
    if cfg.shared[-1] > steps:
        raise ValueError(f"shared steps {cfg.shared} run past the scenario's {steps} steps")
    family, judge, scenes = load_family(cfg.family), load_judge(), pool_scenes()
    cost = env.sharing_cost
    topic = dict(zip(env.pool.prompts, env.pool.topics.tolist()))
    rows = []  # one per follower: similarity, same prompt, same topic, its group's cap, fidelity per s
    for j in range(cfg.rounds):
        env.reset(seed=EVAL_SEED + j)
        r = env.round
        g = r.groups
        caps = shared_steps_caps(g, cost, steps, SHARE_RETENTION, r.same_prompt)
        for gi in range(g.n_groups):
            members = [int(i) for i in g.members(gi) if r.owner[i] == i]  # a prompt runs once per group
            if len(members) < 2:
                continue
            lead = members.index(int(g.leader[gi]))
            reqs = [Request(prompt=r.prompts[i], steps=steps, guidance=guidance, seed=j * 1000 + i) for i in members]
            plans = [Plan.single("large", steps)] * len(members)
            fid = np.empty((len(cfg.shared), len(members)))
            for si, s in enumerate(cfg.shared):
                res = generate_shared_prefix(family, reqs, plans, s, leader=lead, max_batch=cfg.max_batch)
                images = np.stack([x.image for x in res.results])
                fid[si] = prompt_fidelity(images, [scenes[r.prompts[i]] for i in members], judge).per_image
            for m, i in enumerate(members):
                if m != lead:
                    rows.append({"round": j, "user": i, "similarity": float(g.similarity[i]),
                                 "same_prompt": bool(r.same_prompt[i]), "cap": int(caps[gi]),
                                 "same_topic": topic[r.prompts[i]] == topic[r.prompts[members[lead]]],
                                 "fidelity": [float(x) for x in fid[:, m]]})
        say(f"round {j}: {sum(g.sizes() >= 2)} groups, {len(rows)} followers so far")
    report = {"config": asdict(cfg), "guidance": guidance, "hardware": hardware_info(), "steps": steps, "retention_rule": SHARE_RETENTION,
              "curves": cost.source, "followers": len(rows), "bins": summarize(rows, cfg.shared, cost),
              "by_topic": by_topic(rows, cfg.shared, cost),
              "at_cap": at_cap(rows, cfg.shared), "rows": rows, "wall_s": time.perf_counter() - t0}
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


def _stats(f: np.ndarray) -> dict[str, Any]:
    """Mean fidelity per s, its standard error, the paired change from s = 0 and the retention."""
    n = f.shape[0]
    d = f - f[:, :1]
    se = (lambda x: (x.std(axis=0, ddof=1) / np.sqrt(n)) if n > 1 else np.full(x.shape[1], np.nan))
    return {"n": int(n), "fidelity": f.mean(0).tolist(), "fidelity_se": se(f).tolist(),
            "change_from_0": d.mean(0).tolist(), "change_se": se(d).tolist(),
            "retention": (f.mean(0) / max(f[:, 0].mean(), 1e-12)).tolist()}


def summarize(rows: list[dict[str, Any]], shared: tuple[int, ...], cost) -> list[dict[str, Any]]:
    """Per similarity bin (``SIMILARITY_BINS``; identical prompts their own row): the measured
    curve beside the family's curves' prediction for the same followers."""
    out = []
    groups = [("same prompt as the leader", [r for r in rows if r["same_prompt"]])]
    for lo, hi in zip(SIMILARITY_BINS[:-1], SIMILARITY_BINS[1:]):
        groups.append((f"[{lo:.2f}, {min(hi, 1.0):.2f}{']' if hi > 1 else ')'}",
                       [r for r in rows if not r["same_prompt"] and lo <= r["similarity"] < hi]))
    for name, rs in groups:
        if not rs:
            continue
        f = np.array([r["fidelity"] for r in rs])
        sims = np.array([r["similarity"] for r in rs])
        predicted = cost.retain(sims[:, None], np.asarray(shared, dtype=float)[None, :] * cost.steps / shared[-1])
        out.append({"bin": name, "similarity_mean": float(sims.mean()), **_stats(f),
                    "retention_curves": predicted.mean(0).tolist()})
    return out


def by_topic(rows: list[dict[str, Any]], shared: tuple[int, ...], cost) -> dict[str, Any]:
    """Followers of another prompt than the leader's, apart by whether it is of the leader's topic
    (a paraphrase or an attribute variant of its scene) or of another topic (another scene): the
    measured curve, the curves' prediction for the same followers, and the fidelity at the cap.
    MiniLM similarity does not tell the two apart at 0.75-0.9; the curves are means over both."""
    out = {}
    for name, same in (("same_topic", True), ("other_topic", False)):
        rs = [r for r in rows if not r["same_prompt"] and r["same_topic"] == same]
        if not rs:
            continue
        sims = np.array([r["similarity"] for r in rs])
        predicted = cost.retain(sims[:, None], np.asarray(shared, dtype=float)[None, :] * cost.steps / shared[-1])
        out[name] = {**_stats(np.array([r["fidelity"] for r in rs])), "retention_curves": predicted.mean(0).tolist(),
                     "at_cap": at_cap(rs, shared)}
    return out


def at_cap(rows: list[dict[str, Any]], shared: tuple[int, ...]) -> dict[str, Any]:
    """Followers of a different prompt than the leader's: fidelity at their group's cap and at s = T
    against s = 0 (paired), where the cap is on the grid."""
    rs = [r for r in rows if not r["same_prompt"] and r["cap"] in shared]
    if not rs:
        return {"n": 0}
    f0 = np.array([r["fidelity"][0] for r in rs])
    fc = np.array([r["fidelity"][shared.index(r["cap"])] for r in rs])
    ft = np.array([r["fidelity"][-1] for r in rs])

    def paired(a: np.ndarray) -> dict[str, float]:
        d = a - f0
        return {"fidelity": float(a.mean()), "change": float(d.mean()),
                "change_se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan"),
                "retention": float(a.mean() / max(f0.mean(), 1e-12))}

    return {"n": len(rs), "caps": sorted({r["cap"] for r in rs}), "fidelity_at_0": float(f0.mean()),
            "at_cap": paired(fc), "at_T": paired(ft)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m relaydiff.bench.qoe_pairs", description=__doc__.splitlines()[0])
    ap.add_argument("--family", default=PairsConfig.family)
    ap.add_argument("--rounds", type=int, default=PairsConfig.rounds)
    ap.add_argument("--out", default=PairsConfig.out)
    ap.add_argument("--table", default=None, help="quality.json whose shared-prefix curves predict (default: the shipped one)")
    a = ap.parse_args(argv)
    try:
        report = measure_pairs(PairsConfig(family=a.family, rounds=a.rounds, out=a.out, table=a.table))
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    for b in report["bins"]:
        print(f"{b['bin']:28s} n={b['n']:3d} retention measured "
              + " ".join(f"{x:.2f}" for x in b["retention"]) + " | curves " + " ".join(f"{x:.2f}" for x in b["retention_curves"]))
    print(f"at the cap: {report['at_cap']}; {report['wall_s']:.0f} s; {report['config']['out']}")


if __name__ == "__main__":
    main()
