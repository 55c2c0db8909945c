"""Quality metrics of generated world images, all read by the judge.

- prompt fidelity: the fraction of a prompt's facts (`World.facts`: object count, every object's
  shape/colour/size, the stated relations, the background) that the judge finds in the image;
- style fidelity: whether the judge sees the user's style;
- Fréchet distance between judge features of two image sets (an FID analog);
- judge accuracy on renders (every fact of the scene, every pairwise relation and the style);
- latent statistics along a denoising chain, to see whether a handoff between members moves them.

Prompt objects are matched to detected objects by a maximum-agreement assignment (Hungarian), so
that the order in which the judge reports objects does not matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg
from scipy.optimize import linear_sum_assignment

from relaydiff.models.world import RELATIONS, STYLES, Scene, World, relation_holds
from relaydiff.quality.judge import Judge, Reading, load_judge

JUDGED_RELATION_MARGIN = 1.0  # pixels between read centres for a relation to count as seen
ATTRIBUTES = ("shape", "color", "size")


@dataclass(frozen=True)
class Fidelity:
    """Prompt fidelity of a set of images.

    `fidelity` is the mean over images of the fraction of each prompt's facts found (each prompt
    weighs the same); `per_fact` pools all facts; `exact` is the share of images with every fact.
    """

    fidelity: float
    per_fact: float
    exact: float
    n_images: int
    n_facts: int
    by_kind: dict[str, float]
    per_image: tuple[float, ...] = ()  # fraction of facts found, per image

    def as_dict(self) -> dict:
        return {"fidelity": self.fidelity, "per_fact": self.per_fact, "exact": self.exact,
                "n_images": self.n_images, "n_facts": self.n_facts, "by_kind": dict(self.by_kind)}  # fmt: skip


def _match(facts: Sequence[tuple], reading: Reading) -> dict[int, int]:
    """Prompt object index -> detection index, maximizing the number of agreeing attributes."""
    wanted: dict[int, dict[str, str]] = {}
    for f in facts:
        if f[0] in ATTRIBUTES:
            wanted.setdefault(f[1], {})[f[0]] = f[2]
    if not wanted or not reading.objects:
        return {}
    ids = sorted(wanted)
    agree = np.array([[sum(getattr(d, k) == v for k, v in wanted[i].items()) for d in reading.objects] for i in ids])
    rows, cols = linear_sum_assignment(-agree)
    return {ids[r]: int(c) for r, c in zip(rows, cols)}


def check_facts(facts: Sequence[tuple], reading: Reading, margin: float = JUDGED_RELATION_MARGIN) -> list[bool]:
    """Which of `facts` (as produced by `World.facts`, plus optional ("style", s)) the reading confirms."""
    match = _match(facts, reading)
    out = []
    for f in facts:
        kind = f[0]
        if kind == "count":
            ok = len(reading.objects) == f[1]
        elif kind in ATTRIBUTES:
            ok = f[1] in match and getattr(reading.objects[match[f[1]]], kind) == f[2]
        elif kind == "relation":
            i, rel, j = f[1], f[2], f[3]
            ok = i in match and j in match and relation_holds(
                reading.objects[match[i]], rel, reading.objects[match[j]], margin  # type: ignore[arg-type]
            )
        elif kind == "background":
            ok = reading.background == f[1]
        elif kind == "style":
            ok = reading.style == f[1]
        else:
            raise ValueError(f"unknown fact kind {kind!r} in {f}")
        out.append(bool(ok))
    return out


def score_facts(fact_lists: Sequence[Sequence[tuple]], readings: Sequence[Reading]) -> Fidelity:
    if len(fact_lists) != len(readings):
        raise ValueError(f"got {len(fact_lists)} fact lists but {len(readings)} readings")
    if not readings:
        raise ValueError("cannot score an empty set of images")
    per_image, pooled, kinds = [], [], {}
    for facts, reading in zip(fact_lists, readings):
        ok = check_facts(facts, reading)
        per_image.append(float(np.mean(ok)) if ok else 1.0)
        pooled += ok
        for f, good in zip(facts, ok):
            kinds.setdefault(f[0], []).append(good)
    return Fidelity(
        fidelity=float(np.mean(per_image)),
        per_fact=float(np.mean(pooled)),
        exact=float(np.mean([p == 1.0 for p in per_image])),
        n_images=len(readings),
        n_facts=len(pooled),
        by_kind={k: float(np.mean(v)) for k, v in sorted(kinds.items())},
        per_image=tuple(per_image),
    )


def _judge(judge: Judge | None) -> Judge:
    return judge if judge is not None else load_judge()


def _check_images(images: np.ndarray | torch.Tensor, n: int | None = None) -> None:
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got shape {shape}")
    if n is not None and shape[0] != n:
        raise ValueError(f"got {shape[0]} images for {n} labels")


def prompt_fidelity(images: np.ndarray | torch.Tensor, scenes: Sequence[Scene], judge: Judge | None = None) -> Fidelity:
    """How much of each image's prompt (the scene it was generated from) the judge finds."""
    _check_images(images, len(scenes))
    readings = _judge(judge).read(images)
    return score_facts([World.facts(s) for s in scenes], readings)


