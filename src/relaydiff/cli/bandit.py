"""Relay bandit commands: `relaydiff bench bandit`, `relaydiff bandit live` and `relaydiff bandit pool`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

from relaydiff.cli.errors import check, console, fail
from relaydiff.cli.options import JsonFlag, JsonOut, SharedThreads, save_json

bandit_app = typer.Typer(no_args_is_help=True, help="The relay contextual bandit (RISE): live runs on the engine.")


def _check_alpha(alpha: float) -> None:
    """One rule for every ``--alpha``: a finite number >= 0 (0: no exploration bonus)."""
    check(math.isfinite(alpha) and alpha >= 0, f"--alpha must be a finite number >= 0, got {alpha}")


def bench_bandit_cmd(
    scenarios: str = typer.Option("stationary,complexity_shift,network_degradation,load_spike",
                                  help="Relay scenarios (scenarios/relay/ names or YAML paths), comma-separated; "
                                       "the first is the stream of the top-level figures."),
    seeds: int = typer.Option(3, help="Seeds per scenario (means over seeds)."),
    requests: int = typer.Option(0, help="Requests per stream (0: each scenario's own; phases scale along)."),
    alpha: float = typer.Option(0.1, help="Exploration alpha of LinUCB, shared LinUCB and MABWiser LinUCB."),
    l2: float = typer.Option(0.1, help="Ridge l2 of every linear policy and the peers."),
    peers: bool = typer.Option(True, help="Run MABWiser's LinUCB and LinTS (needs the 'bench' extra)."),
    jobs: int = typer.Option(2, help="Processes over the (scenario, seed) streams."),
    plots: Path = typer.Option(None, help="Write the PNG plots into this folder."),
    out: JsonOut = None,
    as_json: JsonFlag = False,
) -> None:
    """Relay bandits vs MABWiser, baselines and the oracle on simulated request streams (defaults: < 10 min on 2 cores)."""
    # lazy: the CLI starts without torch; only this command loads what it runs
    from relaydiff.system.relay_scenario import load_relay_scenario
    from relaydiff.system.scenario import ScenarioError

    check(seeds >= 1 and requests >= 0 and jobs >= 1, "--seeds and --jobs must be >= 1, --requests >= 0")
    _check_alpha(alpha)
    check(l2 > 0, "--l2 must be > 0")
    names = tuple(s.strip() for s in scenarios.split(",") if s.strip())
    check(bool(names), "--scenarios needs at least one scenario")
    try:
        for name in names:
            load_relay_scenario(name)
    except ScenarioError as exc:
        fail(str(exc))
    if peers:
        try:
            # lazy: MABWiser is optional (the bench extra): checked before the bench runs
            import mabwiser  # noqa: F401
        except ImportError:
            fail("--peers needs mabwiser: pip install 'relaydiff[bench]' (or pass --no-peers)")
    # lazy: the CLI starts without torch; only this command loads what it runs
    import numpy as np
    import torch

    from relaydiff.bench.bandit import BanditBenchConfig, bench_bandit
    from relaydiff.engine.profile import hardware
    from relaydiff.serve.bandit_prompts import calibration_featurizer, prompt_pool

    torch.set_num_threads(1)
    cfg = BanditBenchConfig(scenarios=names, seeds=seeds, requests=requests or None, alpha=alpha, l2=l2, peers=peers,
                            jobs=jobs)
    featurizer = calibration_featurizer(0)
    pool = prompt_pool(featurizer, cfg.pool_per_class, seed=0)
    result = bench_bandit(cfg, pool, say=lambda s: console.print(s, highlight=False), plot_dir=plots)
    result = {"requests": result.pop("requests"), "seeds": result.pop("seeds"),
              "hardware": f"{hardware()}; shared host, niced", **result}
    text = json.dumps(result, indent=1, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    save_json(text, out)
    if as_json:
        print(text)
    else:
        for name, a in result["algorithms"].items():
            console.print(f"{name:24s} reward {a['reward_mean']:.4f}  x oracle {a['reward_ratio_to_oracle']:.3f}  "
                          f"regret {a['regret']:8.2f}  decide {a['decide_us_median']:7.1f} us", highlight=False)
        console.print(f"targets: {result['targets']}")


def bandit_live_cmd(
    family: str = typer.Option("reference", help="Model family ('reference' or a family directory)."),
    requests: int = typer.Option(60, help="Requests in the live stream."),
    scenario: str = typer.Option("stationary", help="Relay scenario the users come from."),
    rate: float = typer.Option(0.0, help="Arrivals per second (0: the scenario's)."),
    algorithm: str = typer.Option("linucb_shared", help="linucb_shared (one model over arm-context features) | "
                                                         "linucb | lints | egreedy | swlinucb."),
    alpha: float = typer.Option(None, show_default="0.1",
                                help="Exploration alpha of the LinUCB policies (linucb_shared, linucb, swlinucb); "
                                     "lints and egreedy keep their own."),
    warm_requests: int = typer.Option(3000, help="Simulated requests to train on before going live (0: cold)."),
    state: Path = typer.Option(None, help="Start from this saved bandit state (.json/.safetensors) instead."),
    save_state: Path = typer.Option(None, help="Save the bandit's state here after the live run."),
    compare_fixed: bool = typer.Option(True, help="Also serve the same stream with every fixed arm."),
    seed: int = typer.Option(0, help="Seed of the stream (users, prompts, noise)."),
    report: Path = typer.Option(Path("runs/bandit_live"), help="Folder for bandit_live.json and bandit_live.png."),
    threads: SharedThreads = 1,
    cpu_clock: bool = typer.Option(True, "--cpu-clock/--wall-clock",
                                   help="Time compute by this thread's CPU time (needs --threads 1; other jobs on a "
                                        "shared host then do not count) or by wall time."),
    recalibrate: bool = typer.Option(True, help="Re-measure this machine's small-member step after each device "
                                                "segment (the device scale follows the host's speed; else: once)."),
) -> None:
    """Serve a request stream through the real engine with the relay bandit choosing each request's plan."""
    # lazy: the CLI starts without torch; only this command loads what it runs
    from relaydiff.engine.family import FamilyError
    from relaydiff.sched.bandit import BanditError
    from relaydiff.serve.bandit_live import UCB_POLICIES, LiveConfig, run_live
    from relaydiff.system.scenario import ScenarioError

    check(requests >= 1 and warm_requests >= 0 and rate >= 0, "--requests must be >= 1, --warm-requests and --rate >= 0")
    check(threads == 1 or not cpu_clock, "--cpu-clock times one thread: use --threads 1 or --wall-clock")
    check(algorithm in ("linucb_shared", "linucb", "lints", "egreedy", "swlinucb"), f"--algorithm: unknown {algorithm!r}")
    if alpha is not None:
        _check_alpha(alpha)
        check(algorithm in UCB_POLICIES, f"--alpha: {algorithm} has no alpha (the LinUCB policies: "
                                          f"{', '.join(UCB_POLICIES)})")
        check(state is None, "--alpha: a bandit loaded with --state keeps the alpha it was made with")
    cfg = LiveConfig(family=family, requests=requests, seed=seed, scenario=scenario, arrival_rate_hz=rate or None,
                     algorithm=algorithm, alpha=LiveConfig.alpha if alpha is None else alpha, warm_requests=warm_requests, state=str(state) if state else None,
                     compare_fixed=compare_fixed, threads=threads, save_state=str(save_state) if save_state else None,
                     cpu_clock=cpu_clock, recalibrate=recalibrate)
    try:
        out = run_live(cfg, say=lambda s: console.print(s, highlight=False), report_dir=report)
    except (BanditError, ScenarioError, FamilyError, ValueError) as exc:
        fail(str(exc))
    pol = out["policies"]
    bandit = next(iter(pol))
    console.print(f"per-arm counts ({bandit}): " + ", ".join(f"{k} {v}" for k, v in pol[bandit]["arm_counts"].items()
                                                           if v), highlight=False)
    for name, p in pol.items():
        vs = p.get("bandit_minus_this")
        extra = f"  (bandit - this: {vs['mean']:+.4f} +- {vs['se']:.4f} se)" if vs and vs["se"] is not None else ""
        console.print(f"{name:24s} mean utility {p['mean_utility']:.4f}  quality {p['mean_quality']:.3f}  "
                      f"latency {p['mean_latency_s']:.2f} s{extra}", highlight=False)
    if cfg.compare_fixed:
        _print_verdict(out)
    console.print(f"report: {', '.join(out.get('report', []))}")
    if out.get("saved_state"):
        console.print(f"bandit state: {out['saved_state']} (+ .safetensors)")


