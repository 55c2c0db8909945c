"""Measure what the engine costs on this machine: the numbers the system model is calibrated with."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import numpy
import scipy
import torch

from relaydiff.engine.chain import new_chain
from relaydiff.engine.executor import Executor
from relaydiff.engine.family import Family
from relaydiff.engine.plan import Plan, Request


def hardware_info() -> dict[str, Any]:
    """Where a measurement ran: CPU, cores, GPU, library versions, torch threads and the load
    average (this machine is shared: a busy moment shows there)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "python": platform.python_version(), "numpy": numpy.__version__, "scipy": scipy.__version__,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def hardware() -> str:
    """:func:`hardware_info` in one line (profiles and bench tables carry this form)."""
    hw = hardware_info()
    desc = f"{hw['cpu']}, {hw['cores']} cores, torch {hw['torch']} ({hw['torch_threads']} threads)"
    if hw["gpu"] != "none":
        desc += f", GPU {hw['gpu']}"
    return desc


def measure_step_latency(family: Family, member: str, batch_sizes: list[int], steps: int = 5,
                         guidance: float = 3.0, adapter: str | None = None, warmup: int = 2,
                         clock: Any = time.perf_counter) -> dict[int, float]:
    """Median seconds per batched denoising step of ``member`` (CFG included when guidance > 1).

    Runs the real executor on ``b`` chains at once, so sampler work and batching overhead count.
    ``clock``: wall time by default; ``time.thread_time`` gives this thread's CPU time (on CPU with
    one torch thread: the compute alone, whatever else the host runs).
    """
    if member not in family.members:
        raise ValueError(f"unknown member {member!r}; this family has {sorted(family.members)}")
    out: dict[int, float] = {}
    total = steps + warmup
    sync = torch.cuda.synchronize if family.device.type == "cuda" else (lambda: None)
    for b in batch_sizes:
        if b < 1:
            raise ValueError(f"batch sizes must be >= 1, got {b}")
        ex = Executor(family, max_batch=b)
        for i in range(b):
            req = Request(prompt=f"profile prompt {i}", steps=total, guidance=guidance, seed=i)
            ex.submit(new_chain(family, req, Plan.single(member, total, adapter)))
        times = []
        for s in range(total):
            sync()
            t0 = clock()
            ex.step()
            sync()
            if s >= warmup:
                times.append(clock() - t0)
        times.sort()
        out[b] = times[len(times) // 2]
    return out
