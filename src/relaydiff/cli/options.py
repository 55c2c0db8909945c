"""Options that several commands share, defined once (typer ``Annotated`` aliases), and the one way a
bench writes its JSON report.

A command takes a shared option as ``as_json: JsonFlag = False``: the flag's name and help come from
here, the default stays in the command's signature (typer reads it from there). An option whose help
says something particular to one command stays that command's own ``typer.Option``. This module
imports typer and the standard library only: ``relaydiff --help`` loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
JsonOut = Annotated[Path, typer.Option(help="Also write the JSON here.")]
RunSeed = Annotated[int, typer.Option(help="Seed: the run is a pure function of it.")]
SharedThreads = Annotated[int, typer.Option(help="torch threads (the machine is shared).")]
TorchThreads = Annotated[int, typer.Option(help="CPU threads for torch (0: torch's default).")]
FamilyDir = Annotated[str, typer.Option(help="'reference', 'tiny' or a family directory.")]
TorchDevice = Annotated[str, typer.Option(help="torch device to run on: cpu, cuda, cuda:N or mps (checked before anything loads).")]
Sampler = Annotated[str, typer.Option(help="ddim | euler | dpmpp_2m.")]
Trace = Annotated[bool, typer.Option(help="Run the U-Nets as TorchScript traces (exact, less Python per call).")]
SharedStepsRule = Annotated[str, typer.Option(
    help="How the edge picks each group's shared steps for the policy's shares: exact (QoE-optimal) or cap "
         "(the service's rule: every group shares its cap).")]


def save_json(text: str, out: Path | None) -> None:
    """Write a bench's JSON ``text`` (and a newline) to ``out`` (``--out``), making its folder; None: nothing."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
