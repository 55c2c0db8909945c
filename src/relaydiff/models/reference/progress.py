"""Progress on the console (rich) for long stages, and the notes a run leaves."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress as RichProgress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Progress:
    """rich progress bars on a terminal, one plain line a minute in a log file; ``quiet`` for tests."""

    def __init__(self, quiet: bool = False, log_every_s: float = 60.0):
        self.quiet = quiet
        self._bar = None
        self._console = None
        self._plain: dict[int, dict[str, Any]] = {}
        self._log_every_s = log_every_s
        if not quiet:
            self._console = Console()
            if self._console.is_terminal:
                self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                         TimeRemainingColumn(), console=self._console)

    def __enter__(self) -> "Progress":
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start(self, what: str, total: int, done: int = 0) -> Any:
        if self.quiet:
            return None
        if self._bar is not None:
            return self._bar.add_task(what, total=total, completed=done, info="")
        key = len(self._plain)
        self._plain[key] = {"what": what, "total": total, "done": done, "t0": time.time(), "last": time.time(),
                            "start": done}
        return key

    def advance(self, task: Any, n: int = 1, info: str = "") -> None:
        if task is None:
            return
        if self._bar is not None:
            self._bar.update(task, advance=n, info=info)
            return
        t = self._plain[task]
        t["done"] += n
        now = time.time()
        if now - t["last"] >= self._log_every_s or t["done"] >= t["total"]:
            t["last"] = now
            rate = (t["done"] - t["start"]) / max(1e-9, now - t["t0"])
            eta = (t["total"] - t["done"]) / rate if rate > 0 else float("nan")
            self.note(f"{time.strftime('%H:%M:%S')} {t['what']} {t['done']}/{t['total']} {info} "
                      f"({rate:.2f}/s, eta {eta / 60:.1f} min)")

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)
        elif self._console is not None:
            self._console.print(text, soft_wrap=True)
