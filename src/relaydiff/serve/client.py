"""The device client (httpx): submit a job, fetch its handoff, finish the chain locally, report.

``DeviceClient(server, token, family).run(prompt, seed=...)`` does the whole round trip and
returns the image, whichever side finished it: a relay or device-only job is finished here from
the handoff (read by the strict handoff reader, never unpickled); an edge-only job's image is
fetched. :class:`AsyncDeviceClient` is the same over ``httpx.AsyncClient`` (the load bench runs
many of them in one event loop). Every wait has a deadline; transport errors and 503/429 are
retried with the server's Retry-After until it passes (a restarting edge loses nothing).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from relaydiff.engine.family import Family
from relaydiff.engine.handoff import decode_handoff
from relaydiff.engine.runner import from_handoff, run_chains
from relaydiff.serve.png import png_bytes, png_image

RETRY_STATUS = (429, 503)


class ServiceError(RuntimeError):
    """The server refused a request or could not be reached in time; the message says which."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class DeviceResult:
    job: dict[str, Any]
    image: np.ndarray          # uint8 [H, W, 3]
    png: bytes
    finished_by: str           # "device" or "edge"
    latency_ms: float          # submit to image in hand
    device_ms: float = 0.0     # the local part (decode the handoff, finish the chain, decode the image)
    marks_ms: dict[str, float] = field(default_factory=dict)   # ms after submitting: planned, handoff, finished,
                                                                # reported (or image): the job's timeline


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:200]
    detail = body.get("detail") if isinstance(body, dict) else body
    return detail if isinstance(detail, str) else str(detail)[:500]


def _retry_after(resp: httpx.Response | None, default: float = 0.2) -> float:
    try:
        return max(0.05, float(resp.headers.get("retry-after", default))) if resp is not None else default
    except ValueError:
        return default


def _settled(resp: httpx.Response, method: str, path: str, retry_409: bool) -> bool:
    """True on success; False when the request is worth retrying (429, 503, a 409 "not ready yet" with
    Retry-After); raises ServiceError with the server's reason otherwise."""
    if resp.status_code < 400:
        return True
    if resp.status_code in RETRY_STATUS or (retry_409 and resp.status_code == 409 and "retry-after" in resp.headers):
        return False
    raise ServiceError(f"{method} {path}: {resp.status_code} {_detail(resp)}", resp.status_code)


def job_payload(prompt: str, seed: int, steps: int | None, adapter: str | None, device_class: str,
                preferences: dict[str, float] | None, idempotency_key: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "seed": seed, "device_class": device_class}
    for key, value in (("steps", steps), ("adapter", adapter), ("preferences", preferences),
                       ("idempotency_key", idempotency_key)):
        if value is not None:
            body[key] = value
    return body


