"""The one-job server's whole job (the plan a lone job gets: large@edge:0-8, edge-only, CFG, decode)
with the U-Net call whole (row_workers 1) and in two row parts on two threads (row_workers 2), eager
diffusers modules and TorchScript traces, interleaved, in a fresh process with nothing else in it.
The soaks' in-bench calibration (eager, as `serve edge` and `bench serve` loaded the family) read the
split one slower; this asks why.

    OMP_NUM_THREADS=1 python docs/measurements/serve_one_job_rows.py [ROUNDS]
"""
import json
import statistics
import sys
import time

import torch

from relaydiff.engine.family import load_family
from relaydiff.engine.plan import parse_plan, Request
from relaydiff.engine.runner import generate

torch.set_num_threads(1)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 12
fams = {False: load_family("reference", trace=False), True: load_family("reference", trace=True)}
plan = parse_plan("large@edge:0-8")
prompts = ("a red circle left of a blue square", "a green star", "two yellow triangles", "an orange square")


def job(trace: bool, rw: int, i: int) -> float:
    fam = fams[trace]
    fam.row_workers = rw
    req = Request(prompt=prompts[i % len(prompts)], seed=i, steps=8)
    t0 = time.perf_counter()
    generate(fam, [req], [plan])
    return (time.perf_counter() - t0) * 1e3


configs = [(trace, rw) for trace in (False, True) for rw in (1, 2)]
times: dict[tuple[bool, int], list[float]] = {c: [] for c in configs}
for c in configs * 2:  # warm-up: traces for both part shapes
    job(*c, 0)
for r in range(rounds):
    for c in (configs if r % 2 == 0 else configs[::-1]):
        times[c].append(job(*c, r))
out = {f"{'traced' if trace else 'eager'}_rows{rw}": {
    "median_ms": statistics.median(v), "mean_ms": statistics.fmean(v), "min_ms": min(v), "max_ms": max(v), "n": len(v)}
    for (trace, rw), v in times.items()}
print(json.dumps(out, indent=1))
