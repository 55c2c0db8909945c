"""`relaydiff train reference`: the whole reference family from a seed, checkpointed and resumable."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from relaydiff.cli.errors import console, fail
from relaydiff.cli.options import RunSeed


def train_reference_cmd(
    out: str = typer.Option("runs/reference", help="Run directory (checkpoints, data cache, trained parts)."),
    seed: RunSeed = 0,
    resume: bool = typer.Option(False, "--resume", help="Continue the checkpoints found in --out."),
    stages: str = typer.Option("data,vae,decoder,large,large-continue,small,styles,export",
                               help="Comma-separated stages to run (finished ones are skipped)."),
    export_to: str = typer.Option("", help="Family directory to export to (default OUT/family; "
                                            "the shipped one is src/relaydiff/assets/reference)."),
    threads: int = typer.Option(1, help="torch threads (the machine is shared: 1 or 2)."),
    stop_after: int = typer.Option(0, help="Stop after this many steps of a stage (0: run to the end); "
                                            "a checkpoint is written, --resume continues."),
    config: str = typer.Option("", help="JSON file overriding ReferenceConfig fields."),
    from_family: str = typer.Option("", help="Start from this trained family's VAE and large member "
                                              "('reference': the shipped one) instead of training them."),
    staging: str = typer.Option("", help="Staging folder of a family trained over several sessions: the run "
                                           "starts from its parts, and newly finished parts are "
                                           "written there in fp16 (commit them)."),
    device: str = typer.Option("cpu", help="Where the training steps run: cpu, cuda[:N] or mps. Random "
                                           "draws stay on the CPU, so a GPU run draws the same batches."),
    styles: str = typer.Option("", help="Comma-separated styles the 'styles' stage trains (default: all); "
                                          "the others' adapters stay as they are (with --from-family and "
                                          "no 'small' stage: the family's, with its small member)."),
) -> None:
    """Train the reference family (VAE, large/small U-Nets, style LoRAs) and export it."""
    # lazy: the CLI starts without torch; only this command loads what it runs
    from relaydiff.engine.family import FamilyError
    from relaydiff.models.reference import ReferenceConfig, TrainingError, train_reference

    try:
        overrides = json.loads(Path(config).read_text()) if config else {}
        cfg = ReferenceConfig.from_dict({**ReferenceConfig().to_dict(), **overrides, "seed": seed,
                                         "threads": threads})
        manifest = train_reference(cfg, out, resume=resume, stages=[s.strip() for s in stages.split(",") if s],
                                   export_to=export_to or None, stop_after=stop_after or None,
                                   from_family=from_family or None, device=device,
                                   staging=staging or None,
                                   styles=[s.strip() for s in styles.split(",") if s.strip()] or None)
    except (TrainingError, FamilyError, OSError, json.JSONDecodeError, TypeError) as exc:
        fail(str(exc))
    if "stopped" in manifest:
        console.print(f"{manifest['stopped']}; continue with --resume")
    elif manifest:
        console.print(f"exported {len(manifest['files'])} files, {manifest['total_bytes'] / 1e6:.1f} MB; "
                      f"FLOPs/step {manifest['flops_per_step']} (ratio {manifest['flop_ratio_large_small']:.2f})")


def register(app: typer.Typer, bench: typer.Typer, train: typer.Typer) -> None:
    train.command("reference")(train_reference_cmd)
