"""Wall-clock costs at N torch threads (both cores held): large steps by batch, the edge-only job.

Usage: OMP_NUM_THREADS=2 python docs/measurements/serve_step_costs.py 1,2  (serve_throughput_accounting.json)
"""
import json, sys, time
import torch
from relaydiff.engine.family import load_family
from relaydiff.engine.profile import measure_step_latency
from relaydiff.engine.plan import Plan, Request
from relaydiff.engine.runner import generate
out = {}
fam = load_family("reference")
for threads in [int(x) for x in sys.argv[1].split(",")]:
    torch.set_num_threads(threads)
    r = {"large": measure_step_latency(fam, "large", [1, 8, 16, 32, 64], steps=8)}
    req = Request(prompt="a red circle left of a blue square", steps=8, guidance=3.0, seed=1)
    plan = Plan.single("large", 8, node="edge")
    generate(fam, [req], [plan])
    ts = []
    for _ in range(7):
        t0 = time.perf_counter(); generate(fam, [req], [plan]); ts.append(time.perf_counter() - t0)
    r["job_k8"] = sorted(ts)[3]
    reqs = [Request(prompt=f"p{i}", steps=8, guidance=3.0, seed=i) for i in range(16)]
    generate(fam, reqs, [plan] * 16, max_batch=16)
    t0 = time.perf_counter(); generate(fam, reqs, [plan] * 16, max_batch=16); r["batch16_k8_per_job"] = (time.perf_counter() - t0) / 16
    out[threads] = r
print(json.dumps(out))
