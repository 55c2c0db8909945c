"""`serve edge --ray`: a local Ray cluster on 127.0.0.1, an ingress and two engine replicas, one job
each way through them; `bench serve --ray` briefly with one replica (both skipped without the
optional `ray` extra); and the one-line error of `bench serve --ray` where Ray is missing."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from typer.testing import CliRunner

from relaydiff.cli import app
from relaydiff.engine.plan import Plan, Request
from relaydiff.engine.runner import generate
from relaydiff.serve.auth import TokenTable
from relaydiff.serve.client import DeviceClient, ServiceError
from relaydiff.serve.edge import EdgeSettings

try:
    import ray.serve  # noqa: F401
    HAS_RAY = True
except ImportError:
    HAS_RAY = False
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="the optional extra 'ray' (ray[serve]) is not installed")

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_ray
@pytest.mark.slow
def test_ray_serve_ingress_and_two_engine_replicas(tiny):
    import ray
    from ray import serve

    from relaydiff.serve.ray_app import build_ray_app, run_on_ray

    settings = EdgeSettings(scheduler="local_search", default_steps=8, round_window_s=0.01, share_prefix=False)
    app = build_ray_app("tiny", settings, TokenTable({"alice": ALICE, "bob": BOB}), replicas=2,
                        cpus_per_replica=0.5)
    port = _free_port()
    try:
        run_on_ray(app, "127.0.0.1", port, num_cpus=2)
        url = f"http://127.0.0.1:{port}"
        with DeviceClient(url, ALICE, tiny, timeout_s=120) as device:
            outs = [device.run("a red circle left of a blue square", seed=s) for s in (1, 2)]
        assert sorted(o.job["job_id"][:3] for o in outs) == ["r0-", "r1-"]   # one job on each replica
        for seed, out in zip((1, 2), outs):
            assert out.job["state"] == "done"
            ref = generate(tiny, [Request("a red circle left of a blue square", steps=8, seed=seed)],
                           [Plan.from_list(out.job["plan"])])[0].image
            assert np.array_equal(out.image, ref)
        with DeviceClient(url, BOB, tiny, timeout_s=10) as other:   # ownership holds through the ingress
            with pytest.raises(ServiceError, match="403"):
                other.job(outs[0].job["job_id"])
            with pytest.raises(ServiceError, match="404"):
                other.job("r7-nothing")
    finally:
        serve.shutdown()
        ray.shutdown()


@needs_ray
@pytest.mark.slow
def test_bench_serve_on_ray_with_one_replica():
    """The bench's own local Ray and edge (a child process), two clients for a few seconds: jobs done, none lost."""
    from relaydiff.bench.serve import run_serve_bench

    r = run_serve_bench("tiny", clients=2, duration_s=8.0, dropout=0.0, steps=4, calibration_pairs=2,
                        log=lambda *a: None, ray_replicas=1)
    assert r["config"]["ray_replicas"] == 1 and r["config"]["restart"] is False and r["restarts"] == 0
    assert r["submitted"] >= 2 and r["completed"] == r["submitted"] and r["lost"] == 0 and r["client_errors"] == 0
    assert r["jobs_per_replica"] == {"r0": r["submitted"]}
    assert r["images_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] and r["sequential_images_per_s"] > 0
    assert "Ray Serve, 1 engine replica" in r["hardware"]


def test_bench_serve_ray_without_ray_is_one_line(monkeypatch):
    """Where Ray is missing (CI) `bench serve --ray` says how to install it, in one line, before anything starts."""
    monkeypatch.setattr("relaydiff.bench.serve._ray_installed", lambda: False)
    res = CliRunner().invoke(app, ["bench", "serve", "--ray", "--replicas", "2", "--json"])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "pip install 'relaydiff[ray]'" in lines[0], res.output
    res = CliRunner().invoke(app, ["bench", "serve", "--replicas", "2"])
    assert res.exit_code == 2 and "--replicas needs --ray" in res.output
