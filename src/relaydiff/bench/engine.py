"""`relaydiff bench engine`: one request at a time vs the continuous-batching executor.

N requests arrive at staggered steps (request i joins after ``i * stagger`` executor steps).
The sequential server runs each request alone, start to image, in arrival order; the batched
server admits each request into the running batch as soon as it arrives. Both produce the same
N images on the same family in the same process, so the ratio is a like-for-like measurement.
"""

from __future__ import annotations

import time
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _requests(n: int, steps: int):
    from relaydiff.engine.plan import Request

    colors, shapes = ("red", "green", "blue", "yellow", "purple"), ("circle", "square", "triangle", "star")
    return [Request(prompt=f"a {colors[i % 5]} {shapes[(i // 5) % 4]}", steps=steps, guidance=3.0, seed=i)
            for i in range(n)]


def _plans(family, n: int, steps: int, relay: bool):
    """Every request on the first member, or (``relay``) first member then second at T/2."""
    from relaydiff.engine.plan import Plan

    members = list(family.members)
    if relay and len(members) >= 2:
        return [Plan.relay(members[0], members[1], steps // 2, steps) for _ in range(n)]
    return [Plan.single(members[0], steps) for _ in range(n)]


def bench_engine(family: str = "tiny", n_requests: int = 16, steps: int = 20, max_batch: int = 16,
                 stagger: int = 1, device: str = "cpu", dtype: str = "fp32", repeats: int = 1,
                 relay: bool = False, trace: bool = True) -> dict[str, Any]:
    from relaydiff.engine.chain import new_chain
    from relaydiff.engine.executor import Executor
    from relaydiff.engine.family import load_family
    from relaydiff.engine.profile import hardware

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
    fam = load_family(family, trace=trace).to(device, DTYPES[dtype])
    reqs = _requests(n_requests, steps)
    plans = _plans(fam, n_requests, steps, relay)
    sync = torch.cuda.synchronize if fam.device.type == "cuda" else (lambda: None)

    def sequential() -> float:
        sync()
        t0 = time.perf_counter()
        for r, p in zip(reqs, plans):
            ex = Executor(fam, max_batch=1)
            c = new_chain(fam, r, p)
            ex.submit(c)
            ex.run()
            fam.decode(c.latents)
        sync()
        return time.perf_counter() - t0

    def batched() -> tuple[float, int]:
        sync()
        t0 = time.perf_counter()
        ex = Executor(fam, max_batch=max_batch)
        pending = list(zip(range(n_requests), reqs, plans))
        tick = 0
        done = 0
        while pending or not ex.idle:
            while pending and pending[0][0] * stagger <= tick:
                _, r, p = pending.pop(0)
                ex.submit(new_chain(fam, r, p))
            if ex.idle:  # nothing to do until the next arrival
                tick = pending[0][0] * stagger
                continue
            ex.step()
            tick += 1
            finished = ex.drain()
            if finished:
                fam.decode(torch.cat([c.latents for c in finished]))
                done += len(finished)
        sync()
        assert done == n_requests
        return time.perf_counter() - t0, ex.calls

    sequential()  # warm-up: first calls pay for allocation and kernel selection
    t_seq = min(sequential() for _ in range(repeats))
    runs = [batched() for _ in range(repeats)]
    t_bat, calls = min(runs)
    return {
        "requests": n_requests,
        "steps": steps,
        "stagger": stagger,
        "max_batch": max_batch,
        "family": fam.id,
        "plan": str(plans[0]),
        "device": str(fam.device),
        "dtype": dtype,
        "trace": trace,
        "sequential_images_per_s": n_requests / t_seq,
        "batched_images_per_s": n_requests / t_bat,
        "speedup": t_seq / t_bat,
        "sequential_s": t_seq,
        "batched_s": t_bat,
        "batched_unet_calls": calls,
        "hardware": hardware(),
    }
