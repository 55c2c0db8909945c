"""How far apart jobs submitted together reach the edge's round batcher (the evidence for --round-gap).

An edge (tiny family, device-only plans, a 0.5 s window so that nothing closes early) on 127.0.0.1 in
this process; bursts of N jobs submitted together, as the tests do (asyncio.gather over one
httpx.AsyncClient) and as the demo does (N threads released by a barrier, one DeviceClient each).
Per burst: the largest gap between consecutive arrivals at RoundBatcher.submit and the burst's span.
A quiet gap shorter than a burst's largest gap splits that burst into two rounds.

    OMP_NUM_THREADS=1 python docs/measurements/serve_round_spread.py 40 docs/measurements/serve_round_spread.json
"""
import asyncio
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import torch

from relaydiff.bench.serve import _cpu_name
from relaydiff.engine.family import tiny_family
from relaydiff.serve import app as appmod
from relaydiff.serve.app import create_app
from relaydiff.serve.auth import TokenTable
from relaydiff.serve.client import AsyncDeviceClient, DeviceClient
from relaydiff.serve.edge import EdgeSettings
from relaydiff.serve.loopback import LoopbackServer

torch.set_num_threads(1)
arrivals: list[float] = []
_submit = appmod.RoundBatcher.submit


async def _logged(self, client, job, timeout_s):
    arrivals.append(time.perf_counter())
    return await _submit(self, client, job, timeout_s)


appmod.RoundBatcher.submit = _logged


def _burst_gaps() -> tuple[float, float]:
    a = np.sort(np.array(arrivals))
    arrivals.clear()
    return float(np.diff(a).max() * 1e3), float((a[-1] - a[0]) * 1e3)


def main(reps: int, out: str) -> None:
    tiny = tiny_family(0)
    tokens = {f"c{i}": f"token-{i:04d}-0123456789" for i in range(8)}
    settings = EdgeSettings(scheduler="all_local", default_steps=4, round_window_s=0.5, round_gap_s=None,
                            share_prefix=False, max_queue=100000, fetch_timeout_s=600, rate_per_s=1000, burst=1000)
    app = create_app(tiny, settings, TokenTable(tokens))
    res: dict[str, list[tuple[float, float]]] = {}
    with LoopbackServer(app) as server:
        for n in (2, 4, 8):
            res[f"gather{n}"] = []
            for _ in range(reps):
                async def burst():
                    async with httpx.AsyncClient(base_url=server.url) as http:
                        c = AsyncDeviceClient(server.url, tokens["c0"], http=http, timeout_s=20)
                        await asyncio.gather(*[c.call("POST", "/v1/jobs", json={"prompt": f"a star {i}", "seed": i})
                                               for i in range(n)])
                asyncio.run(burst())
                res[f"gather{n}"].append(_burst_gaps())
        n = 4
        clients = [DeviceClient(server.url, tokens[f"c{i}"], tiny, timeout_s=20) for i in range(n)]
        res[f"threads{n}"] = []
        for _ in range(reps):
            go = threading.Barrier(n)

            def one(i: int) -> None:
                go.wait(10)
                clients[i].submit(f"a star {i}", i)
            with ThreadPoolExecutor(n) as pool:
                list(pool.map(one, range(n)))
            res[f"threads{n}"].append(_burst_gaps())
    gaps = np.array([g for v in res.values() for g, _ in v])
    summary = {k: {"max_gap_ms_median": float(np.median([g for g, _ in v])),
                   "max_gap_ms_p90": float(np.percentile([g for g, _ in v], 90)),
                   "max_gap_ms_max": float(max(g for g, _ in v))} for k, v in res.items()}
    split = {f"{g}ms": int((gaps > g).sum()) for g in (2, 5, 10, 20)}
    report = {"bursts": len(gaps), "bursts_split_by_a_gap_of": split, "summary": summary,
              "bursts_ms": {k: [[round(g, 2), round(s, 2)] for g, s in v] for k, v in res.items()},
              "hardware": f"{_cpu_name()}, {os.cpu_count()} cores, CPU only, shared "
                          "host; server and clients in one process (the tests' setting)"}
    print(json.dumps({k: report[k] for k in ("bursts", "bursts_split_by_a_gap_of", "summary")}, indent=1))
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
