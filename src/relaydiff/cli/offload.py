"""Offloading commands: train offload (DRL + convex), simulate, bench offload."""

from __future__ import annotations

import json

import typer

from relaydiff.cli.errors import check, console, fail, int_list
from relaydiff.cli.options import JsonFlag, RunSeed


def train_offload_cmd(
    out: str = typer.Option("runs/offload_ppo", help="Output folder (checkpoint/, best.*, history.json)."),
    scenario: str = typer.Option("default,congested", help="Scenario names or paths, comma-separated (each round picks one); used with --families none."),
    families: str = typer.Option("training", help="Families each round draws one of (domain randomization): 'training' (the shipped policy's mix), 'none' (use --scenario) or names, comma-separated."),
    timesteps: int = typer.Option(250_000, help="Total environment steps (a resumed run continues to this)."),
    seed: RunSeed = 0,
    n_min: int = typer.Option(3, help="Fewest users per training round."),
    n_max: int = typer.Option(300, help="Most users per training round (log-uniform in between)."),
    checkpoint_every: int = typer.Option(25_000, help="Steps between checkpoints and validations."),
    bc_rounds: int = typer.Option(3000, help="Rounds of teacher imitation before PPO (0 = pure PPO)."),
    bc_teacher: str = typer.Option("local_search", help="Imitation teacher: local_search or greedy."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint."),
    install: bool = typer.Option(False, "--install", help="Copy the best policy over the shipped one when done."),
) -> None:
    """Train the DRL + convex policy (MaskablePPO on the round MDP), checkpointed and resumable."""
    # lazy: the CLI starts without torch; only this command loads what it runs
    import shutil

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from relaydiff.sched.drl.policy import DEFAULT_POLICY
    from relaydiff.sched.drl.train import DRLConfig, train as run_train
    from relaydiff.sim.families import TRAINING_FAMILIES

    fams = {"training": ",".join(TRAINING_FAMILIES), "none": ""}.get(families.strip(), families)
    try:
        cfg = DRLConfig(scenario=scenario, families=fams, total_timesteps=timesteps, seed=seed, n_min=n_min, n_max=n_max,
                        checkpoint_every=checkpoint_every, bc_rounds=bc_rounds, bc_teacher=bc_teacher)
    except ValueError as exc:
        fail(str(exc))
    with Progress(TextColumn("[bold]train offload"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TextColumn("{task.fields[val]}"), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("train", total=timesteps, val="")

        def on_progress(step: int, total: int, rec: dict) -> None:
            if rec:
                bar.update(task, completed=step, val=f"validation: {rec['vs_greedy_mean']:.4f} x greedy")
            elif step % 256 == 0:
                bar.update(task, completed=step)

        try:
            last = run_train(cfg, out, resume=resume, on_progress=on_progress)
        except (FileExistsError, FileNotFoundError, ValueError) as exc:
            fail(str(exc))
    console.print(f"last validation: {last}")
    if install:
        for ext in (".safetensors", ".json"):
            shutil.copyfile(f"{out}/best{ext}", DEFAULT_POLICY.with_suffix(ext))
        console.print(f"installed {out}/best.* as {DEFAULT_POLICY}")


def simulate_cmd(
    scenario: str = typer.Argument(..., help="Scenario name (shipped) or YAML/JSON path."),
    policy: list[str] = typer.Option(["drl", "greedy"], "--policy", "-p", help="Solver name; repeat for several."),
    out: str = typer.Option("out/simulate", help="Folder for rounds.csv, summary.json and the PNG plots."),
    rounds: int = typer.Option(60, help="Rounds to simulate."),
    population: int = typer.Option(200, help="Users in the cell (each round draws its requests from them)."),
    arrival_mean: float | None = typer.Option(None, help="Mean requests per round (default: the scenario's n_users)."),
    n_max: int = typer.Option(64, help="Most requests in one round (arrivals are capped at it)."),
    seed: int = typer.Option(0, help="Seed: the same rounds for every policy."),
) -> None:
    """Run policies against a multi-round scenario (arrivals, capacity, fading); write CSV/JSON/PNG."""
    # lazy: the CLI starts without torch; only this command loads what it runs
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from relaydiff.bench.simulate import simulate
    from relaydiff.sim.scenario_env import Dynamics
    from relaydiff.system.scenario import ScenarioError, load_scenario

    try:
        dyn = Dynamics(rounds=rounds, population=population, arrival_mean=arrival_mean, n_max=n_max)
    except ValueError as exc:
        fail(str(exc))
    try:
        sc = load_scenario(scenario)
    except ScenarioError as exc:
        fail(f"SCENARIO: {exc}")
    with Progress(TextColumn("[bold]simulate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("rounds", total=rounds * len(policy))
        try:
            summary, paths = simulate(sc, list(policy), out, dyn, seed, on_round=lambda: bar.advance(task))
        except ValueError as exc:
            fail(str(exc))
    for p in paths:
        console.print(f"wrote {p}")
    print(json.dumps(summary["policies"], indent=2))


def bench_offload_cmd(
    as_json: JsonFlag = False,
    scenario: str = typer.Option("default", help="Scenario the rounds are drawn from."),
    seed: RunSeed = 0,
    rounds: int = typer.Option(10, help="Rounds per N in the optimality part."),
    scale_rounds: int = typer.Option(5, help="Rounds per N in the scaling part."),
    sizes: str = typer.Option("5,10,20,30", help="N values of the optimality part (exact MILP)."),
    scale_sizes: str = typer.Option("100,1000", help="N values of the scaling part."),
    families: str = typer.Option("all", help="Held-out families, comma-separated, 'all' or 'none'."),
    family_sizes: str = typer.Option("7,20,200", help="N values of each family (exact MILP as reference up to N = 30)."),
    family_rounds: int = typer.Option(5, help="Rounds per family and N."),
    policy: str = typer.Option("", help="A candidate DRL policy (PATH of PATH.json + PATH.safetensors) for drl and drl+ls; default the shipped one."),
    plots: str = typer.Option("", help="Write the PNG plots (gap to exact per family; lost gain vs time) into this folder."),
    from_json: str = typer.Option("", help="Only redraw the plots from this JSON of record (no bench run); needs --plots."),
) -> None:
    """Optimality (vs the exact MILP, plain ratio and share of the possible gain), speed, and held-out families: one JSON object."""
    # lazy: the CLI starts without torch; only this command loads what it runs
    from relaydiff.bench.offload import plot_offload, run
    from relaydiff.sim.families import family_names

    if from_json:
        check(bool(plots), "--from-json only redraws the plots: give --plots DIR")
        try:
            result = json.loads(open(from_json).read())
        except (OSError, ValueError) as exc:
            fail(f"--from-json: cannot read {from_json}: {exc}")
        for p in plot_offload(result, plots):
            console.print(f"wrote {p}")
        return
    # lazy: the CLI starts without torch; only this command loads what it runs
    from relaydiff.system.scenario import ScenarioError, load_scenario

    opt, scl = tuple(int_list(sizes, "--sizes")), tuple(int_list(scale_sizes, "--scale-sizes"))
    fam_n = tuple(int_list(family_sizes, "--family-sizes"))
    check(all(n >= 1 for n in opt + scl + fam_n), "--sizes, --scale-sizes and --family-sizes must be integers >= 1")
    check(rounds >= 1 and scale_rounds >= 1 and family_rounds >= 1, "--rounds, --scale-rounds and --family-rounds must be >= 1")
    if families.strip() == "all":
        fams = family_names()
    elif families.strip() == "none":
        fams = []
    else:
        fams = [f.strip() for f in families.split(",") if f.strip()]
        unknown = [f for f in fams if f not in family_names()]
        check(not unknown, f"--families: unknown {', '.join(unknown)}; available: {', '.join(family_names())}, all, none")
    try:
        sc = load_scenario(scenario)
    except ScenarioError as exc:
        fail(str(exc))
    if policy:
        # lazy: the CLI starts without torch; only this command loads what it runs
        from relaydiff.sched.drl.policy import PolicyError, load_policy

        try:
            load_policy(policy)
        except PolicyError as exc:
            fail(str(exc))
    with console.status("bench offload") as status:
        result = run(sc, seed, opt, rounds, scl, scale_rounds,
                     on_progress=None if as_json else (lambda msg: status.update(msg)),
                     families=fams, family_sizes=fam_n, family_rounds=family_rounds, policy=policy or None)
    print(json.dumps(result, indent=None if as_json else 2))
    if plots:
        for p in plot_offload(result, plots):
            console.print(f"wrote {p}")


def register(app: typer.Typer, bench: typer.Typer, train: typer.Typer) -> None:
    app.command("simulate")(simulate_cmd)
    bench.command("offload")(bench_offload_cmd)
    train.command("offload")(train_offload_cmd)
