"""`relaydiff demo`: a handful of users served across an edge and their devices."""

from __future__ import annotations

from pathlib import Path

import typer

from relaydiff.cli.errors import check, console
from relaydiff.cli.options import TorchThreads


def demo_cmd(
    out: Path = typer.Option(Path("out/demo"), help="Folder for the report, image grid and plots."),
    seed: int = typer.Option(0, help="Seed of the users' prompts and noise."),
    steps: int = typer.Option(None, help="Denoising steps (default: the family's)."),
    threads: TorchThreads = 0,
) -> None:
    """Serve a handful of users across an edge and their devices; write a report."""
    check(steps is None or steps >= 2, f"--steps must be >= 2 (a relay needs an edge and a device step), got {steps}")
    check(threads >= 0, "--threads must be >= 0")
    check(seed >= 0, "--seed must be >= 0")

    # lazy: the CLI starts without torch; only this command loads what it runs
    import torch
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from relaydiff.demo import PHASES, run_demo

    if threads:
        torch.set_num_threads(threads)
    with Progress(TextColumn("[bold]demo[/bold] {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("loading the family", total=len(PHASES))

        def phase(name: str) -> None:
            bar.update(task, completed=PHASES.index(name), description=name)

        report = run_demo(out, seed=seed, steps=steps, log=console.print, phase=phase)
    stdout = Console()
    # the plans go below each table, one per line: a table of 80 columns would cut them
    table = Table(title=f"relaydiff demo: {report['family']}, T={report['steps']}, relay handoff at k={report['handoff_k']}, "
                        f"personal split at k={report['personal_split_k']}")
    for col in ("user", "kind", "U-Net evals", "handoff bytes", "fidelity", "style"):
        table.add_column(col)
    for r in report["users"]:
        evals = " ".join(f"{m}:{n}" for m, n in r["unet_evals"].items())
        table.add_row(r["user"], r["kind"], evals, str(r["handoff_bytes"] or "-"),
                      f"{r['prompt_fidelity']:.2f}" if "prompt_fidelity" in r else "n/a",
                      f"{r['style_fidelity']:.0f}" if "style_fidelity" in r else "-")
    stdout.print(table)
    for r in report["users"]:
        stdout.print(f"  {r['user']:<6} {escape(r['plan'])}", soft_wrap=True)
    sp = report["shared_prefix"]
    stdout.print(f"shared prefix: {sp['steps']} steps for {sum(r['kind'] == 'shared prefix' for r in report['users'])} "
                 f"users at similarity {sp['similarity']:.2f}; the edge ran {100 * sp['edge_evals_saved_fraction']:.0f}% "
                 f"fewer large-member steps for the group")
    service = Table(title=f"the same family as a service on 127.0.0.1: one round, {report['service']['wall_s']:.1f} s")
    for col in ("device", "class", "kind", "finished by", "latency ms"):
        service.add_column(col)
    for r in report["service"]["jobs"]:
        service.add_row(r["device"], r["device_class"], r["kind"], r["finished_by"], f"{r['latency_ms']:.0f}")
    stdout.print(service)
    for r in report["service"]["jobs"]:
        stdout.print(f"  {r['device']:<6} {escape(r['plan'])}", soft_wrap=True)
    stdout.print(f"report (images, plots, each job's timeline, every column explained): {out / 'report.md'}")


def register(app: typer.Typer, bench: typer.Typer, train: typer.Typer) -> None:
    app.command("demo")(demo_cmd)
