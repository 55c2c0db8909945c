"""Command options made from a config dataclass, so that each default is written once (in the config).

A bench or trainer has a config dataclass (`QoEBenchConfig`, `DRLConfig`, ...); its command used to
repeat every field as a typer option with the default typed again, and the two drifted. With
`options_from(Config, help={...})` the command gets one option per field, its default read from the
dataclass, and receives the built config; a config that rejects its values ends in one error line.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import typer

from relaydiff.cli.errors import fail

_OPTION_TYPES = (int, float, str, bool, Path)


def options_from(config_cls: type, *, help: dict[str, str], skip: Iterable[str] = ()) -> Callable:
    """Decorate ``command(cfg, **own_options)``: one ``--field`` option per field of ``config_cls``
    named in ``help`` (its text is the option's help; the default is the dataclass's), minus ``skip``.

    Fields not in ``help`` keep the dataclass default and are not options (internal knobs); a field the
    command declares itself is the command's. The command's own options follow the config's.
    """
    hints = typing.get_type_hints(config_cls)
    skip = set(skip)
    unknown = set(help) - {f.name for f in dataclasses.fields(config_cls)}
    if unknown:
        raise TypeError(f"options_from({config_cls.__name__}): no fields {sorted(unknown)}")

    def wrap(command: Callable) -> Callable:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=_resolved(p.annotation, command))
               for p in list(inspect.signature(command).parameters.values())[1:]]  # the first takes the config
        own_names = {p.name for p in own}
        params, names = [], []
        for f in dataclasses.fields(config_cls):
            if f.name not in help or f.name in skip or f.name in own_names:
                continue
            kind = _option_type(hints[f.name], config_cls, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                            default=typer.Option(default, help=help[f.name])))
            names.append(f.name)

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            try:
                cfg = config_cls(**values)
            except (TypeError, ValueError) as exc:
                fail(str(exc))
            return command(cfg, **kwargs)

        signature = inspect.Signature(params + own)
        run.__signature__ = signature  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        del run.__wrapped__  # typer must read the signature above, not the command's
        return run

    return wrap


def _resolved(annotation: Any, command: Callable) -> Any:
    """A string annotation (``from __future__ import annotations``) as the type it names in the
    command's module: typer reads the wrapper's annotations, which live in this module."""
    return eval(annotation, command.__globals__) if isinstance(annotation, str) else annotation  # noqa: S307


def _option_type(hint: Any, config_cls: type, name: str) -> Any:
    """The field's type if typer can parse it from one command-line value (``X | None`` included)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint
    if base not in _OPTION_TYPES:
        raise TypeError(f"options_from({config_cls.__name__}): field {name!r} of type {hint} is not a "
                        "command-line value; leave it out of help= or give the command its own option")
    return hint
