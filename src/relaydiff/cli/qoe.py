"""QoE commands (RLLI, issue 15): bench qoe (G-DDPG vs DDPG on the shared-denoising QoE round) and
qoe live (one round of a trained policy on the real engine)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from relaydiff.cli.errors import check, console, fail
from relaydiff.cli.options import JsonFlag, SharedStepsRule


def bench_qoe_cmd(
    seeds: int = typer.Option(5, help="Training seeds per algorithm (the gain's CI is over seeds)."),
    steps: int = typer.Option(2000, help="Environment steps (rounds) per QoE training run."),
    waterfill_steps: int = typer.Option(3000, help="Environment steps per water-filling training run."),
    eval_rounds: int = typer.Option(64, help="Fixed evaluation rounds (the same for every algorithm)."),
    k_min: int = typer.Option(5, help="Fewest users in a round."),
    k_max: int = typer.Option(20, help="Most users in a round."),
    scenario: str = typer.Option("congested", help="Scenario (shipped name or YAML/JSON path) of links, devices and edge."),
    sb3: bool = typer.Option(True, help="Also train Stable-Baselines3's DDPG, TD3 and SAC as library references."),
    workers: int = typer.Option(1, help="Training processes (each one torch thread; 2 on a free 2-core machine)."),
    learned_shared_steps: bool = typer.Option(
        False, "--learned-shared-steps",
        help="The actors also set each group's shared steps (default: the env picks them exactly for the actors' shares)."),
    shared_steps_rule: SharedStepsRule = "exact",
    bound: bool = typer.Option(True, help="Also find each evaluation round's best allocation (an upper bound; ~30 s)."),
    action_penalty: float | None = typer.Option(
        None, help="Weight of the actors' pre-squash penalty (default: RLConfig's; 0: the plain -Q loss)."),
    sharing_table: Path = typer.Option(None, help="A quality.json whose shared-prefix curves the env reads "
                                                  "(default: the shipped family's)."),
    out: Path = typer.Option(Path("out/bench_qoe"), help="Folder for the plots and report.json."),
    resume: bool = typer.Option(False, "--resume", help="Reuse the runs a cut-short bench left in OUT/runs (same settings)."),
    as_json: JsonFlag = False,
) -> None:
    """G-DDPG vs DDPG (and SB3 references, heuristics) on the QoE round, after the water-filling check."""
    # lazy: the CLI starts without torch; only this command loads what it runs
    from relaydiff.system.scenario import ScenarioError, load_scenario

    try:
        load_scenario(scenario)
    except ScenarioError as exc:
        fail(str(exc))
    # lazy: the CLI starts without torch; only this command loads what it runs
    from relaydiff.bench.qoe import QoEBenchConfig, bench_qoe

    try:
        cfg = QoEBenchConfig(seeds=seeds, steps=steps, waterfill_steps=waterfill_steps, eval_rounds=eval_rounds,
                             k_min=k_min, k_max=k_max, scenario=scenario, sb3=sb3, workers=workers, out=str(out),
                             resume=resume, learned_shared_steps=learned_shared_steps,
                             shared_steps_rule=shared_steps_rule, bound=bound,
                             sharing_table=str(sharing_table) if sharing_table else None,
                             **({} if action_penalty is None else {"action_penalty": action_penalty}))
    except ValueError as exc:
        fail(str(exc))
    check(k_max <= 64, "--k-max must be <= 64")
    report = bench_qoe(cfg, log=lambda s: console.print(s, highlight=False))
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


qoe_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                      help="Shared denoising with personality QoE agents (RLLI): live rounds on the engine.")


def qoe_live_cmd(
    policy: Path = typer.Option(Path("out/bench_qoe/policies/gddpg_seed0"), help="A saved policy folder (bench qoe writes them)."),
    family: str = typer.Option("reference", help="Model family (shipped name or directory)."),
    seed: int = typer.Option(0, help="Seed of the round (users, prompts, links) and of the noise."),
    k_min: int = typer.Option(5, help="Fewest users in the round."),
    k_max: int = typer.Option(20, help="Most users (must match the policy's training)."),
    scenario: str = typer.Option("congested", help="Scenario of links, devices and edge."),
    llm: bool = typer.Option(False, "--llm", help="Score with the LLM agent (RELAYDIFF_LLM_BASE_URL, _MODEL, _API_KEY)."),
    shared_steps_rule: SharedStepsRule = "exact",
    out: Path = typer.Option(Path("out/qoe_live"), help="Folder for report.json and the group images."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """One QoE round: the policy's decisions, shared prefixes and continuations on the engine, agents' scores."""
    check((policy / "policy.json").is_file(), f"no saved policy in {policy} (run relaydiff bench qoe, or pass --policy)")
    check(1 <= k_min <= k_max, "--k-min must be >= 1 and <= --k-max")
    # lazy: the CLI starts without torch; only this command loads what it runs
    from relaydiff.bench.qoe_live import LiveQoEConfig, run_qoe_live
    from relaydiff.engine.family import FamilyError
    from relaydiff.sim.agents_llm import LLMConfigError
    from relaydiff.system.scenario import ScenarioError

    cfg = LiveQoEConfig(policy=str(policy), family=family, seed=seed, k_min=k_min, k_max=k_max, scenario=scenario,
                        llm=llm, shared_steps_rule=shared_steps_rule, out=str(out))
    try:
        report = run_qoe_live(cfg, say=lambda s: console.print(s, highlight=False))
    except (ValueError, FamilyError, LLMConfigError, ScenarioError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        console.print(f"{report['users']} users in {len(report['groups'])} groups: QoE {report['qoe']:.1f} "
                      f"(simulator predicted {report['qoe_predicted']:.1f}), U-Net evaluations saved "
                      f"{100 * report['unet_evals_saved']:.0f}%, fidelity {report['fidelity_mean']:.3f}; report in {out}",
                      highlight=False)


def register(app: typer.Typer, bench: typer.Typer, train: typer.Typer) -> None:
    bench.command("qoe")(bench_qoe_cmd)
    qoe_app.command("live")(qoe_live_cmd)
    app.add_typer(qoe_app, name="qoe")
