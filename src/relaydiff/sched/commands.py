"""CLI commands of this area (registered by relaydiff.cli)."""

from __future__ import annotations

import typer


def register(app: typer.Typer, bench: typer.Typer, train: typer.Typer) -> None:
    """Add this area's commands to the CLI."""
    _register_profile(app)
    _register_offload(app, bench, train)


# ---- offloading: DRL training, simulation, bench (issue 4, part B) ----------------------------
def _register_offload(app: typer.Typer, bench: typer.Typer, train: typer.Typer) -> None:
    @train.command("offload")
    def train_offload(
        out: str = typer.Option("runs/offload_ppo", help="Output folder (checkpoint/, best.*, history.json)."),
        scenario: str = typer.Option("default,congested", help="Scenario names or paths, comma-separated (each round picks one)."),
        timesteps: int = typer.Option(250_000, help="Total environment steps (a resumed run continues to this)."),
        seed: int = typer.Option(0, help="Seed of the PPO run and of the training rounds."),
        n_min: int = typer.Option(3, help="Fewest users per training round."),
        n_max: int = typer.Option(300, help="Most users per training round (log-uniform in between)."),
        checkpoint_every: int = typer.Option(25_000, help="Steps between checkpoints and validations."),
        bc_rounds: int = typer.Option(3000, help="Rounds of teacher imitation before PPO (0 = pure PPO)."),
        bc_teacher: str = typer.Option("local_search", help="Imitation teacher: local_search or greedy."),
        resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint."),
        install: bool = typer.Option(False, "--install", help="Copy the best policy over the shipped one when done."),
    ) -> None:
        """Train the DRL + convex policy (MaskablePPO on the round MDP), checkpointed and resumable."""
        import shutil

        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        from relaydiff.sched.drl import DEFAULT_POLICY, DRLConfig, train as run_train

        try:
                cfg = DRLConfig(scenario=scenario, total_timesteps=timesteps, seed=seed, n_min=n_min, n_max=n_max,
                            checkpoint_every=checkpoint_every, bc_rounds=bc_rounds, bc_teacher=bc_teacher)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        console = Console(stderr=True)
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
                raise typer.BadParameter(str(exc)) from None
        console.print(f"last validation: {last}")
        if install:
            for ext in (".safetensors", ".json"):
                shutil.copyfile(f"{out}/best{ext}", DEFAULT_POLICY.with_suffix(ext))
            console.print(f"installed {out}/best.* as {DEFAULT_POLICY}")

    @app.command("simulate")
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
        import json

        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from relaydiff.sim.scenario_env import Dynamics
        from relaydiff.sim.simulate import simulate
        from relaydiff.system.scenario import ScenarioError

        console = Console(stderr=True)
        try:
            dyn = Dynamics(rounds=rounds, population=population, arrival_mean=arrival_mean, n_max=n_max)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        with Progress(TextColumn("[bold]simulate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("rounds", total=rounds * len(policy))
            try:
                summary, paths = simulate(scenario, list(policy), out, dyn, seed, on_round=lambda: bar.advance(task))
            except ScenarioError as exc:
                raise typer.BadParameter(str(exc), param_hint="SCENARIO") from None
            except ValueError as exc:
                raise typer.BadParameter(str(exc)) from None
        for p in paths:
            console.print(f"wrote {p}")
        print(json.dumps(summary["policies"], indent=2))

    @bench.command("offload")
    def bench_offload(
        as_json: bool = typer.Option(False, "--json", help="Print only the JSON object."),
        scenario: str = typer.Option("default", help="Scenario the rounds are drawn from."),
        seed: int = typer.Option(0, help="Seed of the rounds."),
        rounds: int = typer.Option(10, help="Rounds per N in the optimality part."),
        scale_rounds: int = typer.Option(5, help="Rounds per N in the scaling part."),
        sizes: str = typer.Option("5,10,20,30", help="N values of the optimality part (exact MILP)."),
        scale_sizes: str = typer.Option("100,1000", help="N values of the scaling part."),
    ) -> None:
        """Optimality (vs the exact MILP) and speed of every solver: one JSON object."""
        import json

        from rich.console import Console

        from relaydiff.bench.offload import run

        try:
            opt = tuple(int(x) for x in sizes.split(",") if x.strip())
            scl = tuple(int(x) for x in scale_sizes.split(",") if x.strip())
        except ValueError:
            raise typer.BadParameter("sizes must be comma-separated integers") from None
        console = Console(stderr=True)
        with console.status("bench offload") as status:
            result = run(scenario, seed, opt, rounds, scl, scale_rounds,
                         on_progress=None if as_json else (lambda msg: status.update(msg)))
        print(json.dumps(result, indent=None if as_json else 2))


# ---- profile: measure the engine on this machine (issue 4, part A) -----------------------------
def _register_profile(app: typer.Typer) -> None:
    @app.command("profile")
    def profile_cmd(
        family: str = typer.Option("tiny", help="Family to time: 'tiny', 'reference' or a diffusers-format directory."),
        members: str = typer.Option("", help="Comma-separated members to time (default: all of the family's)."),
        batch_sizes: str = typer.Option("1,2,4,8", help="Comma-separated batch sizes (chains per batched step)."),
        steps: int = typer.Option(5, help="Timed steps per batch size (median reported, after 2 warm-up steps)."),
        kind: str = typer.Option("edge", help="'edge' (batched server) or 'device' (one user's device)."),
        name: str = typer.Option("measured", help="Profile name written into the file."),
        out: str = typer.Option("out/profile.json", help="Where to write the profile JSON."),
        max_batch: int = typer.Option(0, help="Edge memory limit (largest batch); default: largest measured."),
        step_power_w: float = typer.Option(0.0, help="Device power while denoising, W (not measurable here; 0 = omit)."),
        radio_power_w: float = typer.Option(0.0, help="Device radio power, W (0 = omit)."),
        device: str = typer.Option("cpu", help="torch device to run on ('cpu', 'cuda')."),
    ) -> None:
        """Measure per-step latency per member and batch size, and decode time; write a profile JSON."""
        import json

        import torch
        from rich.console import Console

        from relaydiff.engine.family import load_family
        from relaydiff.system.measure import measure_profile
        from relaydiff.system.profiles import save_profile

        console = Console(stderr=True)
        try:
            sizes = [int(x) for x in batch_sizes.split(",") if x.strip()]
        except ValueError:
            raise typer.BadParameter("batch sizes must be comma-separated integers", param_hint="--batch-sizes") from None
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
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        path = save_profile(prof, out)
        console.print(f"wrote {path}")
        print(json.dumps(prof.to_dict(), indent=2))
