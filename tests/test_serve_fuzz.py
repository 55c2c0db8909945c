"""Schema fuzz of the edge app from its own OpenAPI schema (schemathesis, in-process): no 5xx, and
every 4xx carries a message."""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from relaydiff.serve.app import create_app
from relaydiff.serve.auth import TokenTable
from relaydiff.serve.edge import EdgeSettings

TOKEN = "fuzz-token-0123456789"
EXAMPLES = 12  # per operation and mode: the suite stays fast; the schema's constraints drive the rest


@pytest.fixture(scope="module")
def fuzz_target(tiny):
    # device-only plans with long deadlines: fuzzed jobs cost the edge no U-Net steps, the fuzz stays fast
    app = create_app(tiny, EdgeSettings(scheduler="all_local", default_steps=4, round_window_s=0.001,
                                        fetch_timeout_s=600, report_timeout_s=600, rate_per_s=1000.0, burst=1000),
                     TokenTable({"fuzzer": TOKEN}))
    with TestClient(app, raise_server_exceptions=False) as client:
        # the schema as the running app serves it (from_asgi would start and stop the app's lifespan itself)
        yield schemathesis.openapi.from_dict(client.get("/openapi.json").json()), client


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(fuzz_target, mode):
    schema, client = fuzz_target
    # one real job, so that fuzzed job ids sometimes name it
    job = client.post("/v1/jobs", json={"prompt": "a red circle"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert job.status_code == 202, job.text
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            kwargs = case.as_transport_kwargs(base_url="", headers={"Authorization": f"Bearer {TOKEN}"})
            kwargs.pop("cookies", None)
            resp = client.request(**kwargs)
            if resp.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path}: {resp.status_code} {resp.text[:200]}")
            elif resp.status_code >= 400:
                assert resp.json().get("detail"), f"{case.method} {case.formatted_path}: 4xx without a message"

        try:
            check()
        except Unsatisfiable:  # an operation without inputs has no negative cases (/healthz, /metrics)
            assert mode == GenerationMode.NEGATIVE
    assert not failures, failures[:5]
