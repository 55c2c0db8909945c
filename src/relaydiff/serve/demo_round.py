"""One round of the real service, for `relaydiff demo`: an edge on 127.0.0.1 and a few devices.

The edge app (the same one `relaydiff serve edge` runs) listens on a free loopback port; each
device is a :class:`~relaydiff.serve.client.DeviceClient` in its own thread, submitting at the
same moment, so the scheduler decides them as one round. Each device fetches its handoff over
HTTP, finishes its chain, reports, and returns the wall-clock marks of its job (planned, handoff
in hand, finished, reported; or the image, for an edge-only job): the demo draws them.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from relaydiff.engine.family import Family
from relaydiff.serve.app import create_app
from relaydiff.serve.auth import TokenTable
from relaydiff.serve.client import DeviceClient
from relaydiff.serve.edge import EdgeSettings
from relaydiff.serve.loopback import LoopbackServer


@dataclass(frozen=True)
class DemoDevice:
    name: str
    prompt: str
    device_class: str
    preferences: dict[str, float]
    style: bool          # asks for a personal style (the family's adapters, in turn)


# Users that pull the scheduler different ways (the greedy solver, in the first round of a fresh
# edge, sends them edge only, relay with a style, edge only, device only with a style; another
# solver or step count may decide otherwise: the demo reports what was decided).
DEMO_DEVICES = (
    DemoDevice("ivy", "a red circle left of a blue square", "laptop", {"quality": 0.2, "latency": 0.4, "energy": 0.4},
               False),
    DemoDevice("jon", "a green star", "phone-flagship", {"quality": 0.6, "latency": 0.3, "energy": 0.2}, True),
    DemoDevice("kai", "two yellow triangles", "phone-low", {"quality": 0.1, "latency": 0.5, "energy": 0.4}, False),
    DemoDevice("lea", "a purple square above a circle", "phone-mid", {"quality": 0.8, "latency": 0.1, "energy": 0.1},
               True),
)


@dataclass
class ServedJob:
    device: str
    device_class: str
    job: dict[str, Any]          # the server's final view of the job (plan, kind, round, state)
    finished_by: str             # device | edge
    latency_ms: float
    marks_ms: dict[str, float]   # ms after submitting


def serve_one_round(family: Family, device_family: Family, steps: int, seed: int = 0,
                    devices: tuple[DemoDevice, ...] = DEMO_DEVICES, scheduler: str = "greedy",
                    timeout_s: float = 120.0) -> list[ServedJob]:
    """Start an edge on 127.0.0.1, let ``devices`` submit together, finish their jobs, stop the edge.

    ``device_family``: the devices' own copy of the family (the edge's worker thread owns ``family``).
    """
    tokens = {d.name: f"{d.name}-demo-token-{i:04d}" for i, d in enumerate(devices)}
    styles = sorted(device_family.adapters)
    settings = EdgeSettings(scheduler=scheduler, default_steps=steps, round_window_s=0.25, round_gap_s=None,
                            fetch_timeout_s=timeout_s, report_timeout_s=timeout_s,
                            share_prefix=False)   # dissimilar prompts: no groups, and no MiniLM to load
    app = create_app(family, settings, TokenTable(tokens))
    go = threading.Barrier(len(devices))

    def one(i: int, device: DemoDevice, url: str) -> ServedJob:
        adapter = styles[i % len(styles)] if device.style and styles else None
        with DeviceClient(url, tokens[device.name], device_family, timeout_s=timeout_s) as client:
            go.wait(timeout_s)   # submit together: one round
            out = client.run(device.prompt, seed + i, steps=steps, adapter=adapter, device_class=device.device_class,
                             preferences=device.preferences)
        return ServedJob(device.name, device.device_class, out.job, out.finished_by, out.latency_ms, out.marks_ms)

    with LoopbackServer(app) as server, ThreadPoolExecutor(len(devices), thread_name_prefix="demo-device") as pool:
        futures = [pool.submit(one, i, d, server.url) for i, d in enumerate(devices)]
        return [f.result() for f in futures]
