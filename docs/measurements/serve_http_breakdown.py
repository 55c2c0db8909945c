"""Where a lone edge-only job's HTTP time goes, against the same job in-process (issue 16's overhead).

The edge runs as `bench serve` starts it (its own process on 127.0.0.1, traced, one thread); a device
client here submits lone jobs one at a time, timing each call of `DeviceClient.run` on this clock and
reading the edge's `created_s` / `updated_s` (the job's creation and its last change, here "done") on
the same machine's wall clock. Each HTTP job is paired with the same request in this process.

    OMP_NUM_THREADS=1 python docs/measurements/serve_http_breakdown.py [JOBS]
"""
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from relaydiff.bench.serve import EdgeProcess
from relaydiff.engine.family import load_family
from relaydiff.engine.plan import Plan, Request
from relaydiff.engine.runner import generate
from relaydiff.serve.client import DeviceClient
from relaydiff.serve.png import png_image

torch.set_num_threads(1)
jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
family = load_family("reference", trace=True)
token = "bench-token-0123456789-"
rows = []
with tempfile.TemporaryDirectory() as tmp:
    edge = EdgeProcess("reference", Path(tmp), token, "local_search", fetch_timeout_s=20.0, report_timeout_s=5.0,
                       max_queue=64, steps=None, trace=True)
    edge.start()
    try:
        with DeviceClient(edge.url, f"{token}0000", family, timeout_s=60) as device:
            for i in range(-2, jobs):   # two warm-up jobs (traces on both sides)
                prompt = ("a red circle left of a blue square", "a green star", "two yellow triangles")[i % 3]
                t0w, t0 = time.time(), time.perf_counter()
                view = device.submit(prompt, 1000 + i, device_class="laptop")
                t_202 = time.perf_counter()
                png = device.fetch_image(view["job_id"]) if view["kind"] == "edge_only" else None
                t_image = time.perf_counter()
                final = device.job(view["job_id"])
                t_view = time.perf_counter()
                if png is not None:
                    png_image(png)
                t_decode = time.perf_counter()
                req = Request.from_dict({k: view["request"][k] for k in ("prompt", "negative_prompt", "guidance",
                                                                          "seed", "sampler")}
                                        | {"steps": view["plan"][-1]["end"]})
                s = time.perf_counter()
                generate(family, [req], [Plan.from_list(view["plan"])])
                engine_ms = (time.perf_counter() - s) * 1e3
                if i < 0 or view["kind"] != "edge_only":
                    continue
                ms = lambda a, b: (b - a) * 1e3  # noqa: E731
                rows.append({
                    "to_created": (final["created_s"] - t0w) * 1e3,          # request, auth, store insert
                    "created_to_202": ms(t0, t_202) - (final["created_s"] - t0w) * 1e3,  # round gap, decision
                    "202_to_done": (final["updated_s"] - t0w) * 1e3 - ms(t0, t_202),   # the edge's chain, PNG, store
                    "done_to_image": ms(t0, t_image) - (final["updated_s"] - t0w) * 1e3,  # wake-up, GET image
                    "job_view": ms(t_image, t_view), "png_decode": ms(t_view, t_decode),
                    "http_total": ms(t0, t_decode), "engine": engine_ms})
    finally:
        edge.stop()
out = {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]}
out["jobs"] = len(rows)
out["http_adds_median"] = round(statistics.median(r["http_total"] - r["engine"] for r in rows), 2)
print(json.dumps(out, indent=1))
