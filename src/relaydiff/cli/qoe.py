"""QoE commands (RLLI, issue 15): bench qoe (G-DDPG vs DDPG on the shared-denoising QoE round)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from relaydiff.cli.errors import check, console, fail


def bench_qoe_cmd(
    seeds: int = typer.Option(5, help="Training seeds per algorithm (the gain's CI is over seeds)."),
    steps: int = typer.Option(3000, help="Environment steps (rounds) per QoE training run."),
    waterfill_steps: int = typer.Option(3000, help="Environment steps per water-filling training run."),
    eval_rounds: int = typer.Option(64, help="Fixed evaluation rounds (the same for every algorithm)."),
    k_min: int = typer.Option(5, help="Fewest users in a round."),
    k_max: int = typer.Option(20, help="Most users in a round."),
    scenario: str = typer.Option("congested", help="Scenario (shipped name or YAML/JSON path) of links, devices and edge."),
    sb3: bool = typer.Option(True, help="Also train Stable-Baselines3's DDPG, TD3 and SAC as library references."),
    workers: int = typer.Option(2, help="Training processes (each one torch thread)."),
    out: Path = typer.Option(Path("out/bench_qoe"), help="Folder for the plots and report.json."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """G-DDPG vs DDPG (and SB3 references, heuristics) on the QoE round, after the water-filling check."""
    from relaydiff.system.scenario import ScenarioError, load_scenario

    try:
        load_scenario(scenario)
    except ScenarioError as exc:
        fail(str(exc))
    from relaydiff.bench.qoe import QoEBenchConfig, bench_qoe

    try:
        cfg = QoEBenchConfig(seeds=seeds, steps=steps, waterfill_steps=waterfill_steps, eval_rounds=eval_rounds,
                             k_min=k_min, k_max=k_max, scenario=scenario, sb3=sb3, workers=workers, out=str(out))
    except ValueError as exc:
        fail(str(exc))
    check(k_max <= 64, "--k-max must be <= 64")
    report = bench_qoe(cfg, log=lambda s: console.print(s, highlight=False))
    report["hardware"]["note"] = "shared host, niced"
    text = json.dumps(report, indent=1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(text + "\n")
    if as_json:
        print(text)
    else:
        for name, a in report["algorithms"].items():
            console.print(f"{name:14s} QoE {a['qoe_mean']:8.2f} ± {a['qoe_std']:.2f}  decide {a['decide_ms']:.3f} ms",
                          highlight=False)
        console.print(f"G-DDPG vs DDPG: {report['gddpg_vs_ddpg']}; water-filling: {report['waterfill']}; "
                      f"sharing: {report['sharing']}; targets: {report['targets']}", highlight=False)


def register(app: typer.Typer, bench: typer.Typer, train: typer.Typer) -> None:
    bench.command("qoe")(bench_qoe_cmd)
