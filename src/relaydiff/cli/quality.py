"""Quality commands: `relaydiff train judge` and `relaydiff bench quality`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from relaydiff.cli.errors import check, console, fail
from relaydiff.cli.options import FamilyDir, JsonFlag, JsonOut, RunSeed, Sampler, SharedThreads, Trace, save_json


def train_judge_cmd(
    out: Path = typer.Option(Path("runs/judge"), help="Run directory (checkpoint.safetensors + checkpoint.json)."),
    seed: RunSeed = 0,
    steps: int = typer.Option(2000, help="Optimizer steps."),
    until: int = typer.Option(0, help="Stop after this many total steps (0: run to the end); rerun to continue."),
    threads: SharedThreads = 1,
    export: Path = typer.Option(None, help="Write the final judge here (fp16 safetensors + config.json); the "
                                           "shipped one is src/relaydiff/assets/judge."),
    eval_size: int = typer.Option(2000, help="Held-out renders for the accuracy written next to the weights."),
) -> None:
    """Train the judge on renders of the world (train split, every style); resumes from --out."""
    # lazy: the CLI starts without torch; only this command loads what it runs
    from dataclasses import asdict

    from relaydiff.quality.judge import JudgeTrainConfig, train_judge
    from relaydiff.quality.metrics import evaluate_judge

    check(steps >= 1 and eval_size >= 1, "--steps and --eval-size must be >= 1")
    cfg = JudgeTrainConfig(seed=seed, steps=steps, threads=threads, eval_size=eval_size)

    def log(d: dict) -> None:
        console.print(f"step {d['step']}/{d['steps']}  loss {d['loss']:.4f}  lr {d['lr']:.2e}  {d['elapsed_s']:.0f}s")

    try:
        judge = train_judge(cfg, out, log=log, until=until or None)
    except ValueError as exc:
        fail(str(exc))
    done = json.loads((out / "checkpoint.json").read_text())["step"]
    if done < cfg.steps:
        console.print(f"stopped at step {done}/{cfg.steps}; run the same command again to continue")
        return
    acc = evaluate_judge(judge, n=cfg.eval_size)
    console.print(f"held-out accuracy: per fact {acc['per_fact']:.4f}, per image {acc['per_image']:.4f}")
    if export is not None:
        train_config = json.loads(json.dumps(asdict(cfg)))
        judge.save_pretrained(export, extra={"train_config": train_config, "heldout_accuracy": acc})
        console.print(f"judge -> {export}")


def bench_quality_cmd(
    family: FamilyDir = "reference",
    steps: int = typer.Option(20, help="Denoising steps T of every chain."),
    n_prompts: int = typer.Option(256, help="Held-out prompts for members and relay (the paired relay decision's sample)."),
    sampler: Sampler = "ddim",
    guidance: float = typer.Option(3.0, help="Classifier-free guidance scale."),
    seed: int = typer.Option(0, help="Seed of prompts and noise."),
    repeats: int = typer.Option(3, help="Timing runs per handoff step (the minimum is kept)."),
    quick: bool = typer.Option(False, help="A small, fast run (smoke test; numbers are noisy)."),
    judge: Path = typer.Option(None, help="A judge directory (default: the shipped judge)."),
    trace: Trace = True,
    device_guidance: float = typer.Option(1.0, help="Guidance of the device segment in the second relay curve "
                                          "(1: no CFG on the device)."),
    device_curve: bool = typer.Option(True, help="Measure that second relay curve."),
    only: str = typer.Option("", help="Measure only these sections, comma-separated: judge, vae_ceiling, relay, "
                                      "shared_prefix, personalization (default: all)."),
    update: Path = typer.Option(None, help="Merge the measured sections into this existing table (a quality.json) "
                                           "and write it back; the merge is recorded under 'updates'."),
    out: JsonOut = None,
    as_json: JsonFlag = False,
) -> None:
    """Quality vs speed of a family on held-out prompts: members, relay, shared prefix, personalization."""
    # lazy: the CLI starts without torch; only this command loads what it runs
    from relaydiff.bench.quality import QualityBenchConfig, bench_quality, parse_sections, update_table

    check(steps >= 2 and n_prompts >= 2 and repeats >= 1, "--steps must be >= 2, --n-prompts >= 2 and --repeats >= 1")
    try:
        sections = parse_sections(only)
    except ValueError as exc:
        fail(str(exc))
    table = None
    if update is not None:
        try:
            table = json.loads(update.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            fail(f"--update {update}: cannot read the table ({exc})")
        check(isinstance(table, dict) and "config" in table and "family" in table,
              f"--update {update}: not a bench quality table (no config/family)")
    cfg = QualityBenchConfig(family=family, steps=steps, n_prompts=n_prompts, sampler=sampler, guidance=guidance,
                             seed=seed, repeats=repeats, judge_dir=str(judge) if judge else None, trace=trace,
                             device_guidance=device_guidance if device_curve else None, sections=sections)
    if quick:
        cfg = QualityBenchConfig(family=family, steps=min(steps, 8), n_prompts=min(n_prompts, 16), sampler=sampler,
                                 guidance=guidance, seed=seed, repeats=1, timing_batch=4, n_judge=200,
                                 shared_groups=2, shared_pool_rounds=4, personal_prompts=4, judge_dir=cfg.judge_dir, trace=trace,
                                 device_guidance=cfg.device_guidance, sections=sections)
    try:
        result = bench_quality(cfg, log=lambda msg: console.print(msg))
        if table is not None:
            result = update_table(table, result)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    text = json.dumps(result, allow_nan=False)
    if update is not None:
        save_json(text, update)
    save_json(text, out)
    if as_json:
        print(text)
        return
    if "relay" not in result:
        console.print({k: result[k] for k in ("sections", "targets") if k in result})
        return
    # lazy: the CLI starts without torch; only this command loads what it runs
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"relay on {result['family']['id']} (T={cfg.steps}, {result['hardware']})")
    for col in ("k", "fidelity", "fd", "speedup", "speedup_single"):
        table.add_column(col)
    dev = {e["k"]: e for e in result.get("relay_device_guidance", {}).get("relay", [])}
    if dev:
        g = result["relay_device_guidance"]["guidance"]
        table.add_column(f"fidelity (device g={g:g})")
        table.add_column(f"speedup (device g={g:g})")
    for e in result["relay"]:
        d = dev.get(e["k"])
        extra = [f"{d['fidelity']:.3f}", f"{d['speedup']:.2f}"] if d else (["", ""] if dev else [])
        table.add_row(str(e["k"]), f"{e['fidelity']:.3f}", f"{e['fd']:.2f}", f"{e['speedup']:.2f}",
                      f"{e['speedup_single']:.2f}", *extra)
    Console().print(table)
    Console().print({k: result[k] for k in ("judge_accuracy", "best_relay", "targets")})


def register(app: typer.Typer, bench: typer.Typer, train: typer.Typer) -> None:
    train.command("judge")(train_judge_cmd)
    bench.command("quality")(bench_quality_cmd)
