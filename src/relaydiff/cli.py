"""The `relaydiff` command line.

Each area of the package registers its own commands (``register(app, bench, train)`` in its
``commands`` module) so that the areas stay independent; heavy imports happen inside the
commands so that ``relaydiff --help`` stays fast.
"""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])
bench_app = typer.Typer(no_args_is_help=True, help="Measurements that print one JSON object.")
train_app = typer.Typer(no_args_is_help=True, help="Training jobs (checkpointed, resumable).")
app.add_typer(bench_app, name="bench")
app.add_typer(train_app, name="train")


def _register_all() -> None:
    from relaydiff.engine import commands as engine_commands
    from relaydiff.models import commands as models_commands
    from relaydiff.sched import commands as sched_commands

    for module in (engine_commands, models_commands, sched_commands):
        module.register(app, bench_app, train_app)


_register_all()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
