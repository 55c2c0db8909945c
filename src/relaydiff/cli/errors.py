"""The one error path of the command line: ``error: <message>`` on stderr, exit status 2.

Messages are printed without rich markup, so text such as the plan grammar
``member[+adapter][@node]:start-end`` keeps its brackets.
"""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)


def fail(message: str) -> NoReturn:
    """End the command with one line, ``error: message``, and exit status 2."""
    console.print(f"[bold red]error:[/] {escape(str(message))}", soft_wrap=True)
    raise typer.Exit(2)


def check(condition: bool, message: str) -> None:
    """``fail(message)`` unless ``condition`` (argument checks, before any model loads)."""
    if not condition:
        fail(message)


def int_list(text: str, option: str) -> list[int]:
    """Comma-separated integers of an option, or a clear error naming the option."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{option} must be comma-separated integers, got {text!r}")
