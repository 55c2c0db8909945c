"""Engine commands: generate, resume, profile, bench engine.

Imports of torch and the engine happen inside the commands: ``relaydiff --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from relaydiff.cli.errors import check, console, fail, int_list
from relaydiff.cli.options import FamilyDir, JsonFlag, Sampler, TorchDevice, Trace

PLAN_HELP = ("Segments member[+adapter][@node]:start-end joined by commas, e.g. large:0-4,small:4-8; "
             "[g=G] after a segment sets its guidance. Default: the family's first member for all steps.")


def write_image(image, path: Path) -> str:
    """Write an image; the format follows the suffix (.png, .jpg, .webp ...). Returns the format's name."""
    # lazy: the CLI starts without torch; only this command loads what it runs
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(image)
    img.save(path)
    return Image.registered_extensions().get(path.suffix.lower(), "PNG")


def check_image_path(path: Path, option: str = "--out") -> None:
    """An output path whose suffix names an image format PIL writes (before anything runs)."""
    # lazy: the CLI starts without torch; only this command loads what it runs
    from PIL import Image

    if path.suffix.lower() not in Image.registered_extensions():
        fail(f"{option} {path}: the suffix names no image format; use .png (lossless), .jpg or .webp")


def check_device(device: str) -> None:
    """A torch device this build and machine have, or a clear error."""
    # lazy: the CLI starts without torch; only this command loads what it runs
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        fail(f"--device {device!r} is not a torch device (cpu, cuda, cuda:N, mps)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {device}: this torch build ({torch.__version__}) or machine has no CUDA GPU")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        fail(f"--device {device}: MPS is not available on this machine")


def generate_cmd(
    prompt: str = typer.Option(..., help="Text prompt."),
    family: str = typer.Option("tiny", help="'reference' (draws pictures), 'tiny' (random weights: draws noise, for "
                                            "tests) or a family directory (docs/family.md)."),
    steps: int = typer.Option(8, help="Denoising steps T."),
    plan: str = typer.Option(None, help=PLAN_HELP),
    seed: int = typer.Option(0, help="Seed of the initial noise (and of stochastic samplers)."),
    guidance: float = typer.Option(3.0, help="Classifier-free guidance scale (<= 1 disables it)."),
    negative_prompt: str = typer.Option("", help="Negative prompt."),
    sampler: Sampler = "ddim",
    out: Path = typer.Option(None, help="Write the image here; the suffix picks the format (.png lossless, .jpg ...)."),
    stop_at: int = typer.Option(None, help="Stop after this many steps and write a handoff instead."),
    handoff_out: Path = typer.Option(None, help="Where --stop-at writes the handoff."),
    handoff_dtype: str = typer.Option("fp32", help="fp32 (bit-exact resume) or fp16."),
    compress: bool = typer.Option(False, help="zstd-compress the handoff payload."),
) -> None:
    """Generate one image, or stop mid-chain and write a handoff for `relaydiff resume`."""
    # lazy: the CLI starts without torch; only this command loads what it runs
    from relaydiff.engine.plan import Plan, PlanError, Request, parse_plan, validate_plan
    from relaydiff.engine.samplers import SAMPLERS

    if stop_at is not None and handoff_out is None:
        fail("--stop-at needs --handoff-out")
    if stop_at is None and out is None:
        fail("give --out (image) or --stop-at with --handoff-out")
    check(stop_at is None or 0 < stop_at < steps, f"--stop-at must be in 1..{steps - 1} (a step inside the chain)")
    check(sampler in SAMPLERS, f"unknown sampler {sampler!r}; known samplers: {', '.join(SAMPLERS)}")
    check(handoff_dtype in ("fp32", "fp16"), f"--handoff-dtype must be fp32 or fp16, got {handoff_dtype!r}")
    if out is not None:
        check_image_path(out)
    try:  # arguments first: a typo must not cost a model load
        req = Request(prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance, seed=seed,
                      sampler=sampler)
        parsed = validate_plan(parse_plan(plan), steps) if plan else None
    except PlanError as exc:
        fail(str(exc))

    # lazy: the CLI starts without torch; only this command loads what it runs
    from relaydiff.engine.family import FamilyError, load_family
    from relaydiff.engine.handoff import HandoffError, write_handoff
    from relaydiff.engine.runner import generate

    try:
        fam = load_family(family)
        pl = parsed or Plan.single(next(iter(fam.members)), steps)
        _warn_if_truncated(fam, [prompt, negative_prompt])
        (res,) = generate(fam, [req], [pl], stop_at=stop_at)
        if res.handoff is not None:
            size = write_handoff(handoff_out, res.handoff, dtype=handoff_dtype, compress=compress)
            console.print(f"handoff at step {res.handoff.step}/{steps} -> {handoff_out} "
                          f"({size if isinstance(size, int) else handoff_out.stat().st_size} bytes)")
        else:
            fmt = write_image(res.image, out)
            console.print(f"image ({fmt}) -> {out}  unet_evals={res.accounting['unet_evals']}")
    except (FamilyError, PlanError, HandoffError, ValueError) as exc:
        fail(str(exc))


