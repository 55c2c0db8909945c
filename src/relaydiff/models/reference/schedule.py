"""Learning-rate schedule, the training noise schedule, and the EMA update."""

from __future__ import annotations

import math
from typing import Any

import torch

from relaydiff.models.reference.config import TrainSpec


def lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warm-up, then constant (with an optional final linear decay to 0) or cosine decay to
    10%: a pure function of the step."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    if not spec.cosine:
        left = spec.steps - step
        return spec.lr * min(1.0, left / spec.decay_steps) if spec.decay_steps > 0 else spec.lr
    p = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def ddpm_alphas_cumprod(sched: dict[str, Any]) -> torch.Tensor:
    # lazy: diffusers takes seconds to import; only building or loading a U-Net/VAE needs it
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(sched).alphas_cumprod.float()


def _ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float, step: int) -> None:
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ema:
                ema[name].mul_(d).add_(p.detach(), alpha=1 - d)
