"""Where the QoE env's sharing saves, by follower kind, and whether a text similarity could tell scenes apart.

``python -m relaydiff.bench.qoe_split`` (numpy and MiniLM only, about a minute on one core):

- ``split``: on the bench's evaluation rounds (``env.reset(seed=EVAL_SEED + j)``), a heuristic's
  shares with the env's exact shared steps (capped by the service's rule, and uncapped), the U-Net
  evaluations each user saves, as a share of all the users' T steps, by kind: ``copy`` (a prompt
  another member of its group sent first: it receives that chain, all T steps saved;
  :func:`relaydiff.system.grouping.chain_owners`), and for the other followers by how their
  prompt relates to the leader's in the shipped pool: ``paraphrase`` (the same scene, described
  anew), ``attribute_variant`` (the leader's scene with one or two attributes changed) and
  ``other_scene`` (another topic). ``bounds``: the share of users who sent a prompt another user
  of the round sent (what copies can save at most), and who asked for a scene another user asked
  for (what a similarity that groups exactly the same scenes could save at most).
- ``oracle_scene``: the same with paraphrases of the leader's scene treated like copies (they do
  not bind the cap and keep their fidelity): what a similarity that separates scenes perfectly
  would add. It reads the pool's variant labels, which a service does not have.
- ``separability``: every pair of pool prompts at MiniLM cosine >= ``GROUP_THRESHOLD`` (the pairs
  the grouping can join), labelled same scene or not; per similarity (MiniLM cosine, and two
  token-level readings of MiniLM's token states, the U-Net's own context: BERTScore-style F1 and
  the 10% quantile of each token's best match), the AUC of same scene against the rest and against
  the attribute variants alone, and the precision at the thresholds that keep 90% and 50% of the
  same-scene pairs (over all pool pairs: other scenes outnumber them far more than in a round).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relaydiff.bench.qoe import EVAL_SEED
from relaydiff.engine.profile import hardware_info
from relaydiff.sim.qoe_env import PROMPT_POOL, QoEEnv
from relaydiff.system.grouping import GROUP_THRESHOLD, shared_steps_caps

KINDS = ("copy", "paraphrase", "attribute_variant", "other_scene")
SAME_SCENE = frozenset({"leader", "paraphrase"})  # the pool's variants that describe a topic's own scene


def pool_labels(path: Path = PROMPT_POOL) -> tuple[dict[str, int], dict[str, str]]:
    """Each shipped pool prompt's topic and variant (``relaydiff.bench.qoe_pool``)."""
    meta = json.loads(Path(path).read_text())
    return dict(zip(meta["prompts"], meta["topics"])), dict(zip(meta["prompts"], meta["variants"]))


def scene_key(prompt: str, topic: dict[str, int], variant: dict[str, str]) -> tuple[int, str]:
    """Prompts with one key ask for the same scene (a topic's leader and its paraphrase share one)."""
    v = variant[prompt]
    return topic[prompt], "scene" if v in SAME_SCENE else v


def follower_kind(prompt: str, leader: str, topic: dict[str, int], variant: dict[str, str]) -> str:
    """How a follower's prompt (not a copy) relates to its leader's: see the module docstring."""
    if topic[prompt] != topic[leader]:
        return "other_scene"
    return "paraphrase" if scene_key(prompt, topic, variant) == scene_key(leader, topic, variant) else "attribute_variant"


def split_savings(env: QoEEnv, rounds: int, heuristic: str = "equal", oracle_scene: bool = False) -> dict[str, Any]:
    """U-Net evaluations saved by kind on the evaluation rounds (see the module docstring)."""
    topic, variant = pool_labels()
    saved = dict.fromkeys(KINDS, 0.0)
    users = dict.fromkeys(KINDS, 0)
    total = chain_saved = qoe = 0.0
    dup = same_scene = 0
    for j in range(rounds):
        env.reset(seed=EVAL_SEED + j)
        r = env.round
        g = r.groups
        leader_of = g.leader[g.label]
        if oracle_scene:  # a paraphrase of the leader's scene neither binds nor loses fidelity
            scene = np.array([i != leader_of[i] and follower_kind(r.prompts[i], r.prompts[leader_of[i]], topic, variant)
                              == "paraphrase" for i in range(r.k)])
            r.same_prompt = r.same_prompt | scene
            if env.allow_sharing:
                r.caps = shared_steps_caps(g, env.sharing_cost, env.steps, env.share_retention, r.same_prompt)
        bw, cp, s = env.decode_action(env.heuristic_action(heuristic))
        out = env.outcome(bw, cp, s)
        qoe += float(out.scores.sum())
        total += r.k * env.steps
        chain_saved += out.unet_chain_steps_unshared - out.unet_chain_steps
        dup += r.k - len(set(r.prompts))
        same_scene += r.k - len({scene_key(p, topic, variant) for p in r.prompts})
        for i in range(r.k):
            if r.owner[i] != i:
                kind, steps = "copy", env.steps
            elif i == leader_of[i]:
                continue
            else:
                kind, steps = follower_kind(r.prompts[i], r.prompts[leader_of[i]], topic, variant), int(s[g.label[i]])
            users[kind] += 1
            saved[kind] += steps
    if abs(sum(saved.values()) - chain_saved) > 1e-6:
        raise AssertionError(f"per-user savings {sum(saved.values())} differ from the env's chain-steps {chain_saved}")
    return {"rounds": rounds, "heuristic": heuristic, "share_retention": env.share_retention, "oracle_scene": oracle_scene,
            "qoe_per_round": qoe / rounds, "unet_evals_saved": chain_saved / total,
            "by_kind": {k: {"users": users[k], "saved_share": saved[k] / total,
                            "steps_saved_mean": saved[k] / users[k] if users[k] else None} for k in KINDS},
            "bounds": {"copies": dup * env.steps / total, "same_scene": same_scene * env.steps / total}}