def _warn_if_truncated(family, prompts: list[str]) -> None:
    """Say so when a prompt is longer than the text encoder reads (the rest would be cut silently)."""
    window = family.text_encoder.max_length
    for text in prompts:
        n = family.text_encoder.token_count(text) if text else 0
        if n > window:
            console.print(f"[yellow]warning:[/] a prompt has {n} tokens; the text encoder reads the first {window}, "
                          "the rest is ignored")


def resume_cmd(
    handoff: Path = typer.Argument(..., help="A handoff file written by `generate --stop-at`."),
    out: Path = typer.Option(..., help="Write the finished image here; the suffix picks the format (.png lossless, .jpg ...)."),
    family: str = typer.Option(None, help="Family to finish with: 'reference', 'tiny' or a directory (default: the "
                                          "one the handoff names, if this machine has it)."),
) -> None:
    """Finish a chain from a handoff, in this process."""
    check_image_path(out)

    # lazy: the CLI starts without torch; only this command loads what it runs
    from relaydiff.engine.family import FamilyError
    from relaydiff.engine.handoff import HandoffError, read_handoff
    from relaydiff.engine.runner import resume

    try:
        h = read_handoff(handoff)
        fam = _family_for_handoff(h.family_id, h.family_version, family)
        res = resume(fam, h)
        fmt = write_image(res.image, out)
        console.print(f"resumed at step {h.step} -> {out} ({fmt})  unet_evals={res.accounting['unet_evals']}")
    except (FamilyError, HandoffError, ValueError, OSError) as exc:
        fail(str(exc))


def _family_for_handoff(family_id: str, version: str, given: str | None):
    """The family a handoff continues on: ``given`` (--family), else the one it names.

    A handoff names its family by id and version (a directory family: the folder's name and a
    fingerprint of its members' configs), never by a path, so a directory family is found only
    where a folder of that name is at hand; otherwise the message says to pass --family.
    """
    # lazy: the CLI starts without torch; only this command loads what it runs
    from pathlib import Path

    from relaydiff.engine.family import FamilyError, load_family

    name = given or family_id
    if name not in ("tiny", "reference") and not Path(name).is_dir():
        raise FamilyError(f"the handoff was made with the directory family {family_id!r} (version {version}), "
                          f"which is not in this folder: pass --family DIR")
    seed = int(version[4:]) if name == "tiny" and version.startswith("seed") and version[4:].isdigit() else 0
    return load_family(name, seed=seed)


def profile_cmd(
    family: FamilyDir = "tiny",
    members: str = typer.Option("", help="Comma-separated members to time (default: all of the family's)."),
    batch_sizes: str = typer.Option("1,2,4,8", help="Comma-separated batch sizes (chains per batched step)."),
    steps: int = typer.Option(5, help="Timed steps per batch size (median reported, after 2 warm-up steps)."),
    kind: str = typer.Option("edge", help="'edge' (batched server) or 'device' (one user's device)."),
    name: str = typer.Option("measured", help="Profile name written into the file."),
    out: Path = typer.Option(Path("out/profile.json"), help="Where to write the profile JSON."),
    max_batch: int = typer.Option(0, help="Edge memory limit (largest batch); default: largest measured."),
    step_power_w: float = typer.Option(0.0, help="Device power while denoising, W (not measurable here; 0 = omit)."),
    radio_power_w: float = typer.Option(0.0, help="Device radio power, W (0 = omit)."),
    device: TorchDevice = "cpu",
) -> None:
    """Measure per-step latency per member and batch size, and decode time; write a profile JSON."""
    sizes = int_list(batch_sizes, "--batch-sizes")
    check(bool(sizes) and all(b >= 1 for b in sizes), "--batch-sizes must be integers >= 1")
    check(steps >= 1, "--steps must be >= 1")
    check(kind in ("edge", "device"), f"--kind must be edge or device, got {kind!r}")
    check_device(device)

    # lazy: the CLI starts without torch; only this command loads what it runs
    import torch

    from relaydiff.bench.profile import measure_profile
    from relaydiff.engine.family import load_family
    from relaydiff.system.profiles import ProfileError, save_profile

    torch.manual_seed(0)
    try:
        fam = load_family(family, trace=True)  # time what the engine runs
        if device != "cpu":
            fam.to(device, torch.float16)
        names = [m.strip() for m in members.split(",") if m.strip()] or sorted(fam.members)
        with console.status(f"timing {', '.join(names)} at batch sizes {sizes}"):
            prof = measure_profile(fam, names, sizes, kind=kind, name=name, steps=steps,
                                   max_batch=max_batch or None, step_power_w=step_power_w or None,
                                   radio_power_w=radio_power_w or None)
        path = save_profile(prof, out)
    except (ValueError, ProfileError, OSError) as exc:
        fail(str(exc))
    console.print(f"wrote {path}")
    print(json.dumps(prof.to_dict(), indent=2))


