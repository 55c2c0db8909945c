"""Export to the engine's family format (fp16 + manifest with hashes), and a family from checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from relaydiff.engine.family import Family
from relaydiff.models.reference.builders import build_unet, load_text_encoder, scheduler_config, unet_flops
from relaydiff.models.reference.checkpoint import _sha256, Checkpoint
from relaydiff.models.reference.config import ReferenceConfig, SHIPPED_DIR, TEXT_PACKAGE, TrainingError
from relaydiff.models.reference.vae import _load_vae


def assemble_family(cfg: ReferenceConfig, out: Path):
    """The trained pieces under ``out`` as an engine Family (fp32, adapters attached)."""
    # lazy: diffusers takes seconds to import; only building or loading a U-Net/VAE needs it
    from diffusers import UNet2DConditionModel

    members = {}
    for m in ("large", "small"):
        d = out / f"unet_{m}"
        if not (d / "config.json").is_file():
            raise TrainingError(f"{d} is missing: run the '{m}' stage first")
        members[m] = UNet2DConditionModel.from_pretrained(str(d), local_files_only=True)
    family = Family(id="reference", version=f"seed{cfg.seed}", text_encoder=load_text_encoder(cfg.max_length),
                    vae=_load_vae(out), scheduler_config=scheduler_config(), members=members,
                    text_encoder_ref={"package": TEXT_PACKAGE}, metadata={"styles": list(cfg.styles)},
                    guidance_distilled=_distilled_members(cfg))
    for style in cfg.styles:
        path = out / "adapters" / f"{style}.safetensors"
        if path.is_file():
            family.load_adapter_file(style, path, member="small")
    return family


def export_family(cfg: ReferenceConfig, out: Path, dest: Path) -> dict[str, Any]:
    """Write the family directory (fp16) and manifest.json: hashes, training config, FLOPs."""
    family = assemble_family(cfg, out)
    missing = [s for s in cfg.styles if s not in family.adapters]
    if missing:
        raise TrainingError(f"styles {missing} are not trained yet: run the 'styles' stage first")
    flops = {m: unet_flops(family.unet(m, None), cfg.max_length) for m in family.members}  # adapters off
    params = {m: sum(p.numel() for p in u.parameters()) for m, u in family.members.items()}
    family.metadata.update({"flops_per_step": flops, "params": params,
                            "flop_ratio_large_small": flops["large"] / flops["small"]})
    dest.mkdir(parents=True, exist_ok=True)
    family.save_pretrained(dest, dtype=torch.float16)
    files = sorted(p for p in dest.rglob("*") if p.is_file() and p.name != "manifest.json")
    records = {}
    for name in ("vae", "unet_large", "unet_small"):
        rec = out / name / "train_record.json"
        if rec.is_file():
            records[name] = json.loads(rec.read_text())
    manifest = {
        "family": "reference", "seed": cfg.seed, "dtype": "float16",
        "files": {str(p.relative_to(dest)): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files},
        "total_bytes": sum(p.stat().st_size for p in files),
        "flops_per_step": flops, "params": params, "flop_ratio_large_small": flops["large"] / flops["small"],
        "training_config": cfg.to_dict(), "training_records": records,
        "torch": torch.__version__,
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def verify_manifest(dest: Path = SHIPPED_DIR) -> dict[str, Any]:
    """Check every file of a shipped family against manifest.json; raise on any mismatch."""
    path = dest / "manifest.json"
    if not path.is_file():
        raise TrainingError(f"{path} is missing")
    manifest = json.loads(path.read_text())
    for rel, rec in manifest["files"].items():
        f = dest / rel
        if not f.is_file():
            raise TrainingError(f"{f} is listed in the manifest but missing")
        if _sha256(f) != rec["sha256"]:
            raise TrainingError(f"{f} does not match its sha256 in the manifest")
    return manifest


# ---- evaluation (judge) -------------------------------------------------------------------------

def checkpoint_family(cfg: ReferenceConfig, out: str | Path):
    """A family from a run in progress: finished members as saved, unfinished ones from their EMA."""
    out = Path(out)
    members = {}
    for m in ("large", "small"):
        unet = build_unet(m, cfg)
        if (out / f"unet_{m}" / "config.json").is_file():
            # lazy: diffusers takes seconds to import; only building or loading a U-Net/VAE needs it
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(str(out / f"unet_{m}"), local_files_only=True)
        elif Checkpoint(out, m).exists():
            unet.load_state_dict(Checkpoint(out, m).load("ema"), strict=False)
        else:
            continue
        members[m] = unet
    if not members:
        raise TrainingError(f"{out} has no trained member yet")
    return Family(id="reference", version="checkpoint", text_encoder=load_text_encoder(cfg.max_length),
                  vae=_load_vae(out), scheduler_config=scheduler_config(), members=members,
                  text_encoder_ref={"package": TEXT_PACKAGE},
                  guidance_distilled=_distilled_members(cfg) if "small" in members else {})


def _distilled_members(cfg: ReferenceConfig) -> dict[str, float]:
    return {"small": cfg.small_guidance} if cfg.small_guidance else {}
