"""Staging: a family trained over several sessions keeps its finished parts in a folder (fp16)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import load_file, save_file

from relaydiff.models.reference.checkpoint import _sha256
from relaydiff.models.reference.config import _comparable, ReferenceConfig, TrainingError
from relaydiff.models.reference.progress import Progress
from relaydiff.models.reference.vae import _seed_parts


STAGED_PARTS: tuple[str, ...] = ("vae", "unet_large", "unet_small", "adapters")  # in training order
# stages that refine a part that is already staged (the decoder fine-tune of the VAE, further phases
# of the large member): when they run, the part is staged again (a new blob, one per phase)
REFINING_STAGES: dict[str, str] = {"decoder": "vae", "large-continue": "unet_large"}


def staged_parts(staging: Path) -> list[str]:
    """The finished parts a staging folder holds, in training order."""
    return [name for name in STAGED_PARTS if (Path(staging) / name).is_dir() and any((Path(staging) / name).iterdir())]


def seed_from_staging(cfg: ReferenceConfig, out: Path, staging: Path, progress: Progress) -> list[str]:
    """Start a run from the parts that earlier sessions committed to a staging folder.

    A family that takes longer to train than one working block is trained stage by stage; each
    finished stage's fp16 weights are committed to the staging folder (`write_staging`), and the
    next block starts from there: the parts are copied in and the latents re-encoded with the
    staged VAE (the weights that will ship, so the members train in the shipped latent space).
    """
    staging = Path(staging)
    _check_staging_config(cfg, staging)
    parts = staged_parts(staging)
    if parts:
        if parts[0] != "vae":
            raise TrainingError(f"{staging} holds {parts} but no vae: it cannot seed a run")
        _seed_parts(cfg, out, staging, parts, progress, skip_decoder=False)
    return parts


def _check_staging_config(cfg: ReferenceConfig, staging: Path) -> None:
    cfg_file = staging / "config.json"
    if cfg_file.is_file():
        # a large-continue phase is planned per working block (its record is in unet_large)
        saved, now = (_comparable({k: v for k, v in json.loads(json.dumps(c.to_dict())).items() if k != "large_continue"})
                      for c in (ReferenceConfig.from_dict(json.loads(cfg_file.read_text())), cfg))
        if saved != now:
            raise TrainingError(f"{staging} was trained with another config (see {cfg_file})")


def write_staging(cfg: ReferenceConfig, out: Path, staging: Path, progress: Progress,
                  refined: Sequence[str] = ()) -> list[str]:
    """Copy the run's finished parts to the staging folder in fp16 (configs and records as they are).

    Parts already staged are left alone unless ``refined`` names them (a refining stage ran, see
    `REFINING_STAGES`) and they changed: a staged blob is committed once per stage or phase, and
    the shipped family is the last of these files moved into the package.
    """
    staging = Path(staging)
    _check_staging_config(cfg, staging)
    staging.mkdir(parents=True, exist_ok=True)
    have = staged_parts(staging)
    written = []
    for name in STAGED_PARTS:
        src = out / name
        done = (src / "config.json").is_file() if name != "adapters" else \
            all((src / f"{s}.safetensors").is_file() for s in cfg.styles)
        if (name in have and name not in refined) or not done:
            continue
        dest = staging / name
        tmp = staging / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for f in sorted(src.iterdir()):
            if f.suffix == ".safetensors":
                tensors = {k: (v.half() if v.is_floating_point() else v).contiguous()
                           for k, v in load_file(str(f)).items()}
                save_file(tensors, str(tmp / f.name), metadata={"format": "pt"})
            elif f.suffix == ".json":  # without the run folder diffusers records (a scratch path)
                d = json.loads(f.read_text())
                if isinstance(d, dict):
                    d.pop("_name_or_path", None)
                (tmp / f.name).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        if dest.exists():
            if _same_files(tmp, dest):
                shutil.rmtree(tmp)
                continue
            shutil.rmtree(dest)
        tmp.replace(dest)
        written.append(name)
        progress.note(f"staging: {name} written to {dest} (fp16)")
    (staging / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    (staging / "staging.json").write_text(json.dumps(
        {"parts": staged_parts(staging), "files": {str(p.relative_to(staging)): _sha256(p)
                                                   for p in sorted(staging.rglob("*.safetensors"))}}, indent=1))
    return written


def _same_files(a: Path, b: Path) -> bool:
    files = sorted(p.name for p in a.iterdir())
    return files == sorted(p.name for p in b.iterdir()) and all(_sha256(a / f) == _sha256(b / f) for f in files)
