"""Service commands: `relaydiff serve edge`, `relaydiff device run`, `relaydiff bench serve`."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import typer

from relaydiff.cli.errors import check, console, fail
from relaydiff.cli.options import FamilyDir, JsonFlag, JsonOut, TorchThreads, save_json

serve_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="The edge server (FastAPI + uvicorn).")
device_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="A device client of an edge server.")


def _check_row_workers(row_workers: int, ray: bool) -> None:
    """``serve edge`` and ``bench serve`` take the same option (their help texts differ on purpose)."""
    check(row_workers >= 1, "--row-workers must be >= 1")
    check(row_workers == 1 or not ray, "--row-workers is for one edge; with --ray each replica has one CPU")


def serve_edge_cmd(
    family: FamilyDir = "reference",
    host: str = typer.Option("127.0.0.1", help="Interface to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, help="TCP port."),
    tokens: Path = typer.Option(..., help="Tokens file: one 'client-id token' pair a line."),
    scheduler: str = typer.Option("local_search", help="Round solver: local_search (default: the best gain per time in bench offload), greedy, exact, drl, drl+ls, ...; or bandit (the relay contextual bandit, learning from each completion)."),
    scenario: str = typer.Option("default", help="Scenario of the edge and wireless cell the scheduler models."),
    db: Path = typer.Option(Path("relaydiff-jobs.sqlite"), help="SQLite store of accepted jobs (re-run on restart)."),
    steps: int = typer.Option(None, help="Default denoising steps of a job (default: the family's)."),
    max_batch: int = typer.Option(64, help="Chains per batched U-Net call."),
    max_queue: int = typer.Option(256, help="Unfinished jobs before new ones get 503."),
    rate: float = typer.Option(20.0, help="Job submissions per second per client (429 above)."),
    burst: int = typer.Option(40, help="Burst of submissions per client."),
    round_window: float = typer.Option(0.02, help="A round closes at most this many seconds after its first job ..."),
    round_gap: float = typer.Option(0.005, help="... or this many seconds after its latest (a lone job waits only "
                                                "this; >= --round-window: a fixed window)."),
    fetch_timeout: float = typer.Option(10.0, help="Seconds a device has to fetch its handoff (then fallback)."),
    report_timeout: float = typer.Option(30.0, help="Seconds a device has to report after fetching (then fallback)."),
    status_thumbnails: bool = typer.Option(False, help="Show finished images on the public status page."),
    share_prefix: bool = typer.Option(True, help="Similar prompts of a round share their first edge steps."),
    threads: TorchThreads = 0,
    row_workers: int = typer.Option(1, help="Run each U-Net call's rows in this many parts on as many threads "
                                            "(one core each; results equal to ~1e-6, not bit for bit; docs/service.md)."),
    trace: bool = typer.Option(False, help="Run the U-Nets as TorchScript traces (the same images, faster on a CPU: "
                                           "a lone 16x16 job 250 against 299 ms; each new shape traces once, in "
                                           "seconds; docs/service.md)."),
    ray: bool = typer.Option(False, "--ray", help="Serve on Ray Serve: an ingress and --replicas engine replicas "
                                                  "(the optional extra 'ray')."),
    replicas: int = typer.Option(2, help="With --ray: engine replicas, each with its own executor and store."),
    ray_address: str = typer.Option(None, help="With --ray: a running cluster ('auto' after `ray start`); "
                                               "default: a local Ray on this machine."),
) -> None:
    """Run the edge server: jobs are decided in rounds, edge segments batched, devices finish the rest."""
    check(1 <= port <= 65535, f"--port must be in 1..65535, got {port}")
    check(steps is None or steps >= 1, "--steps must be >= 1")
    check(max_batch >= 1 and max_queue >= 1 and burst >= 1 and rate > 0, "--max-batch, --max-queue, --burst and --rate "
          "must be positive")
    check(fetch_timeout > 0 and report_timeout > 0 and round_window >= 0 and round_gap >= 0,
          "timeouts must be > 0, --round-window and --round-gap >= 0")
    check(threads >= 0, "--threads must be >= 0")
    check(replicas >= 1, "--replicas must be >= 1")
    _check_row_workers(row_workers, ray)
    if ray:
        try:
            # lazy: the CLI starts without torch; only this command loads what it runs
            from relaydiff.serve.ray_app import build_ray_app, run_on_ray
        except ImportError:
            fail("--ray needs Ray Serve: pip install 'relaydiff[ray]'")
    # lazy: the CLI starts without torch; only this command loads what it runs
    import torch
    import uvicorn

    from relaydiff.engine.family import FamilyError, load_family
    from relaydiff.serve.app import create_app
    from relaydiff.serve.auth import TokenFileError, TokenTable
    from relaydiff.serve.edge import EdgeSettings
    from relaydiff.system.profiles import ProfileError
    from relaydiff.system.scenario import ScenarioError

    if threads:
        torch.set_num_threads(threads)
    try:
        table = TokenTable.from_file(tokens)
        fam = load_family(family, trace=trace)
        fam.row_workers = row_workers
        settings = EdgeSettings(scheduler=scheduler, scenario=scenario, db_path=str(db), default_steps=steps,
                                round_window_s=round_window, round_gap_s=round_gap, max_batch=max_batch,
                                max_queue=max_queue, rate_per_s=rate, burst=burst, fetch_timeout_s=fetch_timeout,
                                report_timeout_s=report_timeout, status_thumbnails=status_thumbnails,
                                share_prefix=share_prefix)
        app = build_ray_app(family, settings, table, replicas, threads=threads or 1, trace=trace) if ray else \
            create_app(fam, settings, table)
    except (TokenFileError, FamilyError, ScenarioError, ProfileError, ValueError, OSError) as exc:
        fail(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if ray:
        # lazy: Ray is optional (the ray extra); only --ray needs it
        from ray import serve

        run_on_ray(app, host, port, ray_address)
        console.print(f"edge on Ray Serve: {replicas} engine replicas of {fam.id}@{fam.version} behind "
                      f"http://{host}:{port}/ (Ctrl-C stops)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
        return
    console.print(f"edge: family {fam.id}@{fam.version}, scheduler {scheduler}, store {db}; http://{host}:{port}/docs")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def device_run_cmd(
    server: str = typer.Option(..., help="The edge server's URL, e.g. http://127.0.0.1:8000."),
    token: str = typer.Option(..., help="This client's bearer token."),
    prompt: str = typer.Option(..., help="What to draw."),
    seed: int = typer.Option(0, help="Seed of the chain's noise."),
    out: Path = typer.Option(Path("out/device.png"), help="Where to save the image (PNG)."),
    family: str = typer.Option("reference", help="The family this device holds (the server's)."),
    member: str = typer.Option(None, help="The member this device runs (default: the plan's)."),
    adapter: str = typer.Option(None, help="This user's style adapter."),
    device_class: str = typer.Option("phone-mid", help="This device's profile (what the scheduler assumes)."),
    steps: int = typer.Option(None, help="Denoising steps (default: the server's)."),
    timeout: float = typer.Option(120.0, help="Seconds any one wait may take."),
) -> None:
    """Submit a job, fetch the handoff, finish the chain here, report, save the image."""
    check(timeout > 0, "--timeout must be > 0")
    # lazy: the CLI starts without torch; only this command loads what it runs
    from relaydiff.engine.family import FamilyError, load_family
    from relaydiff.engine.handoff import HandoffError
    from relaydiff.serve.client import DeviceClient, ServiceError

    try:
        fam = load_family(family)
        with DeviceClient(server, token, fam, timeout_s=timeout) as client:
            result = client.run(prompt, seed, member=member, adapter=adapter, device_class=device_class, steps=steps)
    except (ServiceError, FamilyError, HandoffError, ValueError) as exc:
        fail(str(exc))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(result.png)
    job = result.job
    console.print(f"job {job['job_id']}: {job['kind']} plan {job['plan_text']}, finished by the {result.finished_by}"
                  f"{' (fallback)' if job['fallback'] else ''} in {result.latency_ms:.0f} ms -> {out}")


def bench_serve_cmd(
    clients: int = typer.Option(8, help="Concurrent device clients."),
    duration: float = typer.Option(30.0, help="Seconds of load."),
    dropout: float = typer.Option(0.1, help="Share of devices that vanish after taking their handoff."),
    family: str = typer.Option("tiny", help="'tiny', 'reference' or a family directory."),
    scheduler: str = typer.Option("local_search", help="The edge's round solver."),
    steps: int = typer.Option(None, help="Denoising steps of every job (default: the family's)."),
    restart: bool = typer.Option(True, help="Kill and restart the edge halfway."),
    pairs: int = typer.Option(6, help="Paired HTTP / in-process requests of the overhead calibration."),
    seed: int = typer.Option(0, help="Seed of the clients' prompts, seeds and dropouts."),
    out: JsonOut = None,
    as_json: JsonFlag = False,
    ray: bool = typer.Option(False, "--ray", help="Bench the edge on a local Ray Serve (127.0.0.1, the optional "
                                                  "extra 'ray') with --replicas engine replicas; no restart."),
    replicas: int = typer.Option(None, help="With --ray: engine replicas, one CPU each (default 1)."),
    round_gap: float = typer.Option(None, help="The edge's --round-gap (default: the edge's own)."),
    threads: int = typer.Option(1, help="torch threads of the edge and of the one-job server it is compared with "
                                        "(the same for both); the devices keep 1."),
    row_workers: int = typer.Option(1, help="The edge's --row-workers; the one-job server is timed with whole calls and "
                                            "with these row parts, and credited with the faster."),
    trace: bool = typer.Option(False, help="The edge's --trace, and the one-job server's and the devices' (the same "
                                           "for all)."),
) -> None:
    """The service under load and faults on loopback: lost jobs, latency, throughput, HTTP overhead."""
    check(clients >= 1 and duration > 0 and pairs >= 2, "--clients >= 1, --duration > 0 and --pairs >= 2 needed")
    check(0.0 <= dropout <= 1.0, f"--dropout must be in [0, 1], got {dropout}")
    check(replicas is None or ray, "--replicas needs --ray")
    check(replicas is None or replicas >= 1, "--replicas must be >= 1")
    check(round_gap is None or round_gap >= 0, "--round-gap must be >= 0")
    check(threads >= 1, "--threads must be >= 1")
    check(threads <= 1 or not ray, "--threads is for one edge; with --ray each replica has one thread")
    _check_row_workers(row_workers, ray)
    # lazy: the CLI starts without torch; only this command loads what it runs
    from relaydiff.bench.serve import run_serve_bench

    log = (lambda *a: None) if as_json else console.print
    try:
        report = run_serve_bench(family, clients, duration, dropout, scheduler, seed, steps, restart, pairs, log=log,
                                 ray_replicas=(replicas or 1) if ray else None, round_gap_s=round_gap,
                                 threads=threads, row_workers=row_workers, trace=trace)
    except RuntimeError as exc:
        fail(str(exc))
    text = json.dumps(report, indent=2)
    save_json(text, out)
    print(text)


def register(app: typer.Typer, bench: typer.Typer, train: typer.Typer) -> None:
    serve_app.command("edge")(serve_edge_cmd)
    device_app.command("run")(device_run_cmd)
    app.add_typer(serve_app, name="serve")
    app.add_typer(device_app, name="device")
    bench.command("serve")(bench_serve_cmd)
