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
    from rich.table import Table

    from relaydiff.demo import run_demo

    if threads:
        torch.set_num_threads(threads)
    report = run_demo(out, seed=seed, steps=steps, log=console.print)
    table = Table(title=f"relaydiff demo: {report['family']}, T={report['steps']}, relay handoff at k={report['handoff_k']}, "
                        f"personal split at k={report['personal_split_k']}")
    for col in ("user", "kind", "plan", "U-Net evals", "handoff B", "fidelity", "style"):
        table.add_column(col)
    for r in report["users"]:
        evals = " ".join(f"{m}:{n}" for m, n in r["unet_evals"].items())
        table.add_row(r["user"], r["kind"], escape(r["plan"]), evals, str(r["handoff_bytes"] or "-"),
                      f"{r['prompt_fidelity']:.2f}" if "prompt_fidelity" in r else "n/a",
                      f"{r['style_fidelity']:.0f}" if "style_fidelity" in r else "-")
    Console().print(table)
    sp = report["shared_prefix"]
    Console().print(f"shared prefix saved {100 * sp['saved_fraction']:.0f}% of the group's U-Net evaluations; "
                    f"report: {out / 'report.md'}")
    service = Table(title=f"the same family as a service on 127.0.0.1: one round, {report['service']['wall_s']:.1f} s")
    for col in ("device", "class", "kind", "plan", "finished by", "latency ms", "timeline (ms after submitting)"):
        service.add_column(col)
    for r in report["service"]["jobs"]:
        service.add_row(r["device"], r["device_class"], r["kind"], escape(r["plan"]), r["finished_by"],
                        f"{r['latency_ms']:.0f}", ", ".join(f"{m} {ms:.0f}" for m, ms in r["marks_ms"].items()))
    Console().print(service)


def register(app: typer.Typer, bench: typer.Typer, train: typer.Typer) -> None:
    app.command("demo")(demo_cmd)