def _auc(score: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = score[positive], score[~positive]
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


@torch.no_grad()
def separability(threshold: float = GROUP_THRESHOLD) -> dict[str, Any]:
    """Same-scene pairs against the rest among the pool's pairs at MiniLM >= ``threshold``."""
    from relaydiff.quality.similarity import _model, prompt_embeddings  # lazy: loads MiniLM

    topic, variant = pool_labels()
    prompts = list(topic)  # the pool's prompts, in its order
    emb = prompt_embeddings(prompts)
    tokenizer, model = _model()
    tok = tokenizer(prompts, padding=True, return_tensors="pt")
    hidden = model(**tok).last_hidden_state
    states = [torch.nn.functional.normalize(hidden[i][tok.attention_mask[i].bool()][1:-1], dim=1).numpy()
              for i in range(len(prompts))]  # the token states without [CLS] and [SEP]
    pairs = [(i, j) for i, j in itertools.combinations(range(len(prompts)), 2) if emb[i] @ emb[j] >= threshold]
    same = np.array([scene_key(prompts[i], topic, variant) == scene_key(prompts[j], topic, variant) for i, j in pairs])
    kind = np.array(["same_scene" if s else ("attribute_variant" if topic[prompts[i]] == topic[prompts[j]] else "other_scene")
                     for s, (i, j) in zip(same, pairs)])

    def token(i: int, j: int) -> tuple[float, float]:
        m = states[i] @ states[j].T
        a, b = m.max(1), m.max(0)
        return 2 * a.mean() * b.mean() / (a.mean() + b.mean()), min(np.quantile(a, 0.1), np.quantile(b, 0.1))

    tok_scores = np.array([token(i, j) for i, j in pairs])
    scores = {"minilm_cosine": np.array([emb[i] @ emb[j] for i, j in pairs]),
              "token_f1": tok_scores[:, 0], "token_q10": tok_scores[:, 1]}
    out: dict[str, Any] = {"threshold": threshold, "pairs": len(pairs), "by_kind": {k: int((kind == k).sum()) for k in sorted(set(kind))},
                           "similarities": {}}
    for name, x in scores.items():
        hard = kind != "other_scene"  # the leader's topic only: its scene against its attribute variants
        row: dict[str, Any] = {"auc_same_scene": _auc(x, same), "auc_same_scene_vs_attribute_variant": _auc(x[hard], same[hard]),
                               "mean_by_kind": {k: float(x[kind == k].mean()) for k in sorted(set(kind))}}
        for keep in (0.9, 0.5):
            cut = float(np.quantile(x[same], 1.0 - keep))
            picked = x >= cut
            row[f"precision_keeping_{int(keep * 100)}pct"] = float((picked & same).sum() / max(picked.sum(), 1))
        out["similarities"][name] = row
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m relaydiff.bench.qoe_split", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=64)
    ap.add_argument("--heuristic", default="equal")
    ap.add_argument("--out", default="out/qoe_split.json")
    a = ap.parse_args(argv)
    if a.rounds < 1:
        raise SystemExit("error: --rounds must be >= 1")
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    try:
        report = {"hardware": hardware_info(),
                  "capped": split_savings(QoEEnv(), a.rounds, a.heuristic),
                  "uncapped": split_savings(QoEEnv(share_retention=None), a.rounds, a.heuristic),
                  "oracle_scene": split_savings(QoEEnv(), a.rounds, a.heuristic, oracle_scene=True),
                  "separability": separability()}
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    report["wall_s"] = time.perf_counter() - t0
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    for arm in ("capped", "uncapped", "oracle_scene"):
        r = report[arm]
        print(f"{arm}: {r['unet_evals_saved']:.3f} saved, QoE {r['qoe_per_round']:.2f}; "
              + ", ".join(f"{k} {v['saved_share']:.3f} ({v['users']})" for k, v in r["by_kind"].items()))
    for name, row in report["separability"]["similarities"].items():
        print(f"{name}: AUC {row['auc_same_scene']:.3f} (vs attribute variants {row['auc_same_scene_vs_attribute_variant']:.3f}), precision {row['precision_keeping_90pct']:.2f} / {row['precision_keeping_50pct']:.2f}")
    print(f"{report['wall_s']:.0f} s; {a.out}")


__all__ = ["KINDS", "follower_kind", "pool_labels", "scene_key", "separability", "split_savings"]


if __name__ == "__main__":
    main()
