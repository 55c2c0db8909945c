"""`relaydiff bench serve`: the edge service under load and faults, on loopback, self-contained.

The edge runs as its own process (``python -m relaydiff.cli serve edge`` on 127.0.0.1, a fresh
SQLite store, ``threads`` torch threads, 1 by default); C device clients (asyncio + httpx, in this process) submit jobs for
S seconds, each finishing its relay or device-only chains locally (one thread: the devices share
this process's core). A fraction F of devices vanish right after taking their handoff; halfway
the edge is killed (SIGKILL) and restarted on the same port and store. Afterwards every accepted
job must end done: finished by its device, by the edge, or by the edge's fallback.

Two calibrations run first (after a warm-up pair), one request at a time, interleaved and paired: the same request over
HTTP (end to end) and in this process through the engine (edge part, handoff encode/decode,
device part); ``http_overhead`` = 1 - mean engine latency / mean HTTP latency (the pairs' spread beside it), and
``sequential_images_per_s`` = 1 / the engine's mean latency (a one-job-at-a-time server, at the edge's
``threads`` and ``trace``: equal hardware). With ``row_workers`` N > 1 the one-job server is timed on each
pair with its calls whole and in N row parts (order alternating) and is credited with the faster
(``one_job_ms_mean`` has both): a lone job's call has two rows, and in eager diffusers modules two
threads fight over the GIL, so its split can be slower than the whole call (docs/service.md).
``pairs_ms`` keeps each pair (HTTP, in-process, and the HTTP job's time to its 202: the round's
wait and decision), ``http_planned_ms_mean`` the last one's mean.

With ``ray_replicas=N`` (``--ray --replicas N``) the same clients and calibration run against
``relaydiff serve edge --ray --replicas N`` instead: the child starts its own local Ray on
127.0.0.1 (one CPU per engine replica, no dashboard), and is stopped with SIGINT (Serve and Ray
shut down), then killed with its process group if it has not exited in time. No restart fault
(a Ray edge takes minutes to come back on a small host); dropout works as on one edge (each
replica falls back for its own jobs). ``jobs_per_replica`` counts the accepted jobs by the
replica mark of their ids.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from relaydiff.engine.family import load_family
from relaydiff.engine.handoff import decode_handoff, encode_handoff
from relaydiff.engine.plan import Plan, Request
from relaydiff.engine.runner import generate, resume
from relaydiff.serve.client import AsyncDeviceClient, DeviceClient, finish_locally, job_payload, ServiceError
from relaydiff.serve.edge import EdgeSettings

PROMPTS = ("a red circle left of a blue square", "a green star", "two yellow triangles", "a purple square above a circle",
           "a small blue star", "a big red circle below a green triangle", "an orange square", "three pink circles")
DEVICE_CLASSES = ("phone-flagship", "phone-mid", "phone-low", "laptop")
RAY_MISSING = "--ray needs Ray Serve: pip install 'relaydiff[ray]'"


def _ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


@dataclass
class _Tally:
    submitted: dict[str, dict[str, Any]] = field(default_factory=dict)   # job id -> view
    owner: dict[str, str] = field(default_factory=dict)                 # job id -> its client's token
    done: set[str] = field(default_factory=set)
    vanished: set[str] = field(default_factory=set)
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EdgeProcess:
    """``relaydiff serve edge`` as a child process on 127.0.0.1 (killable: the restart fault)."""

    def __init__(self, family: str, workdir: Path, token: str, scheduler: str, *, fetch_timeout_s: float,
                 report_timeout_s: float, max_queue: int, steps: int | None, ray_replicas: int | None = None,
                 round_gap_s: float | None = None, threads: int = 1, row_workers: int = 1, trace: bool = False):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tokens = workdir / "tokens"
        self.tokens.write_text("".join(f"device{i} {token}{i:04d}\n" for i in range(256)))
        self.args = [sys.executable, "-m", "relaydiff.cli", "serve", "edge", "--family", family, "--host", "127.0.0.1",
                     "--port", str(self.port), "--tokens", str(self.tokens), "--db", str(workdir / "jobs.sqlite"),
                     "--scheduler", scheduler, "--fetch-timeout", str(fetch_timeout_s), "--report-timeout",
                     str(report_timeout_s), "--max-queue", str(max_queue), "--rate", "1000", "--burst", "1000",
                     "--threads", str(threads), "--row-workers", str(row_workers)] + \
            (["--steps", str(steps)] if steps else []) + \
            (["--round-gap", str(round_gap_s)] if round_gap_s is not None else []) + \
            (["--trace"] if trace else [])
        self.threads = threads
        self.ray = ray_replicas is not None
        if self.ray:   # Ray Serve's own local cluster on 127.0.0.1, one CPU per replica
            self.args += ["--ray", "--replicas", str(ray_replicas)]
        self.log = workdir / "edge.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 900.0) -> None:  # a shared, loaded host starts slowly
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        with open(self.log, "ab") as log:   # with Ray: its own process group, so its leftovers can be reaped
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=self.ray)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the edge exited with {self.proc.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-300:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"the edge did not become ready in {timeout_s:g} s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._reap_group()

    def _reap_group(self) -> None:
        """With Ray: SIGKILL whatever is left of the child's own process group (its session)."""
        if self.ray and self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if self.ray and self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)   # the Ray edge's Ctrl-C: serve.shutdown(), then ray.shutdown()
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pass
            self.kill()
            return
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


