"""CLI commands of this area (registered by relaydiff.cli)."""

from __future__ import annotations

import typer


def register(app: typer.Typer, bench: typer.Typer, train: typer.Typer) -> None:
    """Add this area's commands to the CLI."""
