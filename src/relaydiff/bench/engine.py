"""`relaydiff bench engine`: one request at a time vs the continuous-batching executor.

N requests arrive at staggered steps (request i joins after ``i * stagger`` executor steps).
The sequential server runs each request alone, start to image, in arrival order; the batched
server admits each request into the running batch as soon as it arrives. Both produce the same
N images on the same family in the same process, so the ratio is a like-for-like measurement.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from relaydiff.engine.chain import new_chain
from relaydiff.engine.executor import Executor
from relaydiff.engine.family import Family, load_family
from relaydiff.engine.plan import Plan, Request
from relaydiff.engine.profile import hardware
from relaydiff.models.reference import build_unet, build_vae, load_text_encoder, ReferenceConfig, scheduler_config

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _requests(n: int, steps: int):
    colors, shapes = ("red", "green", "blue", "yellow", "purple"), ("circle", "square", "triangle", "star")
    return [Request(prompt=f"a {colors[i % 5]} {shapes[(i // 5) % 4]}", steps=steps, guidance=3.0, seed=i)
            for i in range(n)]


def _plans(family, n: int, steps: int, relay: bool):
    """Every request on the first member, or (``relay``) first member then second at T/2."""
    members = list(family.members)
    if relay and len(members) >= 2:
        return [Plan.relay(members[0], members[1], steps // 2, steps) for _ in range(n)]
    return [Plan.single(members[0], steps) for _ in range(n)]


def bench_engine(family: str = "tiny", n_requests: int = 16, steps: int = 20, max_batch: int = 16,
                 stagger: int = 1, device: str = "cpu", dtype: str = "fp32", repeats: int = 1,
                 relay: bool = False, trace: bool = True) -> dict[str, Any]:
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


# ---- executor step vs bare U-Net forward ---------------------------------------------------------

def shaped_family(config_path: str, seed: int = 0):
    """A family with the member shapes of a reference config (e.g. configs/reference_16x16.json) and
    random weights: the engine's per-step cost depends on shapes, not on what the weights learned,
    so a family about to ship can be timed before it is trained."""
    try:
        cfg = ReferenceConfig.from_dict(json.loads(Path(config_path).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"cannot read the reference config {config_path}: {exc}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        members = {m: build_unet(m, cfg) for m in ("large", "small")}
        vae = build_vae(cfg)
    return Family(id=f"random:{Path(config_path).stem}", version=f"seed{seed}",
                  text_encoder=load_text_encoder(cfg.max_length), vae=vae, scheduler_config=scheduler_config(),
                  members=members)


def _spread(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {"min": s[0], "median": s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2,
            "max": s[-1]}


def bench_engine_overhead(family: str = "tiny", batch: int = 8, members: list[str] | None = None,
                          samplers: tuple[str, ...] = ("ddim", "euler", "dpmpp_2m"), guidance: float = 3.0,
                          rounds: int = 10, steps_per_round: int = 2, repeats: int = 3, shapes: str | None = None,
                          device: str = "cpu", dtype: str = "fp32", trace: bool = True) -> dict[str, Any]:
    """What the executor adds to a step: one ``Executor.step`` of ``batch`` chains (CFG: 2 rows each)
    against the bare U-Net forward of the same rows (``Family.denoise`` on tensors built beforehand).

    Timed interleaved (this host is shared: one-shot timings swing by 30-50%): each round times
    ``steps_per_round`` executor steps, then as many bare forwards; per repeat the ratio is min over
    rounds of the executor's step / min of the forward's; ``repeats`` such ratios give the spread.
    Two clocks: the calling thread's CPU time (on a CPU with one torch thread all the work runs on
    it, and time spent preempted by other processes does not count: the ratio that holds on a loaded
    host) and wall time (what a user waits; the only clock on a GPU).
    ``shapes``: a reference config whose member shapes are built with random weights (`shaped_family`).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
    if batch < 1 or rounds < 1 or steps_per_round < 1 or repeats < 1:
        raise ValueError("batch, rounds, steps_per_round and repeats must be >= 1")
    fam = shaped_family(shapes) if shapes else load_family(family, trace=trace)
    fam.trace = trace
    fam.to(device, DTYPES[dtype])
    members = list(members or fam.members)
    unknown = [m for m in members if m not in fam.members]
    if unknown:
        raise ValueError(f"unknown member(s) {unknown}; this family has {sorted(fam.members)}")
    sync = torch.cuda.synchronize if fam.device.type == "cuda" else (lambda: None)
    clocks = {"wall": time.perf_counter}
    if fam.device.type == "cpu" and torch.get_num_threads() == 1:
        clocks["cpu"] = time.thread_time
    chain_steps = rounds * steps_per_round + 2  # warm-up steps, then every round on the same chains

    def executor_with_chains(member: str, sampler: str) -> Executor:
        ex = Executor(fam, max_batch=batch)
        for i in range(batch):
            req = Request(prompt=f"a red circle above a blue square {i}", steps=chain_steps, guidance=guidance,
                          seed=i, sampler=sampler)
            ex.submit(new_chain(fam, req, Plan.single(member, chain_steps)))
        return ex

    results = []
    for member in members:
        for sampler in samplers:
            per_clock = {name: {"ratios": [], "exec": [], "bare": []} for name in clocks}
            for _ in range(repeats):
                ex = executor_with_chains(member, sampler)
                ex.step(), ex.step()  # warm-up: traces, allocator
                first = ex.active[0]
                rows = 2 * batch if first.uses_cfg else batch
                x = torch.randn(rows, *fam.latent_shape).to(fam.device, fam.dtype)
                t = first.schedule.timesteps[:1].repeat(rows).to(fam.device)
                ctx = torch.cat([first.uncond, first.cond] * batch if first.uses_cfg else [first.cond] * batch)
                ctx = ctx.to(fam.device, fam.dtype)
                fam.denoise(member, None, x, t, ctx)
                t_exec = {name: [] for name in clocks}
                t_bare = {name: [] for name in clocks}
                for _ in range(rounds):
                    sync()
                    t0 = {name: clock() for name, clock in clocks.items()}
                    for _ in range(steps_per_round):
                        ex.step()
                    sync()
                    t1 = {name: clock() for name, clock in clocks.items()}
                    for _ in range(steps_per_round):
                        fam.denoise(member, None, x, t, ctx)
                    sync()
                    t2 = {name: clock() for name, clock in clocks.items()}
                    for name in clocks:
                        t_exec[name].append((t1[name] - t0[name]) / steps_per_round)
                        t_bare[name].append((t2[name] - t1[name]) / steps_per_round)
                assert ex.calls == 2 + rounds * steps_per_round, "each executor step must be one U-Net call"
                for name, acc in per_clock.items():
                    acc["exec"].append(min(t_exec[name]))
                    acc["bare"].append(min(t_bare[name]))
                    acc["ratios"].append(min(t_exec[name]) / min(t_bare[name]))
            row: dict[str, Any] = {"member": member, "sampler": sampler, "batch": batch, "rows": rows}
            for name, acc in per_clock.items():
                row[name] = {
                    "ratio": _spread(acc["ratios"]), "ratios": acc["ratios"],
                    "executor_step_ms": _spread([1e3 * v for v in acc["exec"]]),
                    "bare_forward_ms": _spread([1e3 * v for v in acc["bare"]]),
                    "overhead_ms": _spread([1e3 * (e - b) for e, b in zip(acc["exec"], acc["bare"])]),
                }
            results.append(row)
    return {
        "family": fam.id,
        "shapes": shapes,
        "latent_shape": list(fam.latent_shape),
        "device": str(fam.device),
        "dtype": dtype,
        "trace": trace,
        "guidance": guidance,
        "rounds": rounds,
        "steps_per_round": steps_per_round,
        "repeats": repeats,
        "method": "per repeat: min over interleaved rounds of the executor step / min of the bare forward",
        "clocks": list(clocks),
        "results": results,
        "worst_ratio": {name: max(r[name]["ratio"]["median"] for r in results) for name in clocks},
        "hardware": hardware(),
    }