async def _device_loop(i: int, url: str, token: str, family: Any, pool: ThreadPoolExecutor, tally: _Tally,
                       stop_at: float, dropout: float, rng: np.random.Generator, steps: int | None) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0, connect=5.0)) as http:
        client = AsyncDeviceClient(url, token, http=http, timeout_s=180.0)
        n = 0
        loop = asyncio.get_running_loop()
        while time.monotonic() < stop_at:
            n += 1
            body = job_payload(PROMPTS[int(rng.integers(len(PROMPTS)))], int(rng.integers(2**31)), steps,
                               None, DEVICE_CLASSES[int(rng.integers(len(DEVICE_CLASSES)))],
                               None, f"d{i}-{n}")
            t0 = time.perf_counter()
            try:
                view = (await client.call("POST", "/v1/jobs", json=body)).json()
                job = view["job_id"]
                tally.submitted[job] = view
                tally.owner[job] = token
                if view["kind"] == "edge_only":
                    await client.call("GET", f"/v1/jobs/{job}/image", retry_409=True, params={"wait_s": 10})
                else:
                    data = (await client.call("GET", f"/v1/jobs/{job}/handoff", retry_409=True,
                                              params={"wait_s": 10})).content
                    if rng.random() < dropout:      # the device vanishes with its handoff
                        tally.vanished.add(job)
                        continue
                    await loop.run_in_executor(pool, finish_locally, family, data)
                    latency = (time.perf_counter() - t0) * 1e3
                    await client.call("POST", f"/v1/jobs/{job}/complete", json={"latency_ms": latency})
                tally.latencies_ms.append((time.perf_counter() - t0) * 1e3)
                tally.done.add(job)
            except ServiceError as exc:
                tally.errors.append(str(exc)[:200])


async def _confirm_done(url: str, owner: dict[str, str], timeout_s: float) -> tuple[set[str], int]:
    """Which accepted jobs the edge reports done (waiting for fallbacks), each asked by its own client,
    and how many of them the edge finished as a fallback."""
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60.0, connect=5.0)) as http:
        clients = {t: AsyncDeviceClient(url, t, http=http, timeout_s=timeout_s) for t in set(owner.values())}

        limit = asyncio.Semaphore(32)   # thousands of long polls at once exhaust the connection pool

        async def one(job: str) -> dict[str, Any] | None:
            async with limit:
                try:
                    return (await clients[owner[job]].call("GET", f"/v1/jobs/{job}", params={"wait_s": 30})).json()
                except ServiceError:
                    return None

        views = await asyncio.gather(*[one(j) for j in sorted(owner)])
    done = {v["job_id"] for v in views if v and v["state"] == "done"}
    return done, sum(1 for v in views if v and v["fallback"])


def _calibrate(url: str, token: str, family: Any, n: int, steps: int | None, seed: int,
               threads: int = 1, row_workers: int = 1) -> dict[str, Any]:
    """Paired, interleaved: each request over HTTP and in-process, order alternating; the in-process
    side (the one-job server) at ``threads`` torch threads, with ``row_workers`` as the edge has it
    (the HTTP overhead's side) and, when that is > 1, with whole calls too (the module docstring)."""
    threads_before, row_workers_before = torch.get_num_threads(), family.row_workers
    torch.set_num_threads(threads)
    try:
        return _calibrate_pairs(url, token, family, n, steps, seed, row_workers)
    finally:
        torch.set_num_threads(threads_before)
        family.row_workers = row_workers_before