def style_fidelity(images: np.ndarray | torch.Tensor, styles: Sequence[str], judge: Judge | None = None) -> float:
    """The share of images in which the judge sees the intended style."""
    _check_images(images, len(styles))
    for s in styles:
        if s not in STYLES:
            raise ValueError(f"unknown style {s!r}; expected one of {STYLES}")
    readings = _judge(judge).read(images)
    return float(np.mean([r.style == s for r, s in zip(readings, styles)]))


def all_facts(scene: Scene, style: str, world: World) -> list[tuple]:
    """Everything the judge should read in a render: the prompt's facts, every clear pairwise relation, the style."""
    facts = World.facts(scene)
    stated = {f for f in facts if f[0] == "relation"}
    for i, a in enumerate(scene.objects):
        for j, b in enumerate(scene.objects):
            for rel in RELATIONS:
                if i != j and relation_holds(a, rel, b, world.margin) and ("relation", i, rel, j) not in stated:
                    facts.insert(-1, ("relation", i, rel, j))
    return facts + [("style", style)]


def judge_accuracy(
    judge: Judge | None, images: np.ndarray, scenes: Sequence[Scene], styles: Sequence[str], world: World | None = None
) -> dict:
    """Accuracy of the judge on renders: per fact (pooled) and per image (all facts right)."""
    _check_images(images, len(scenes))
    world = world or World(images.shape[1])
    readings = _judge(judge).read(images)
    fid = score_facts([all_facts(s, st, world) for s, st in zip(scenes, styles)], readings)
    return {"per_fact": fid.per_fact, "per_image": fid.exact, "n_images": fid.n_images, "n_facts": fid.n_facts,
            "by_kind": fid.by_kind}  # fmt: skip


def evaluate_judge(judge: Judge, n: int = 2000, seed: int = 12345, split: str = "heldout") -> dict:
    """Judge accuracy on ``n`` fresh renders of every style (see :func:`judge_accuracy`)."""
    world = World(judge.config.image_size)
    batch = world.batch(n, seed=seed, split=split, styles=STYLES)
    return judge_accuracy(judge, batch.images, batch.scenes, batch.styles, world=world)


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] (as in FID)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two [N, D] feature arrays with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least 2 samples on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(cov_a)) * eps
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def judge_fd(images_a: np.ndarray | torch.Tensor, images_b: np.ndarray | torch.Tensor, judge: Judge | None = None) -> float:
    """Fréchet distance between judge features of two image sets (e.g. generated vs renders)."""
    _check_images(images_a)
    _check_images(images_b)
    j = _judge(judge)
    return frechet_distance(j.features(images_a), j.features(images_b))


def latent_stats(latents: Sequence[torch.Tensor] | torch.Tensor) -> dict[str, list[float]]:
    """Mean, std and mean per-sample L2 norm of the latent at every step of a chain.

    `latents`: one [B, C, H, W] tensor per step (or a stacked [T, B, C, H, W] tensor).
    """
    steps = list(latents) if not isinstance(latents, torch.Tensor) else list(latents.unbind(0))
    if not steps:
        raise ValueError("latent_stats needs at least one step")
    out: dict[str, list[float]] = {"mean": [], "std": [], "norm": []}
    for z in steps:
        if z.ndim != 4:
            raise ValueError(f"expected [B, C, H, W] latents per step, got shape {tuple(z.shape)}")
        z = z.detach().double()
        out["mean"].append(float(z.mean()))
        out["std"].append(float(z.std()))
        out["norm"].append(float(z.flatten(1).norm(dim=1).mean()))
    return out


def handoff_shift(stats: dict[str, list[float]], k: int) -> dict[str, float]:
    """How much each statistic changes across step k (the handoff) relative to the median change per step.

    `stats` has T + 1 entries (the starting latent, then the latent after each of T steps); at a
    handoff at k the new member runs step k, which turns entry k into entry k + 1. A ratio near 1
    means the member switch moves the latent no more than an ordinary step does.
    """
    steps = len(stats["mean"]) - 1
    if not 0 < k < steps:
        raise ValueError(f"handoff step k must be within 1..{steps - 1} for a {steps}-step chain, got {k}")
    out = {}
    for key, values in stats.items():
        deltas = np.abs(np.diff(values))
        typical = float(np.median(np.delete(deltas, k)))
        out[f"{key}_delta"] = float(deltas[k])
        out[f"{key}_ratio"] = float(deltas[k] / typical) if typical > 0 else float("inf")
    return out
