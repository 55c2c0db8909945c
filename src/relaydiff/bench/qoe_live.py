"""``relaydiff qoe live``: one QoE round decided by a trained policy and run on the real engine.

The round (users, prompts, traits, links, devices) is a seed of :class:`relaydiff.sim.qoe_env.QoEEnv`;
the policy (saved by ``bench qoe``, or any :meth:`relaydiff.sched.rl.ddpg.Policy.from_pretrained` folder) sets
bandwidth shares and compute shares, and the env each group's shared steps (exactly for those
shares, at most the service's cap ``share_retention``; or the policy, if it was trained to). Then, on this machine's engine,
each group's shared prefix runs once on the large member, conditioned on the leader's prompt, and
every member continues with its own prompt (:func:`relaydiff.engine.runner.generate_shared_prefix`);
a prompt runs once per group, and its other senders receive that image
(:func:`relaydiff.system.grouping.chain_owners`).
The judge reads each decoded image against the scene its prompt describes (real prompt fidelity),
latency and battery come from the system model (the edge here is not the profile's GPU), and the
agents (the surrogate, or an LLM endpoint when one is configured) score each user. The report
lists per group the prompts, similarities, shared steps, U-Net evaluations run and saved, each
user's fidelity (measured and as the simulator predicted it) and score, with the images.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from relaydiff.bench.qoe_pool import pool_scenes
from relaydiff.engine.family import load_family
from relaydiff.engine.plan import Plan, Request
from relaydiff.engine.profile import hardware_info
from relaydiff.engine.runner import generate_shared_prefix
from relaydiff.quality.judge import load_judge
from relaydiff.quality.metrics import prompt_fidelity
from relaydiff.sched.rl.ddpg import Policy
from relaydiff.sim.agents import Perception, SurrogateAgent
from relaydiff.sim.agents_llm import LLMAgent
from relaydiff.sim.qoe_env import QoEEnv
from relaydiff.system.grouping import load_sharing_cost, SHARE_RETENTION, SharingCost


@dataclass(frozen=True)
class LiveQoEConfig:
    policy: str
    family: str = "reference"
    seed: int = 0
    k_min: int = 5
    k_max: int = 20
    scenario: str = "congested"
    guidance: float | None = None  # None: the guidance the env's shared-prefix curves were measured at
    llm: bool = False  # score with LLMAgent (RELAYDIFF_LLM_* environment) instead of the surrogate
    max_batch: int = 16
    # the cap on a group's shared steps (the service's rule; None: the curves alone, up to T)
    share_retention: float | None = SHARE_RETENTION
    # how the edge picks each group's shared steps for the policy's shares: "exact" (the env's
    # default) or "cap" (the service's rule: every group at its cap); QoEEnv.shared_steps_rule
    shared_steps_rule: str = "exact"
    sharing_table: str | None = None  # a quality.json whose shared-prefix curves the env reads (None: the shipped one)
    out: str = "out/qoe_live"


def _png(image: np.ndarray, scale: int = 4) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST).save(buf, "PNG")
    return buf.getvalue()


def curves_guidance(guidance: float | None, cost: SharingCost) -> float:
    """The guidance to run live chains at: ``guidance``, or (None) the one the curves that predict
    them were measured at (their table's config), so that measured and predicted fidelity compare."""
    if guidance is not None:
        return float(guidance)
    if cost.guidance is None:
        raise ValueError(f"the shared-prefix curves ({cost.source}) do not say their guidance: pass one")
    return float(cost.guidance)


def run_qoe_live(cfg: LiveQoEConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the round; writes ``out``/report.json and one PNG strip per group; returns the report."""
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    policy = Policy.from_pretrained(cfg.policy, seed=cfg.seed)
    # a policy that sets the shared steps too (bench qoe --learned-shared-steps) has a third action block
    env = QoEEnv(k_min=cfg.k_min, k_max=cfg.k_max, scenario=cfg.scenario,
                 learned_shared_steps=policy.act_dim == 3 * cfg.k_max, share_retention=cfg.share_retention,
                 shared_steps_rule=cfg.shared_steps_rule,
                 sharing_cost=load_sharing_cost(cfg.sharing_table) if cfg.sharing_table else None)
    if policy.obs_dim != env.observation_space.shape[0] or policy.act_dim != env.action_space.shape[0]:
        raise ValueError(f"policy {cfg.policy} was trained for another round size (obs {policy.obs_dim}, action "
                         f"{policy.act_dim}; this round needs {env.observation_space.shape[0]}, {env.action_space.shape[0]}: "
                         "pass the --k-max it was trained with)")
    obs, _ = env.reset(seed=cfg.seed)
    action = policy.decide(obs)
    bandwidth, compute, shared = env.decode_action(action)
    predicted = env.outcome(bandwidth, compute, shared)
    rnd = env.round
    guidance = curves_guidance(cfg.guidance, env.sharing_cost)
    scenes = pool_scenes()
    family = load_family(cfg.family)
    judge = load_judge()
    steps = env.steps
    images: list[np.ndarray | None] = [None] * rnd.k
    evals_run = evals_alone = 0
    g = rnd.groups
    for j in range(g.n_groups):
        members = [int(i) for i in g.members(j)]
        runs = [i for i in members if rnd.owner[i] == i]  # a prompt runs once per group (chain_owners)
        reqs = [Request(prompt=rnd.prompts[i], steps=steps, guidance=guidance, seed=cfg.seed * 1000 + i) for i in runs]
        plans = [Plan.single("large", steps)] * len(runs)
        res = generate_shared_prefix(family, reqs, plans, int(shared[j]), leader=runs.index(int(g.leader[j])),
                                     max_batch=cfg.max_batch)
        evals_run += sum(res.unet_evals.values())
        # every user alone, copies too (each run's own chain, as many times as users receive it)
        evals_alone += sum(res.unet_evals_unshared.values()) * len(members) / len(runs)
        for i, r in zip(runs, res.results):
            images[i] = r.image
        for i in members:
            images[i] = images[int(rnd.owner[i])]
        say(f"group {j}: {len(members)} users, {len(runs)} prompts, {int(shared[j])} shared steps")
    fidelity = np.array([prompt_fidelity(images[i][None], [scenes[rnd.prompts[i]]], judge).fidelity for i in range(rnd.k)])
    seen = [Perception(rnd.prompts[i], float(fidelity[i]), float(predicted.latency_s[i]), float(predicted.battery_j[i]))
            for i in range(rnd.k)]
    reasons: list[str] = []
    if cfg.llm:
        agent = LLMAgent(images=True)
        scores = agent.score(rnd.traits, seen, [_png(images[i]) for i in range(rnd.k)])
        reasons, agent_info = agent.reasons, {"kind": "llm", "model": agent.model, **asdict(agent.stats)}
    else:
        scores = SurrogateAgent().score(rnd.traits, seen)
        agent_info = {"kind": "surrogate"}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    groups = []
    for j in range(g.n_groups):
        members = [int(i) for i in g.members(j)]
        strip = out / f"group{j}.png"
        strip.write_bytes(_png(np.concatenate([images[i] for i in members], axis=1)))
        groups.append({"leader": int(g.leader[j]), "shared_steps": int(shared[j]), "cap": int(rnd.caps[j]),
                       "image_strip": str(strip), "users": [
            {"user": i, "prompt": rnd.prompts[i], "similarity_to_leader": float(g.similarity[i]),
             "same_prompt_as_leader": bool(rnd.same_prompt[i]),
             "traits": [float(x) for x in rnd.traits[i]], "fidelity": float(fidelity[i]),
             "fidelity_predicted": float(predicted.fidelity[i]), "latency_s": float(predicted.latency_s[i]),
             "battery_j": float(predicted.battery_j[i]), "score": float(scores[i]),
             **({"reason": reasons[i]} if reasons else {})} for i in members]})
    report = {
        "config": asdict(cfg), "guidance": guidance, "hardware": hardware_info(), "agent": agent_info, "users": rnd.k,
        "qoe": float(np.sum(scores)), "qoe_predicted": float(predicted.scores.sum()),
        "unet_evals": evals_run, "unet_evals_unshared": evals_alone,
        "unet_evals_saved": 1.0 - evals_run / evals_alone if evals_alone else 0.0,
        "unet_evals_saved_predicted": predicted.summary()["unet_evals_saved"],
        "fidelity_mean": float(fidelity.mean()), "fidelity_predicted_mean": float(predicted.fidelity.mean()),
        "groups": groups, "wall_s": time.perf_counter() - t0,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


# each arm's settings: the env's exact steps within the service's cap, the same uncapped, and the
# service's own rule (every group at its cap)
RULES: dict[str, dict[str, Any]] = {"capped": {"share_retention": SHARE_RETENTION},
                                    "uncapped": {"share_retention": None},
                                    "service_rule": {"share_retention": SHARE_RETENTION, "shared_steps_rule": "cap"}}


def _round_row(report: dict[str, Any]) -> dict[str, Any]:
    """One live round in a line: QoE measured and predicted, U-Net evaluations saved, the shared
    steps of its groups, and the fidelity of the followers whose prompt is not their leader's."""
    others = [u for g in report["groups"] if len(g["users"]) > 1 for u in g["users"]
              if u["user"] != g["leader"] and not u["same_prompt_as_leader"]]
    return {"seed": report["config"]["seed"], "users": report["users"], "qoe": report["qoe"],
            "qoe_predicted": report["qoe_predicted"], "unet_evals_saved": report["unet_evals_saved"],
            "fidelity": report["fidelity_mean"], "fidelity_predicted": report["fidelity_predicted_mean"],
            "shared_steps": [g["shared_steps"] for g in report["groups"] if len(g["users"]) > 1],
            "other_prompt_followers": len(others),
            "other_followers_fidelity": float(np.mean([u["fidelity"] for u in others])) if others else None,
            "other_followers_fidelity_predicted": float(np.mean([u["fidelity_predicted"] for u in others])) if others else None}


def summarize_rounds(rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per arm the mean QoE measured and predicted, the gap (measured - predicted) and its SD over
    rounds, the U-Net evaluations saved; and the paired QoE per round of capped - uncapped and of
    the service's rule - capped."""
    out: dict[str, Any] = {}
    for arm, rs in rows.items():
        q, p = np.array([r["qoe"] for r in rs]), np.array([r["qoe_predicted"] for r in rs])
        out[arm] = {"rounds": len(rs), "qoe_mean": float(q.mean()), "qoe_predicted_mean": float(p.mean()),
                    "gap_mean": float((q - p).mean()), "gap_sd": float((q - p).std(ddof=1)) if len(q) > 1 else None,
                    "unet_evals_saved_mean": float(np.mean([r["unet_evals_saved"] for r in rs]))}
    if set(rows) >= {"capped", "uncapped"}:
        d = np.array([a["qoe"] - b["qoe"] for a, b in zip(rows["capped"], rows["uncapped"])])
        out["capped_minus_uncapped_qoe"] = {"mean": float(d.mean()), "sd": float(d.std(ddof=1)) if len(d) > 1 else None,
                                            "per_round": d.tolist()}
    if set(rows) >= {"capped", "service_rule"}:
        d = np.array([a["qoe"] - b["qoe"] for a, b in zip(rows["service_rule"], rows["capped"])])
        out["service_rule_minus_capped_qoe"] = {"mean": float(d.mean()), "sd": float(d.std(ddof=1)) if len(d) > 1 else None,
                                                "per_round": d.tolist()}
    return out


def live_rounds(policy: str, seeds: int = 5, family: str = "reference", out: str = "out/qoe_live_rounds",
                say: Callable[[str], None] = print, sharing_table: str | None = None) -> dict[str, Any]:
    """Rounds 0..seeds-1 of the policy, each run on the engine once per arm of :data:`RULES` (the same
    round, shares and noise); writes ``out``/rounds.json (each run's own report under
    ``out``/ARM/SEED) and returns it."""
    t0 = time.perf_counter()
    rows: dict[str, list[dict[str, Any]]] = {arm: [] for arm in RULES}
    for seed in range(seeds):
        for arm, settings in RULES.items():
            report = run_qoe_live(LiveQoEConfig(policy=policy, family=family, seed=seed, **settings,
                                                sharing_table=sharing_table, out=str(Path(out) / arm / str(seed))),
                                  say=lambda s: None)
            rows[arm].append(_round_row(report))
            say(json.dumps({"arm": arm, **rows[arm][-1]}))
    result = {"policy": policy, "family": family, "sharing_table": sharing_table, "rules": RULES, "hardware": hardware_info(), "rows": rows,
              "summary": summarize_rounds(rows), "wall_s": time.perf_counter() - t0}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "rounds.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m relaydiff.bench.qoe_live",
                                 description="Live QoE rounds of a policy: shared steps capped, uncapped and at the "
                                             "service's rule (paired).")
    ap.add_argument("--policy", default="out/bench_qoe/policies/gddpg_seed0")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--family", default="reference")
    ap.add_argument("--out", default="out/qoe_live_rounds")
    ap.add_argument("--table", default=None, help="quality.json whose shared-prefix curves the env reads (default: the shipped one)")
    a = ap.parse_args(argv)
    if a.seeds < 1:
        raise SystemExit("error: --seeds must be >= 1")
    try:
        result = live_rounds(a.policy, a.seeds, a.family, a.out, sharing_table=a.table)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps(result["summary"], indent=1))


__all__ = ["LiveQoEConfig", "curves_guidance", "live_rounds", "run_qoe_live", "summarize_rounds"]


if __name__ == "__main__":
    main()
