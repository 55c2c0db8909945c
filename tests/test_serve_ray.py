"""`serve edge --ray`: a local Ray cluster on 127.0.0.1, an ingress and two engine replicas, one job
each way through them (skipped without the optional `ray` extra)."""

from __future__ import annotations

import socket

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="the optional extra 'ray' (ray[serve]) is not installed")

from relaydiff.engine.plan import Plan, Request  # noqa: E402
from relaydiff.engine.runner import generate  # noqa: E402
from relaydiff.serve.auth import TokenTable  # noqa: E402
from relaydiff.serve.client import DeviceClient, ServiceError  # noqa: E402
from relaydiff.serve.edge import EdgeSettings  # noqa: E402

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
