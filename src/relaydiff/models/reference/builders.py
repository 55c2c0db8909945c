"""Builders from a config: the noise schedule, the VAE, the U-Nets (and their FLOPs), the frozen text encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from relaydiff.engine.family import text_encoder_from_manifest, TINY_SCHEDULER_CONFIG
from relaydiff.models.reference.config import ReferenceConfig, TEXT_PACKAGE, TrainingError, UNetSpec


def scheduler_config() -> dict[str, Any]:
    """SD 1.x's schedule, as the engine's tiny family uses: one schedule for every member."""
    return dict(TINY_SCHEDULER_CONFIG)


def vae_config(cfg: ReferenceConfig) -> dict[str, Any]:
    n = len(cfg.vae_channels)
    if cfg.image_size // 2 ** (n - 1) not in (8, 16):
        raise TrainingError(f"the VAE must map {cfg.image_size}px to 8x8 or 16x16 latents; {n} levels do not")
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": cfg.vae_latent_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.vae_channels), "layers_per_block": 1, "norm_num_groups": 16,
        "sample_size": cfg.image_size, "scaling_factor": 1.0,
    }


def unet_config(spec: UNetSpec, cfg: ReferenceConfig, cross_attention_dim: int = 384) -> dict[str, Any]:
    n = len(spec.block_out_channels)
    if not 1 <= spec.attention_levels <= n:
        raise TrainingError(f"attention_levels must be in 1..{n}, got {spec.attention_levels}")
    down = ["CrossAttnDownBlock2D"] * spec.attention_levels + ["DownBlock2D"] * (n - spec.attention_levels)
    up = [d.replace("Down", "Up") for d in reversed(down)]
    latent = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    return {
        "sample_size": latent, "in_channels": cfg.vae_latent_channels, "out_channels": cfg.vae_latent_channels,
        "block_out_channels": list(spec.block_out_channels), "layers_per_block": spec.layers_per_block,
        "down_block_types": down, "up_block_types": up, "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": spec.heads, "norm_num_groups": spec.norm_num_groups,
    }


def build_vae(cfg: ReferenceConfig):
    # lazy: diffusers takes seconds to import; only building or loading a U-Net/VAE needs it
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(vae_config(cfg))


def build_unet(member: str, cfg: ReferenceConfig):
    # lazy: diffusers takes seconds to import; only building or loading a U-Net/VAE needs it
    from diffusers import UNet2DConditionModel

    spec = {"large": cfg.large, "small": cfg.small}.get(member)
    if spec is None:
        raise TrainingError(f"unknown member {member!r}; the reference family has 'large' and 'small'")
    return UNet2DConditionModel.from_config(unet_config(spec, cfg))


def unet_flops(unet: Any, context_length: int, cross_attention_dim: int = 384) -> int:
    """FLOPs of one denoising step at batch 1 (one U-Net evaluation, no guidance doubling)."""
    c, s = int(unet.config.in_channels), int(unet.config.sample_size)
    param = next(unet.parameters())
    x = torch.zeros(1, c, s, s, dtype=param.dtype, device=param.device)
    ctx = torch.zeros(1, context_length, cross_attention_dim, dtype=param.dtype, device=param.device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500], device=param.device), ctx)
    return int(counter.get_total_flops())


def load_text_encoder(max_length: int):
    """The frozen MiniLM through the engine's loader, so training and inference encode alike."""
    return text_encoder_from_manifest(Path("."), {"package": TEXT_PACKAGE, "max_length": max_length})
