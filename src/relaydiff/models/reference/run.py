"""The whole run: stages in order, resumable, from `relaydiff train reference`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from relaydiff.models.reference.config import ReferenceConfig, RunOptions, SHIPPED_DIR, STAGES, StageStopped, TrainingError, _comparable, _device
from relaydiff.models.reference.progress import Progress
from relaydiff.models.reference.data import stage_data
from relaydiff.models.reference.vae import seed_from_family, stage_decoder, stage_vae
from relaydiff.models.reference.staging import REFINING_STAGES, seed_from_staging, write_staging
from relaydiff.models.reference.denoisers import stage_large_continue, stage_member, stage_styles
from relaydiff.models.reference.export import export_family


def _check_out(cfg: ReferenceConfig, out: Path, resume: bool) -> None:
    cfg_file = out / "config.json"
    if cfg_file.is_file():  # fields added since the run started take their defaults
        saved = _comparable(json.loads(json.dumps(ReferenceConfig.from_dict(json.loads(cfg_file.read_text())).to_dict())))
        if saved != _comparable(json.loads(json.dumps(cfg.to_dict()))):
            raise TrainingError(f"{out} was trained with another config (see {cfg_file}); use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(json.dumps(cfg.to_dict(), indent=1))  # records the stage lengths last asked for


def train_reference(cfg: ReferenceConfig, out: str | Path, *, resume: bool = False,
                    stages: Sequence[str] = STAGES, export_to: str | Path | None = None,
                    stop_after: int | None = None, quiet: bool = False,
                    from_family: str | Path | None = None, device: str = "cpu",
                    staging: str | Path | None = None, styles: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the requested stages in order (finished ones are skipped).

    Returns the exported manifest (empty when nothing was exported) or ``{"stopped": why}`` when
    ``stop_after`` steps of a stage ran in this invocation (a checkpoint is written first).
    ``from_family`` (a family directory, or "reference" for the shipped one) seeds the run with that
    family's VAE and large member (`seed_from_family`) before the stages run. ``device`` is where
    the training steps run ("cuda" on a GPU machine); data and latents are encoded on the CPU.
    ``staging`` (a folder in the repository) seeds the run with the parts earlier sessions staged
    there and, when the stages ran to their end, stages the newly finished parts (fp16).
    ``styles`` (None: all of ``cfg.styles``) are the styles the 'styles' stage trains; the others'
    adapters are left as they are, and a run seeded ``from_family`` whose stages include 'styles' but
    not 'small' takes that family's small member and its adapters of the other styles, e.g. to train one
    style again (at another rank or length) without the ~20 min each of the others.
    """
    out = Path(out)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise TrainingError(f"unknown stages {unknown}; expected some of {STAGES}")
    if styles is not None:
        styles = tuple(styles)
        odd = [s for s in styles if s not in cfg.styles]
        if odd or not styles:
            raise TrainingError(f"styles {odd or '(none)'} to train must be some of the config's styles {cfg.styles}")
    if stop_after is not None and stop_after < 1:
        raise TrainingError(f"stop_after must be >= 1, got {stop_after}")
    dev = _device(device)
    _check_out(cfg, out, resume)
    torch.set_num_threads(cfg.threads)
    run = RunOptions(resume=resume, stop_after=stop_after, device=str(dev), styles=styles)
    manifest: dict[str, Any] = {}
    with Progress(quiet) as progress:
        if from_family is not None:
            seed_dir = SHIPPED_DIR if str(from_family) == "reference" else Path(from_family)
            seed_from_family(cfg, out, seed_dir, progress, with_small="styles" in stages and "small" not in stages,
                             retrain_styles=styles if styles is not None else cfg.styles)
        if staging is not None:
            seed_from_staging(cfg, out, Path(staging), progress)
        try:
            for stage in STAGES:
                if stage not in stages:
                    continue
                if stage == "data":
                    stage_data(cfg, out, progress)
                elif stage == "vae":
                    stage_vae(cfg, out, progress, run)
                elif stage == "decoder":
                    stage_decoder(cfg, out, progress, run)
                elif stage in ("large", "small"):
                    stage_member(cfg, out, progress, run, stage)
                elif stage == "large-continue":
                    stage_large_continue(cfg, out, progress, run)
                elif stage == "styles":
                    stage_styles(cfg, out, progress, run)
                elif stage == "export":
                    manifest = export_family(cfg, out, Path(export_to) if export_to else out / "family")
        except StageStopped as stopped:
            progress.note(str(stopped))
            return {"stopped": str(stopped)}
        if staging is not None:
            write_staging(cfg, out, Path(staging), progress,
                          refined=[part for stage, part in REFINING_STAGES.items() if stage in stages])
    return manifest