def _print_verdict(out: dict) -> None:
    console.print(f"bandit above every fixed arm on the mean: {out['bandit_mean_above_every_fixed_arm']}; "
                  f"beyond the noise (every paired 95% interval above 0): {out['bandit_beats_every_fixed_arm']}")
    vs = out.get("bandit_vs_best_fixed")
    if vs and vs["ci95"] is not None:
        console.print(f"bandit - best fixed arm ({vs['best_fixed']}): {vs['bandit_minus_best_mean']:+.4f}, 95% CI "
                      f"[{vs['ci95'][0]:+.4f}, {vs['ci95'][1]:+.4f}] (paired, same requests)", highlight=False)


def bandit_pool_cmd(
    reports: list[Path] = typer.Argument(..., help="bandit_live.json files of the same protocol, other seeds."),
    out: JsonOut = None,
    as_json: JsonFlag = False,
) -> None:
    """Several `bandit live` streams (other seeds) as one paired sample: the bandit against every fixed arm."""
    # lazy: the CLI starts without torch; only this command loads what it runs
    from relaydiff.serve.bandit_live import pool_reports

    loaded = []
    for path in reports:
        try:
            loaded.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            fail(f"{path}: cannot read the report ({exc})")
    try:
        pooled = pool_reports(loaded)
    except ValueError as exc:
        fail(str(exc))
    pooled["reports"] = [str(p) for p in reports]
    text = json.dumps(pooled, allow_nan=False)
    save_json(text, out)
    if as_json:
        print(text)
        return
    console.print(f"{pooled['requests']} requests from seeds {pooled['seeds']}", highlight=False)
    for name, mean in pooled["mean_utility"].items():
        row = pooled["by_arm"].get(name)
        extra = (f"  bandit - this {row['mean']:+.4f} [{row['ci95'][0]:+.4f}, {row['ci95'][1]:+.4f}]"
                 if row and row["ci95"] else "")
        console.print(f"{name:24s} mean utility {mean:.4f}{extra}", highlight=False)
    _print_verdict(pooled)


def register(app: typer.Typer, bench: typer.Typer, train: typer.Typer) -> None:
    bench.command("bandit")(bench_bandit_cmd)
    bandit_app.command("live")(bandit_live_cmd)
    bandit_app.command("pool")(bandit_pool_cmd)
    app.add_typer(bandit_app, name="bandit")
