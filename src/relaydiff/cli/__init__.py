"""The `relaydiff` command line.

The top layer: commands import whatever they run (bench, demo, serve, sched, engine ...), nothing
imports them. Heavy imports (torch, diffusers) happen inside the commands so that
``relaydiff --help`` stays fast. Every user mistake goes through :func:`relaydiff.cli.errors.fail`:
one ``error: ...`` line on stderr and exit status 2, never a traceback.

How to add a command group: write ``relaydiff/cli/<area>.py`` with plain functions (typer
options as defaults) and a ``register(app, bench, train)`` that attaches them, e.g.
``app.command("serve")(serve_cmd)`` or ``bench.command("bandit")(bench_bandit_cmd)``; then add
the module to ``GROUPS`` below. A group of subcommands of its own (``relaydiff serve edge``) is a
``typer.Typer(...)`` the module builds and attaches with ``app.add_typer(group, name="serve")``.
"""

from __future__ import annotations

import typer

from relaydiff.cli import bandit, demo, engine, offload, qoe, quality, reference, serve

# Help is plain text (rich_markup_mode=None): the plan grammar member[+adapter][@node]:start-end
# keeps its brackets, which rich markup would take for tags and drop.
app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None, help=__doc__.splitlines()[0])
bench_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Measurements that print one JSON object.")
train_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Training jobs (checkpointed, resumable).")
app.add_typer(bench_app, name="bench")
app.add_typer(train_app, name="train")

# Every command group, in the order `relaydiff --help` lists their commands.
GROUPS = (demo, engine, offload, reference, quality, bandit, serve, qoe)
for _group in GROUPS:
    _group.register(app, bench_app, train_app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