def finish_locally(family: Family, data: bytes, member: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Finish a handoff on this device: the strict reader, then the rest of the chain, then the VAE.

    ``member``: the device's own member when it differs from the plan's (its adapter is dropped
    when it belongs to another member).
    """
    handoff = decode_handoff(data, expect_family=(family.id, family.version),
                             expect_latent_shape=(1, *family.latent_shape))
    if member is not None:
        if member not in family.members:
            raise ServiceError(f"this device has no member {member!r}; it has {', '.join(family.members)}")
        plan = []
        for seg in handoff.plan:
            if seg["node"] == "device" and seg["member"] != member:
                adapter = seg["adapter"]
                keep = adapter is not None and family.adapters[adapter].member == member
                seg = {**seg, "member": member, "adapter": adapter if keep else None}
            plan.append(seg)
        handoff.plan = plan
    result = run_chains(family, [from_handoff(family, handoff)], max_batch=1)[0]
    return result.image, result.accounting


class DeviceClient:
    """Blocking client (scripts, notebooks, the CLI)."""

    def __init__(self, server: str, token: str, family: Family, *, timeout_s: float = 120.0,
                 transport: httpx.BaseTransport | None = None):
        self.family, self.timeout_s = family, timeout_s
        self.http = httpx.Client(base_url=server.rstrip("/"), headers={"Authorization": f"Bearer {token}"},
                                 timeout=httpx.Timeout(30.0, connect=5.0), transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "DeviceClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: str, path: str, deadline: float, *, retry_409: bool = False, **kw: Any) -> httpx.Response:
        while True:
            resp = None
            try:
                resp = self.http.request(method, path, **kw)
                if _settled(resp, method, path, retry_409):
                    return resp
            except httpx.TransportError as exc:
                if time.monotonic() >= deadline:
                    raise ServiceError(f"{method} {path}: cannot reach the server ({exc})") from None
            if time.monotonic() >= deadline:
                raise ServiceError(f"{method} {path}: gave up after the deadline "
                                   f"({resp.status_code} {_detail(resp)})" if resp is not None else
                                   f"{method} {path}: gave up after the deadline", resp.status_code if resp else None)
            time.sleep(min(_retry_after(resp), max(0.0, deadline - time.monotonic())))

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout_s

    def submit(self, prompt: str, seed: int = 0, *, steps: int | None = None, adapter: str | None = None,
               device_class: str = "phone-mid", preferences: dict[str, float] | None = None,
               idempotency_key: str | None = None) -> dict[str, Any]:
        body = job_payload(prompt, seed, steps, adapter, device_class, preferences, idempotency_key)
        return self._call("POST", "/v1/jobs", self._deadline(), json=body).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}", self._deadline()).json()

    def fetch_handoff(self, job_id: str) -> bytes:
        return self._call("GET", f"/v1/jobs/{job_id}/handoff", self._deadline(), retry_409=True,
                          params={"wait_s": 5.0}).content

    def report(self, job_id: str, latency_ms: float | None = None, quality: float | None = None,
               ok: bool = True, error: str | None = None) -> dict[str, Any]:
        body = {"ok": ok, "latency_ms": latency_ms, "quality": quality, "error": error}
        return self._call("POST", f"/v1/jobs/{job_id}/complete", self._deadline(), json=body).json()

    def fetch_image(self, job_id: str) -> bytes:
        return self._call("GET", f"/v1/jobs/{job_id}/image", self._deadline(), retry_409=True,
                          params={"wait_s": 5.0}).content

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/jobs/{job_id}", self._deadline()).json()

    def run(self, prompt: str, seed: int = 0, *, member: str | None = None, **job: Any) -> DeviceResult:
        """Submit, finish (here or on the edge), report; the image whichever side made it."""
        t0 = time.perf_counter()
        marks: dict[str, float] = {}

        def mark(name: str) -> float:
            marks[name] = (time.perf_counter() - t0) * 1e3
            return marks[name]

        def edge_image(job_id: str) -> DeviceResult:
            # the clock stops with the image decoded in hand, before the job's record is fetched
            # (bookkeeping the user does not wait for)
            png = self.fetch_image(job_id)
            image = png_image(png)
            latency = mark("image")
            return DeviceResult(self.job(job_id), image, png, "edge", latency, marks_ms=marks)

        view = self.submit(prompt, seed, **job)
        mark("planned")
        if view["kind"] == "edge_only":
            return edge_image(view["job_id"])
        data = self.fetch_handoff(view["job_id"])
        t1 = time.perf_counter()
        mark("handoff")
        try:
            image, _ = finish_locally(self.family, data, member)
        except Exception as exc:  # a handoff this device cannot finish: the edge finishes it
            self.report(view["job_id"], ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
            return edge_image(view["job_id"])
        device_ms = (time.perf_counter() - t1) * 1e3
        latency = mark("finished")
        final = self.report(view["job_id"], latency_ms=latency)
        mark("reported")
        return DeviceResult(final, image, png_bytes(image), "device", latency, device_ms, marks)


class AsyncDeviceClient:
    """The same protocol over ``httpx.AsyncClient``; the local part runs in ``run_local`` (a thread pool)."""

    def __init__(self, server: str, token: str, *, timeout_s: float = 120.0, http: httpx.AsyncClient | None = None):
        self.timeout_s = timeout_s
        self.headers = {"Authorization": f"Bearer {token}"}
        self.http = http or httpx.AsyncClient(base_url=server.rstrip("/"), timeout=httpx.Timeout(30.0, connect=5.0))

    async def call(self, method: str, path: str, *, retry_409: bool = False, timeout_s: float | None = None,
                   **kw: Any) -> httpx.Response:
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while True:
            resp = None
            try:
                resp = await self.http.request(method, path, headers=self.headers, **kw)
                if _settled(resp, method, path, retry_409):
                    return resp
            except httpx.TransportError:
                pass
            if time.monotonic() >= deadline:
                raise ServiceError(f"{method} {path}: gave up after {timeout_s or self.timeout_s:g} s",
                                   resp.status_code if resp is not None else None)
            await asyncio.sleep(min(_retry_after(resp), max(0.0, deadline - time.monotonic())))
