"""`bench serve` compares the service with a one-job server on equal terms: the edge process and the
in-process one-job baseline run at the same torch thread count (the devices keep one)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

import relaydiff.bench.serve as bench_serve
from relaydiff.engine.plan import Plan, Request


class _ExitedAtOnce:
    """A child edge that exits at once (so start() fails fast), keeping what it was started with."""

    seen: dict = {}

    def __init__(self, args, **kw):
        _ExitedAtOnce.seen = {"args": args, "env": kw["env"]}
        self.returncode = 3

    def poll(self):
        return 3


def test_the_edge_process_runs_at_the_benchs_thread_count(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_serve.subprocess, "Popen", _ExitedAtOnce)
    edge = bench_serve.EdgeProcess("tiny", tmp_path, "tok-0123456789-", "greedy", fetch_timeout_s=1.0,
                                   report_timeout_s=1.0, max_queue=8, steps=None, threads=2)
    with pytest.raises(RuntimeError, match="the edge exited with 3"):
        edge.start(timeout_s=5.0)
    args = _ExitedAtOnce.seen["args"]
    assert args[args.index("--threads") + 1] == "2"
    assert _ExitedAtOnce.seen["env"]["OMP_NUM_THREADS"] == "2"
    assert "--trace" not in args
    traced = bench_serve.EdgeProcess("tiny", tmp_path, "tok-0123456789-", "greedy", fetch_timeout_s=1.0,
                                     report_timeout_s=1.0, max_queue=8, steps=None, trace=True, row_workers=2)
    with pytest.raises(RuntimeError, match="the edge exited with 3"):
        traced.start(timeout_s=5.0)
    args = _ExitedAtOnce.seen["args"]
    assert "--trace" in args and args[args.index("--row-workers") + 1] == "2"


def test_the_one_job_baseline_runs_at_the_edges_thread_count(monkeypatch):
    """The calibration's in-process side (the one-job server) computes at the edge's threads, with the edge's row
    parts and with whole calls, is credited with the faster of the two, then the process goes back to what it had
    (the devices' one thread). The HTTP overhead compares against the edge's own split."""
    plan = Plan.single("large", 4, node="edge").to_list()
    job = {"kind": "edge_only", "plan": plan, "handoff_step": 4,
           "request": {"prompt": "a green star", "negative_prompt": "", "guidance": 3.0, "seed": 1, "sampler": "ddim"}}

    class Device:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def run(self, *a, **k):
            return SimpleNamespace(latency_ms=10.0, job=job, marks_ms={"planned": 1.0})

    threads_seen, workers_seen = [], []

    def generate(family, requests, plans, **kw):
        threads_seen.append(torch.get_num_threads())
        workers_seen.append(family.row_workers)
        time.sleep(0.03 if family.row_workers == 2 else 0.0)  # the split is the slower one here

    monkeypatch.setattr(bench_serve, "DeviceClient", Device)
    monkeypatch.setattr(bench_serve, "generate", generate)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        family = SimpleNamespace(row_workers=1)
        out = bench_serve._calibrate("http://127.0.0.1:1", "tok", family, 3, None, 0, threads=2, row_workers=2)
        assert threads_seen and set(threads_seen) == {2} and set(workers_seen) == {1, 2}
        assert torch.get_num_threads() == 1 and family.row_workers == 1
        assert out["pairs"] == 3 and set(out["one_job_ms_mean"]) == {"1", "2"}
        assert out["one_job_row_workers"] == 1 and out["one_job_ms_mean"]["1"] < 30 <= out["one_job_ms_mean"]["2"]
        assert out["sequential_images_per_s"] == pytest.approx(1e3 / out["one_job_ms_mean"]["1"])
        assert out["engine_ms_mean"] == pytest.approx(out["one_job_ms_mean"]["2"])  # the overhead's side: the edge's
        whole = bench_serve._calibrate("http://127.0.0.1:1", "tok", family, 2, None, 0, threads=1, row_workers=1)
        assert set(whole["one_job_ms_mean"]) == {"1"} and whole["one_job_row_workers"] == 1
    finally:
        torch.set_num_threads(before)


def test_the_edge_steps_a_full_queue_of_the_soak_in_one_call():
    """With 64 clients the edge holds ~60 chains; the default batch takes them all in one U-Net call (at
    16 it took a quarter: ~19 ms a chain-step instead of ~17 on the 16x16 family, docs/service.md)."""
    from relaydiff.engine.chain import new_chain
    from relaydiff.engine.family import load_family
    from relaydiff.serve.edge import EdgeService, EdgeSettings

    family = load_family("tiny")
    service = EdgeService(family, EdgeSettings(share_prefix=False))
    try:
        for i in range(64):
            request = Request(prompt=f"a green star {i}", steps=4, guidance=3.0, seed=i)
            service.executor.submit(new_chain(family, request, Plan.single(list(family.members)[0], 4)))
        assert service.executor.step() == 64
    finally:
        service.store.close()
