"""relaydiff: text-to-image diffusion served across edge servers and user devices.

The few names a notebook needs::

    import relaydiff as rd

    family = rd.load_family("reference")                      # or "tiny", or a diffusers folder
    request = rd.Request("a red circle left of a blue square", steps=20, seed=0)
    plan = rd.parse_plan("large@edge:0-8,small@device:8-20")  # relay: large member, then small
    (edge,) = rd.generate(family, [request], [plan], stop_at=8)   # stop at the handoff
    image = rd.resume(family, edge.handoff).image             # finish it (numpy HxWx3 uint8)

``rd.write_handoff`` / ``rd.read_handoff`` put a handoff on the wire (safetensors + JSON, no
pickle); ``rd.run_demo(folder)`` serves the demo's users. Names load on first use, so importing
relaydiff (or its numpy-only parts, ``relaydiff.system``, ``relaydiff.sim``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (imported on first use: torch is heavy)
_PUBLIC = {
    "Family": "relaydiff.engine.family",
    "load_family": "relaydiff.engine.family",
    "Request": "relaydiff.engine.plan",
    "Plan": "relaydiff.engine.plan",
    "parse_plan": "relaydiff.engine.plan",
    "generate": "relaydiff.engine.runner",
    "generate_shared_prefix": "relaydiff.engine.runner",
    "resume": "relaydiff.engine.runner",
    "Handoff": "relaydiff.engine.handoff",
    "write_handoff": "relaydiff.engine.handoff",
    "read_handoff": "relaydiff.engine.handoff",
    "run_demo": "relaydiff.demo",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'relaydiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
