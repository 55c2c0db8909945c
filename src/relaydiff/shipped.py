"""Shipped assets by name, or any file by path: one resolver and one JSON reader, with clear errors.

Profiles, scenarios, quality tables, policies, families and the judge all accept either the name
of something relaydiff ships or a path; a missing or malformed file ends in one message naming the
file (raised as the caller's own error class), never a traceback from deep inside a parser.
Standard library only: every layer may use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def shipped_names(folder: Path, suffix: str) -> list[str]:
    """Names of the files ``*{suffix}`` shipped in ``folder``."""
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}"))


def resolve(name_or_path: str | Path, folder: Path, suffix: str, what: str, error: type[Exception]) -> Path:
    """A bare name (no suffix, not an existing path) is ``folder/name{suffix}``; anything else is a path.

    Raises ``error`` when the file does not exist, listing what is shipped.
    """
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = folder / f"{name_or_path}{suffix}"
    if not path.exists():
        shipped = ", ".join(shipped_names(folder, suffix)) or "none"
        raise error(f"{what} {name_or_path!s} not found (shipped: {shipped})")
    return path


def read_json(path: str | Path, what: str, error: type[Exception]) -> Any:
    """The parsed JSON of ``path``, or ``error`` saying the file is missing, unreadable or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} {path}: {exc}") from None
