"""Seeded draws per (seed, stage, step) and checkpoints (safetensors + JSON): a run resumes exactly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from relaydiff.models.reference.config import RunOptions, TrainingError


def _stage_seed(seed: int, stage: str, step: int) -> int:
    digest = hashlib.sha256(f"{seed}/{stage}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _rng(seed: int, stage: str, step: int) -> tuple[np.random.Generator, torch.Generator]:
    s = _stage_seed(seed, stage, step)
    return np.random.default_rng(s), torch.Generator().manual_seed(s)


# ---- checkpoints (safetensors + JSON) ---------------------------------------------------------

def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for idx, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            out[f"{idx}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().clone().contiguous()
    return out


def _load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)


class Checkpoint:
    """A stage's resumable state: model, EMA and optimizer tensors plus a JSON record."""

    def __init__(self, root: Path, stage: str):
        self.dir = root / "checkpoints" / stage
        self.state_file = self.dir / "state.json"

    def exists(self) -> bool:
        return self.state_file.is_file()

    def state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainingError(f"checkpoint state {self.state_file} is unreadable: {exc}") from exc

    def save(self, step: int, tensors: dict[str, dict[str, torch.Tensor]], record: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, sd in tensors.items():
            tmp = self.dir / f"{name}.safetensors.tmp"
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp))
            tmp.replace(self.dir / f"{name}.safetensors")
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps({"step": step, **record}, indent=1))
        tmp.replace(self.state_file)  # the JSON is written last: it vouches for the tensors

    def load(self, name: str) -> dict[str, torch.Tensor]:
        path = self.dir / f"{name}.safetensors"
        if not path.is_file():
            raise TrainingError(f"checkpoint {path} is missing")
        return load_file(str(path))


def _resume(ckpt: Checkpoint, resume: bool, models: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
            ema: dict[str, torch.Tensor] | None = None) -> int:
    """Load a stage's checkpoint when resuming; refuse to silently overwrite one otherwise."""
    if not ckpt.exists():
        return 0
    if not resume:
        raise TrainingError(f"{ckpt.dir} holds a checkpoint: pass --resume to continue it, or use a new --out")
    for name, model in models.items():
        missing, unexpected = model.load_state_dict(ckpt.load(name), strict=False)
        if unexpected or (missing and name != "lora"):
            raise TrainingError(f"checkpoint {ckpt.dir}/{name} does not fit the model: "
                                f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    _load_optimizer_tensors(opt, ckpt.load("optimizer"))
    if ema is not None:
        device = next(next(iter(models.values())).parameters()).device
        ema.update({k: v.to(device) for k, v in ckpt.load("ema").items()})
    return int(ckpt.state()["step"])


def _should_stop(run: RunOptions, step: int, start: int) -> bool:
    return run.stop_after is not None and step + 1 - start >= run.stop_after


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