def _calibrate_pairs(url: str, token: str, family: Any, n: int, steps: int | None, seed: int,
                     row_workers: int = 1) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    splits = sorted({1, row_workers})
    http_ms, planned_ms = [], []
    split_ms: dict[int, list[float]] = {w: [] for w in splits}
    with DeviceClient(url, token, family, timeout_s=120) as device:
        for r in range(-1, n):   # r = -1: a warm-up pair (first calls on both sides), not counted
            prompt, s = PROMPTS[r % len(PROMPTS)], int(rng.integers(2**31))
            cls = DEVICE_CLASSES[r % len(DEVICE_CLASSES)]

            def over_http(key: str) -> tuple[float, dict]:
                family.row_workers = row_workers   # a relay's device part: the split its in-process pair has
                out = device.run(prompt, s, device_class=cls, steps=steps, idempotency_key=key)
                planned.append(out.marks_ms["planned"])
                return out.latency_ms, out.job

            def in_process(job: dict) -> dict[int, float]:
                """The job in this process with each row split (order alternating by pair)."""
                fields = ("prompt", "negative_prompt", "guidance", "seed", "sampler")
                req = Request.from_dict({k: job["request"][k] for k in fields} | {"steps": job["plan"][-1]["end"]})
                plan = Plan.from_list(job["plan"])
                ms = {}
                for w in (splits if r % 2 == 0 else splits[::-1]):
                    family.row_workers = w
                    t0 = time.perf_counter()
                    if job["kind"] == "edge_only":
                        generate(family, [req], [plan])
                    else:
                        res = generate(family, [req], [plan], stop_at=job["handoff_step"])[0]
                        wire = encode_handoff(res.handoff, dtype="fp32", compress=True)
                        resume(family, decode_handoff(wire))
                    ms[w] = (time.perf_counter() - t0) * 1e3
                return ms

            planned: list[float] = []
            if r % 2 == 0:
                h, job = over_http(f"cal-{seed}-{r}")
                e = in_process(job)
            else:  # the engine first needs the plan: decide it over HTTP once, then time the pair in reverse
                _, job = over_http(f"cal-{seed}-{r}-plan")
                e = in_process(job)
                h, again = over_http(f"cal-{seed}-{r}")   # a new job (a new key): the same request, run again
                if again["plan"] != job["plan"]:            # its round decided otherwise: time the engine on it
                    e = in_process(again)
            if r >= 0:
                http_ms.append(h)
                for w in splits:
                    split_ms[w].append(e[w])
                planned_ms.append(planned[-1])
    h, e = np.array(http_ms), np.array(split_ms[row_workers])   # the overhead: the edge's own split
    share = 1.0 - e / h   # per pair: the spread; the figure is the share of the mean latency
    one_job = {w: float(np.mean(v)) for w, v in split_ms.items()}
    best = min(one_job, key=one_job.__getitem__)
    return {"http_ms_mean": float(h.mean()), "engine_ms_mean": float(e.mean()),
            "http_overhead": float(1.0 - e.mean() / h.mean()),
            "http_overhead_pair_sd": float(share.std(ddof=1)) if n > 1 else 0.0,
            "sequential_images_per_s": float(1e3 / one_job[best]), "pairs": n,
            "one_job_ms_mean": {str(w): v for w, v in one_job.items()}, "one_job_row_workers": best,
            "http_planned_ms_mean": float(np.mean(planned_ms)),
            "pairs_ms": [[round(a, 2), round(b, 2), round(c, 2)] for a, b, c in zip(http_ms, e, planned_ms)]}