def bench_engine_cmd(
    requests: int = typer.Option(16, help="Number of requests N."),
    steps: int = typer.Option(20, help="Steps per request."),
    max_batch: int = typer.Option(16, help="Largest batch (chains) of the executor."),
    stagger: int = typer.Option(1, help="Executor steps between two arrivals."),
    family: FamilyDir = "tiny",
    device: TorchDevice = "cpu",
    dtype: str = typer.Option("fp32", help="fp32 | fp16 | bf16."),
    relay: bool = typer.Option(False, help="Relay plans (first member to T/2, then the second) instead of one member."),
    threads: int = typer.Option(1, help="CPU threads for torch (1 keeps shared machines comparable)."),
    trace: Trace = True,
    as_json: JsonFlag = False,
    overhead: bool = typer.Option(False, help="Instead: the executor's step vs the bare U-Net forward of the same "
                                              "rows, per member and sampler, timed interleaved (min over rounds, "
                                              "spread over repeats; thread CPU time and wall time)."),
    batch: int = typer.Option(8, help="--overhead: chains in the batch (guidance 3: two U-Net rows each)."),
    samplers: str = typer.Option("ddim,euler,dpmpp_2m", help="--overhead: samplers to time, comma-separated."),
    rounds: int = typer.Option(10, help="--overhead: interleaved rounds (2 executor steps, then 2 forwards)."),
    repeats: int = typer.Option(3, help="--overhead: repeats (fresh chains each) that give the spread."),
    shapes: Path = typer.Option(None, help="--overhead: time a family with this reference config's member "
                                           "shapes and random weights (e.g. configs/reference_16x16.json) "
                                           "instead of --family."),
) -> None:
    """Sequential (one request at a time) vs continuous batching, same machine, same run; or, with
    --overhead, what the executor adds to the U-Net forward per step."""
    # lazy: the CLI starts without torch; only this command loads what it runs
    from relaydiff.bench.engine import DTYPES, bench_engine, bench_engine_overhead

    check(requests >= 1, "--requests must be >= 1")
    check(steps >= 1, "--steps must be >= 1")
    check(max_batch >= 1, "--max-batch must be >= 1")
    check(stagger >= 0, "--stagger must be >= 0")
    check(threads >= 1, "--threads must be >= 1")
    check(dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_device(device)

    # lazy: the CLI starts without torch; only this command loads what it runs
    import torch

    from relaydiff.engine.family import FamilyError

    torch.set_num_threads(threads)
    if overhead:
        # lazy: the CLI starts without torch; only this command loads what it runs
        from relaydiff.engine.samplers import SAMPLERS

        names = tuple(n.strip() for n in samplers.split(",") if n.strip())
        check(bool(names) and all(n in SAMPLERS for n in names),
              f"--samplers must be a comma-separated subset of {', '.join(SAMPLERS)}, got {samplers!r}")
        check(batch >= 1 and rounds >= 1 and repeats >= 1, "--batch, --rounds and --repeats must be >= 1")
        check(shapes is None or shapes.is_file(), f"--shapes: no such file: {shapes}")
        try:
            result = bench_engine_overhead(family=family, batch=batch, samplers=names, rounds=rounds, repeats=repeats,
                                           shapes=None if shapes is None else str(shapes), device=device, dtype=dtype,
                                           trace=trace)
        except (FamilyError, ValueError) as exc:
            fail(str(exc))
        if as_json:
            print(json.dumps(result))
            return
        # lazy: the CLI starts without torch; only this command loads what it runs
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"engine overhead: executor step / bare forward, {result['family']} "
                            f"{result['latent_shape']}, batch {batch}; {result['hardware']}")
        for col in ("member", "sampler", "rows", "clock", "ratio min", "median", "max", "executor ms", "forward ms"):
            table.add_column(col)
        for r in result["results"]:
            for clock in result["clocks"]:
                m = r[clock]
                table.add_row(r["member"], r["sampler"], str(r["rows"]), clock,
                              *(f"{m['ratio'][k]:.3f}" for k in ("min", "median", "max")),
                              f"{m['executor_step_ms']['min']:.2f}", f"{m['bare_forward_ms']['min']:.2f}")
        Console().print(table)
        return
    try:
        result = bench_engine(family=family, n_requests=requests, steps=steps, max_batch=max_batch, stagger=stagger,
                              device=device, dtype=dtype, relay=relay, trace=trace)
    except (FamilyError, ValueError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(result))
    else:
        # lazy: the CLI starts without torch; only this command loads what it runs
        from rich.console import Console
        from rich.table import Table

        table = Table(title="engine: sequential vs continuous batching")
        for k in result:
            table.add_column(k)
        table.add_row(*[str(v) for v in result.values()])
        Console().print(table)


def register(app: typer.Typer, bench: typer.Typer, train: typer.Typer) -> None:
    app.command("generate")(generate_cmd)
    app.command("resume")(resume_cmd)
    app.command("profile")(profile_cmd)
    bench.command("engine")(bench_engine_cmd)
