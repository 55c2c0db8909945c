"""The training data: renders of the world and their prompts, encoded once by the frozen MiniLM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from relaydiff.models.reference.builders import load_text_encoder
from relaydiff.models.reference.checkpoint import _stage_seed
from relaydiff.models.reference.config import ReferenceConfig, TrainingError
from relaydiff.models.reference.progress import Progress
from relaydiff.models.world import World


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1], the VAE's range (as family.decode assumes)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def training_set(cfg: ReferenceConfig):
    return World(cfg.image_size).batch(cfg.n_train, seed=_stage_seed(cfg.seed, "data", 0) % (2**31), split="train")


def stage_data(cfg: ReferenceConfig, out: Path, progress: "Progress") -> None:
    """Prompts of the training set -> MiniLM token states (fp16) once, plus the unconditional one."""
    path = out / "data" / "text.safetensors"
    if path.is_file():
        progress.note("data: cached")
        return
    batch = training_set(cfg)
    enc = load_text_encoder(cfg.max_length)
    chunk = 256
    parts = []
    task = progress.start("data (MiniLM prompts)", cfg.n_train)
    for i in range(0, cfg.n_train, chunk):
        parts.append(enc.encode(batch.prompts[i:i + chunk]).half())
        progress.advance(task, min(chunk, cfg.n_train - i))
    emb = torch.cat(parts)
    uncond = enc.encode([""]).half()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"prompts": emb.contiguous(), "uncond": uncond.contiguous()}, str(path.with_suffix(".tmp")))
    path.with_suffix(".tmp").replace(path)
    (out / "data" / "prompts.json").write_text(json.dumps(batch.prompts))


def _load_text(out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    path = out / "data" / "text.safetensors"
    if not path.is_file():
        raise TrainingError(f"{path} is missing: run the 'data' stage first")
    d = load_file(str(path))
    return d["prompts"], d["uncond"]
