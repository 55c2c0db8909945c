"""Engine commands: generate, resume, bench engine (registered by relaydiff.cli)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(2)


def save_png(image, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def generate_cmd(
    prompt: str = typer.Option(..., help="Text prompt."),
    family: str = typer.Option("tiny", help="'tiny', 'reference' or a family directory (docs/family.md)."),
    steps: int = typer.Option(8, help="Denoising steps T."),
    plan: str = typer.Option(None, help="Segments member[+adapter][@node]:a-b, e.g. large:0-4,small:4-8. "
                                        "Default: the family's first member for all steps."),
    seed: int = typer.Option(0, help="Seed of the initial noise (and of stochastic samplers)."),
    guidance: float = typer.Option(3.0, help="Classifier-free guidance scale (<= 1 disables it)."),
    negative_prompt: str = typer.Option("", help="Negative prompt."),
    sampler: str = typer.Option("ddim", help="ddim | euler | dpmpp_2m."),
    out: Path = typer.Option(None, help="Write the image here (PNG)."),
    stop_at: int = typer.Option(None, help="Stop after this many steps and write a handoff instead."),
    handoff_out: Path = typer.Option(None, help="Where --stop-at writes the handoff."),
    handoff_dtype: str = typer.Option("fp32", help="fp32 (bit-exact resume) or fp16."),
    compress: bool = typer.Option(False, help="zstd-compress the handoff payload."),
) -> None:
    """Generate one image, or stop mid-chain and write a handoff for `relaydiff resume`."""
    from relaydiff.engine.family import FamilyError, load_family
    from relaydiff.engine.handoff import HandoffError, write_handoff
    from relaydiff.engine.plan import Plan, PlanError, Request, parse_plan
    from relaydiff.engine.runner import generate

    if stop_at is not None and handoff_out is None:
        _fail("--stop-at needs --handoff-out")
    if stop_at is None and out is None:
        _fail("give --out (image) or --stop-at with --handoff-out")
    try:
        fam = load_family(family)
        req = Request(prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance, seed=seed,
                      sampler=sampler)
        pl = parse_plan(plan) if plan else Plan.single(next(iter(fam.members)), steps)
        (res,) = generate(fam, [req], [pl], stop_at=stop_at)
        if res.handoff is not None:
            size = write_handoff(handoff_out, res.handoff, dtype=handoff_dtype, compress=compress)
            console.print(f"handoff at step {res.handoff.step}/{steps} -> {handoff_out} "
                          f"({size if isinstance(size, int) else handoff_out.stat().st_size} bytes)")
        else:
            save_png(res.image, out)
            console.print(f"image -> {out}  unet_evals={res.accounting['unet_evals']}")
    except (FamilyError, PlanError, HandoffError, ValueError) as exc:
        _fail(str(exc))


def resume_cmd(
    handoff: Path = typer.Argument(..., help="A handoff file written by `generate --stop-at`."),
    out: Path = typer.Option(..., help="Write the finished image here (PNG)."),
    family: str = typer.Option(None, help="Family to finish with (default: the handoff's: 'tiny' or 'reference')."),
) -> None:
    """Finish a chain from a handoff, in this process."""
    from relaydiff.engine.family import FamilyError, load_family
    from relaydiff.engine.handoff import HandoffError, read_handoff
    from relaydiff.engine.runner import resume

    try:
        h = read_handoff(handoff)
        name = family or h.family_id
        fam = load_family(name, seed=_tiny_seed(h.family_version) if name == "tiny" else 0)
        res = resume(fam, h)
        save_png(res.image, out)
        console.print(f"resumed at step {h.step} -> {out}  unet_evals={res.accounting['unet_evals']}")
    except (FamilyError, HandoffError, ValueError, OSError) as exc:
        _fail(str(exc))


def _tiny_seed(version: str) -> int:
    return int(version[4:]) if version.startswith("seed") and version[4:].isdigit() else 0


def bench_engine_cmd(
    requests: int = typer.Option(16, help="Number of requests N."),
    steps: int = typer.Option(20, help="Steps per request."),
    max_batch: int = typer.Option(16, help="Largest batch (chains) of the executor."),
    stagger: int = typer.Option(1, help="Executor steps between two arrivals."),
    family: str = typer.Option("tiny", help="Family to bench."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
    dtype: str = typer.Option("fp32", help="fp32 | fp16 | bf16."),
    relay: bool = typer.Option(False, help="Relay plans (first member to T/2, then the second) instead of one member."),
    threads: int = typer.Option(1, help="CPU threads for torch (1 keeps shared machines comparable)."),
    trace: bool = typer.Option(True, help="Run the U-Nets as TorchScript traces (exact, less Python per call)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Sequential (one request at a time) vs continuous batching, same machine, same run."""
    from relaydiff.bench.engine import bench_engine

    import torch

    torch.set_num_threads(threads)
    result = bench_engine(family=family, n_requests=requests, steps=steps, max_batch=max_batch, stagger=stagger,
                          device=device, dtype=dtype, relay=relay, trace=trace)
    if as_json:
        print(json.dumps(result))
    else:
        from rich.table import Table

        table = Table(title="engine: sequential vs continuous batching")
        for k in result:
            table.add_column(k)
        table.add_row(*[str(v) for v in result.values()])
        Console().print(table)


def demo_cmd(
    out: Path = typer.Option(Path("out/demo"), help="Folder for the report, image grid and plots."),
    seed: int = typer.Option(0, help="Seed of the users' prompts and noise."),
    steps: int = typer.Option(None, help="Denoising steps (default: the family's)."),
    threads: int = typer.Option(0, help="CPU threads for torch (0: torch's default)."),
) -> None:
    """Serve a handful of users across an edge and their devices; write a report."""
    import torch

    from relaydiff.demo import run_demo

    if threads:
        torch.set_num_threads(threads)
    report = run_demo(out, seed=seed, steps=steps, log=console.print)
    from rich.table import Table

    table = Table(title=f"relaydiff demo: {report['family']}, T={report['steps']}, relay handoff at k={report['handoff_k']}, "
                        f"personal split at k={report['personal_split_k']}")
    for col in ("user", "kind", "plan", "U-Net evals", "handoff B", "fidelity", "style"):
        table.add_column(col)
    for r in report["users"]:
        evals = " ".join(f"{m}:{n}" for m, n in r["unet_evals"].items())
        table.add_row(r["user"], r["kind"], r["plan"], evals, str(r["handoff_bytes"] or "-"),
                      f"{r['prompt_fidelity']:.2f}" if "prompt_fidelity" in r else "n/a",
                      f"{r['style_fidelity']:.0f}" if "style_fidelity" in r else "-")
    Console().print(table)
    sp = report["shared_prefix"]
    Console().print(f"shared prefix saved {100 * sp['saved_fraction']:.0f}% of the group's U-Net evaluations; "
                    f"report: {out / 'report.md'}")


def register(app: typer.Typer, bench: typer.Typer, train: typer.Typer) -> None:
    app.command("demo")(demo_cmd)
    app.command("generate")(generate_cmd)
    app.command("resume")(resume_cmd)
    bench.command("engine")(bench_engine_cmd)
