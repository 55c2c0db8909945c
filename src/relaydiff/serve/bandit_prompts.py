"""Prompt features for the relay bandit, computed at the edge from the prompt text alone.

Features (:data:`relaydiff.sim.relay_stream.PROMPT_FEATURES`): the word count / 16, and the first
three principal components of the prompt's all-MiniLM-L6-v2 sentence embedding
(:func:`relaydiff.quality.similarity.prompt_embeddings`). The components are fitted once, without
labels, on calibration prompts of the reference world (a seeded draw, so every run uses the same
axes). Nothing here looks at the scene behind a prompt: the object count a :class:`PromptPool`
carries is used by the simulator to draw the measured quality, never shown to a policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from relaydiff.models.world import Scene, World
from relaydiff.quality.similarity import prompt_embeddings
from relaydiff.sim.relay_stream import PromptPool

WORDS_SCALE = 16.0


@dataclass(frozen=True)
class PromptFeaturizer:
    """Word count and MiniLM principal components of a prompt."""

    mean: np.ndarray  # [384] embedding mean of the calibration prompts
    components: np.ndarray  # [3, 384] principal axes

    @classmethod
    def fit(cls, prompts: list[str]) -> "PromptFeaturizer":
        emb = prompt_embeddings(prompts)
        mean = emb.mean(0)
        _, _, vt = np.linalg.svd(emb - mean, full_matrices=False)
        comps = vt[:3] * np.sign(vt[:3, :1] + 1e-12)  # a fixed sign per axis
        scale = np.std((emb - mean) @ comps.T, axis=0)
        return cls(mean=mean, components=comps / scale[:, None])  # unit variance on the calibration set

    def __call__(self, prompts: list[str]) -> np.ndarray:
        words = np.array([len(p.split()) for p in prompts], float) / WORDS_SCALE
        pcs = (prompt_embeddings(prompts) - self.mean) @ self.components.T
        return np.column_stack([words, pcs])


def calibration_featurizer(seed: int = 0, n: int = 300) -> PromptFeaturizer:
    """The featurizer fitted on ``n`` training-split prompts of the reference world (seeded)."""
    return PromptFeaturizer.fit(World().batch(n, seed=10_000 + seed, split="train").prompts)


def sample_prompts(n_per_class: int, seed: int, split: str = "heldout") -> tuple[list[str], list[Scene]]:
    """``n_per_class`` prompts with each of 1, 2 and 3 objects (scenes kept for judging live)."""
    world, rng = World(), np.random.default_rng(seed)
    prompts, scenes = [], []
    for n_obj in (1, 2, 3):
        for _ in range(n_per_class):
            scene = world.sample_scene(rng, n_objects=n_obj, split=split)
            scenes.append(scene)
            prompts.append(world.describe(scene, rng, split=split))
    return prompts, scenes


def prompt_pool(featurizer: PromptFeaturizer, n_per_class: int = 200, seed: int = 0) -> PromptPool:
    """A simulator prompt pool of held-out world prompts, featurized like live requests."""
    prompts, scenes = sample_prompts(n_per_class, seed)
    return PromptPool(features=featurizer(prompts), n_objects=np.array([len(s.objects) for s in scenes]))


__all__ = ["PromptFeaturizer", "calibration_featurizer", "prompt_pool", "sample_prompts"]