def run_serve_bench(family_name: str = "tiny", clients: int = 8, duration_s: float = 30.0, dropout: float = 0.1,
                    scheduler: str = "local_search", seed: int = 0, steps: int | None = None, restart: bool = True,
                    calibration_pairs: int = 6, log=print, ray_replicas: int | None = None,
                    round_gap_s: float | None = None, threads: int = 1, row_workers: int = 1,
                    trace: bool = False) -> dict[str, Any]:
    if ray_replicas is not None:
        if not _ray_installed():
            raise RuntimeError(RAY_MISSING)
        if not 1 <= ray_replicas <= (os.cpu_count() or 1):
            raise RuntimeError(f"--replicas must be in 1..{os.cpu_count()} here: the local Ray gives each "
                               f"replica one of this machine's {os.cpu_count()} CPUs")
        restart = False
        threads = 1   # one Ray CPU per replica
    torch.set_num_threads(1)   # the devices: one thread each, sharing this process's core
    family = load_family(family_name, trace=trace)
    token = "bench-token-0123456789-"
    report_timeout = 5.0
    with tempfile.TemporaryDirectory(prefix="relaydiff-bench-serve-") as tmp:
        edge = EdgeProcess(family_name, Path(tmp), token, scheduler, fetch_timeout_s=20.0,
                           report_timeout_s=report_timeout, max_queue=max(256, 4 * clients), steps=steps,
                           ray_replicas=ray_replicas, round_gap_s=round_gap_s, threads=threads,
                           row_workers=row_workers, trace=trace)
        t_start = time.perf_counter()
        try:
            edge.start(timeout_s=600.0 if ray_replicas else 900.0)
            log(f"edge ready on {edge.url} in {time.perf_counter() - t_start:.1f} s")
            calib = _calibrate(edge.url, f"{token}0000", family, calibration_pairs, steps, seed, threads, row_workers)
            log(f"calibration: {calib}")
            tally = _Tally()
            restarts = 0

            async def load() -> None:
                nonlocal restarts
                stop_at = time.monotonic() + duration_s
                pool = ThreadPoolExecutor(1, thread_name_prefix="devices")
                tasks = [asyncio.create_task(_device_loop(i, edge.url, f"{token}{i:04d}", family, pool, tally,
                                                          stop_at, dropout, np.random.default_rng([seed, i]), steps))
                         for i in range(clients)]
                if restart:
                    await asyncio.sleep(duration_s / 2)
                    log(f"killing the edge at {duration_s / 2:.0f} s ({len(tally.submitted)} jobs so far)")
                    edge.kill()
                    await asyncio.to_thread(edge.start)
                    restarts += 1
                await asyncio.gather(*tasks)
                pool.shutdown()

            t0 = time.perf_counter()
            asyncio.run(load())
            load_s = time.perf_counter() - t0
            confirmed, fallbacks = asyncio.run(_confirm_done(edge.url, tally.owner, 300.0))
            # the one-job server again, now the load is over: this shared host's speed drifts by tens of
            # percent over minutes, so the ratio is read against both ends of the load phase
            calib_after = _calibrate(edge.url, f"{token}0000", family, calibration_pairs, steps, seed + 1, threads,
                                     row_workers)
            log(f"calibration after the load: {calib_after}")
        finally:
            edge.stop()
    completed = confirmed
    lat = np.array(tally.latencies_ms) if tally.latencies_ms else np.array([np.nan])
    images_per_s = len(tally.done) / load_s
    ends = (calib["sequential_images_per_s"], calib_after["sequential_images_per_s"])
    sequential = float(np.mean(ends))
    mode = "traced" if trace else "eager"
    edge_desc = (f"edge {threads} torch thread(s) in its own process, U-Net calls in {row_workers} row part(s); "
                 f"the one-job baseline {threads} thread(s) in the bench process, the faster of "
                 f"{' and '.join(str(w) for w in sorted({1, row_workers}))} row part(s); all {mode}")
    if ray_replicas is not None:
        edge_desc = (f"edge on a local Ray Serve, {ray_replicas} engine replica(s), each 1 torch thread and 1 Ray CPU "
                     "in its own worker process, ingress and proxy beside them")
    per_replica: dict[str, int] = {}
    for job in tally.submitted:
        mark = job.split("-", 1)[0] if ray_replicas is not None else "edge"
        per_replica[mark] = per_replica.get(mark, 0) + 1
    return {
        "submitted": len(tally.submitted), "completed": len(completed), "lost": len(set(tally.submitted) - completed),
        "fallbacks": fallbacks, "vanished_devices": len(tally.vanished), "restarts": restarts,
        "p50_ms": float(np.nanpercentile(lat, 50)), "p99_ms": float(np.nanpercentile(lat, 99)),
        "images_per_s": images_per_s, "sequential_images_per_s": sequential,
        "throughput_vs_sequential": images_per_s / sequential,
        # against the faster and the slower of the two one-job readings (before and after the load)
        "throughput_vs_sequential_range": [images_per_s / max(ends), images_per_s / min(ends)],
        "http_overhead": float(np.mean([calib["http_overhead"], calib_after["http_overhead"]])),
        "calibration": calib, "calibration_after": calib_after,
        "client_errors": len(tally.errors), "client_error_samples": tally.errors[:3],
        "jobs_per_replica": dict(sorted(per_replica.items())), "load_s": load_s,
        "config": {"family": family_name, "clients": clients, "duration_s": duration_s, "dropout": dropout,
                   "scheduler": scheduler, "seed": seed, "steps": steps, "report_timeout_s": report_timeout,
                   "restart": restart, "ray_replicas": ray_replicas, "threads": threads, "row_workers": row_workers,
                   "trace": trace, "round_gap_s": EdgeSettings.round_gap_s if round_gap_s is None else round_gap_s,
                   "round_window_s": EdgeSettings.round_window_s},
        "hardware": f"{_cpu_name()}, {os.cpu_count()} cores, CPU only, shared host; "
                    f"{edge_desc}, devices 1 thread in the bench process",
    }
