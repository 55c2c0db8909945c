"""The edge server's FastAPI app: jobs, handoffs, reports, images, health, metrics, status page.

``create_app(family, settings, tokens)`` builds a self-contained app (its own store, worker,
metrics), so tests run it in-process or under uvicorn on 127.0.0.1, and ``relaydiff serve edge``
runs the same app. Every refusal is a 4xx whose ``detail`` says what is wrong; limits answer
413 (body size), 422 (fields), 429 (per-client rate) and 503 (queue full, not ready), the last two
with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from relaydiff.engine.family import Family
from relaydiff.engine.plan import Plan
from relaydiff.serve.auth import RateLimiter, TokenTable
from relaydiff.serve.edge import EdgeService, EdgeSettings, JobConflict
from relaydiff.serve.metrics import ServiceMetrics
from relaydiff.serve.models import CompletionReport, ErrorBody, JobRequest, JobView
from relaydiff.serve.status import render_status
from relaydiff.serve.store import JobRecord

HANDOFF_MEDIA_TYPE = "application/x-relaydiff-handoff"
log = logging.getLogger("relaydiff.serve")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 409, 413, 429, 503)}


def job_view(rec: JobRecord) -> JobView:
    plan = Plan.from_list(rec.plan)
    return JobView(job_id=rec.id, state=rec.state, plan=list(plan.segments), plan_text=str(plan),
                   handoff_step=rec.handoff_step, kind=rec.kind, request=rec.request, round_id=rec.round_id,
                   shared_steps=int((rec.shared or {}).get("steps", 0)),
                   fallback=rec.fallback, error=rec.error, latency_ms=rec.latency_ms, quality=rec.quality,
                   created_s=rec.created, updated_s=rec.updated)


class RoundBatcher:
    """Collects submissions into rounds and decides each round in a worker thread.

    A round closes ``gap_s`` after its latest submission (a quiet gap: nothing more is arriving) or
    ``window_s`` after its first, whichever comes first: jobs submitted together arrive within a few
    ms of each other and stay one round, while a lone job waits only the gap, not the whole window.
    ``gap_s`` None or >= ``window_s``: a fixed window from the first submission.
    """

    def __init__(self, service: EdgeService, window_s: float, gap_s: float | None = None):
        self.service, self.window_s = service, window_s
        self.gap_s = window_s if gap_s is None else min(gap_s, window_s)
        self._pending: list[tuple[str, JobRequest, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._opened = 0.0   # loop time of the open round's first submission
        self._deciding: set[asyncio.Future] = set()   # rounds being decided (kept referenced)

    async def submit(self, client: str, job: JobRequest, timeout_s: float) -> JobRecord:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        now = loop.time()
        if not self._pending:
            self._opened = now
        self._pending.append((client, job, fut))
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(min(self._opened + self.window_s, now + self.gap_s), self._close)
        return await asyncio.wait_for(asyncio.shield(fut), timeout_s)

    def _close(self) -> None:
        """(The timer.) The open round is complete: decide it while the next one opens."""
        batch, self._pending, self._timer = self._pending, [], None
        task = asyncio.ensure_future(self._decide(batch))
        self._deciding.add(task)
        task.add_done_callback(self._deciding.discard)

    async def _decide(self, batch: list[tuple[str, JobRequest, asyncio.Future]]) -> None:
        try:
            records = await asyncio.to_thread(self.service.admit, [(c, j) for c, j, _ in batch])
        except Exception as exc:  # one bad round must not leave its submitters hanging
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, _, fut), rec in zip(batch, records):
            if not fut.done():
                fut.set_result(rec)


def _limit_response(status: int, detail: str, retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes`` (declared or streamed), before anything parses it."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = _limit_response(413, f"request body is larger than {self.max_bytes} bytes")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await too_large(scope, receive, send)
        seen, started = 0, False

        class _TooLarge(Exception):
            pass

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _TooLarge:
            if not started:
                await too_large(scope, receive, send)


def create_app(family: Family, settings: EdgeSettings | None = None, tokens: TokenTable | None = None) -> FastAPI:
    settings = settings or EdgeSettings()
    metrics = ServiceMetrics()
    service = EdgeService(family, settings, metrics)
    batcher = RoundBatcher(service, settings.round_window_s, settings.round_gap_s)
    limiter = RateLimiter(settings.rate_per_s, settings.burst)
    tokens = tokens or TokenTable({})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        service.store.listeners.append(lambda job_id: job_changed(job_id, loop))
        await asyncio.to_thread(service.start)
        try:
            yield
        finally:
            await asyncio.to_thread(service.stop)

    app = FastAPI(title="relaydiff edge server", version="1", lifespan=lifespan,
                  description="Text-to-image jobs split between this edge server and user devices.")
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    def authenticate(request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        client = tokens.client(token.strip())
        if client is None:
            raise HTTPException(401, "unknown bearer token", headers={"WWW-Authenticate": "Bearer"})
        return client

    def owned(job_id: str, client: str) -> JobRecord:
        rec = service.store.get(job_id)
        if rec is None:
            raise HTTPException(404, f"no job {job_id!r}")
        if rec.client != client:
            raise HTTPException(403, f"job {job_id!r} belongs to another client")
        return rec

    watchers: dict[str, set[asyncio.Event]] = {}

    def job_changed(job_id: str, loop: asyncio.AbstractEventLoop) -> None:
        """(Any thread.) Wake the long polls waiting on ``job_id``."""
        if job_id in watchers:
            try:
                loop.call_soon_threadsafe(lambda: [e.set() for e in watchers.get(job_id, ())])
            except RuntimeError:  # the loop has closed (shutting down): nobody waits any more
                pass

    async def wait_for(job_id: str, wait_s: float, done: Any) -> JobRecord:
        """Long poll: re-read the job whenever the store changes it, until ``done(record)`` or ``wait_s``
        passes (a 0.5 s re-read as well, in case a wake-up is missed)."""
        deadline = time.monotonic() + min(wait_s, settings.max_wait_s)
        event = asyncio.Event()
        watchers.setdefault(job_id, set()).add(event)   # before the read: a change after it sets the event
        try:
            while True:
                rec = service.store.get(job_id)
                left = deadline - time.monotonic()
                if rec is None or done(rec) or left <= 0:
                    return rec  # type: ignore[return-value]
                try:
                    await asyncio.wait_for(event.wait(), min(left, 0.5))
                except asyncio.TimeoutError:
                    pass
                event.clear()
        finally:
            watchers[job_id].discard(event)
            if not watchers[job_id]:
                del watchers[job_id]

    @app.post("/v1/jobs", status_code=202, response_model=JobView, responses=_ERRORS)
    async def submit_job(job: JobRequest, client: str = Depends(authenticate)) -> Any:
        """Accept a job; its plan is decided with the other jobs of its round."""
        if not service.ready:
            return _limit_response(503, "the edge is starting; retry", 1.0)
        try:
            service.check(job)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        wait = limiter.take(client)
        if wait > 0:
            metrics.rejected.labels(status="429").inc()
            return _limit_response(429, f"client {client!r} is over its rate of {settings.rate_per_s:g} jobs/s",
                                   wait)
        if service.unfinished >= settings.max_queue:
            metrics.rejected.labels(status="503").inc()
            return _limit_response(503, f"the edge queue is full ({settings.max_queue} unfinished jobs); retry", 1.0)
        try:
            rec = await batcher.submit(client, job, settings.decide_timeout_s)
        except asyncio.TimeoutError:
            return _limit_response(503, "the scheduler did not decide this job's round in time; retry", 1.0)
        except Exception as exc:  # the round failed as a whole (solver, store): say so, the client may retry
            log.exception("round failed")
            return _limit_response(503, f"this job's round could not be decided ({type(exc).__name__}: {exc})", 1.0)
        return job_view(rec)

    @app.get("/v1/jobs/{job_id}", response_model=JobView, responses=_ERRORS)
    async def get_job(job_id: str, wait_s: float = Query(0.0, ge=0.0, le=600.0,
                                                         description="wait up to this long for a terminal state"),
                      client: str = Depends(authenticate)) -> Any:
        owned(job_id, client)
        return job_view(await wait_for(job_id, wait_s, lambda r: r.terminal))

    @app.get("/v1/jobs/{job_id}/handoff", responses={**_ERRORS, 200: {"content": {HANDOFF_MEDIA_TYPE: {}}}},
             response_class=Response)
    async def get_handoff(job_id: str, wait_s: float = Query(0.0, ge=0.0, le=600.0,
                                                             description="wait up to this long for it"),
                          client: str = Depends(authenticate)) -> Response:
        """The chain stopped at the handoff step, in the strict ``.rdh`` format (never pickle)."""
        rec = owned(job_id, client)
        await wait_for(job_id, wait_s, lambda r: r.state not in ("queued", "running"))
        try:
            data = service.fetch_handoff(rec)
        except JobConflict as exc:
            return _limit_response(409, str(exc), 0.2 if "not ready" in str(exc) else None)
        return Response(data, media_type=HANDOFF_MEDIA_TYPE,
                        headers={"Content-Disposition": f'attachment; filename="{job_id}.rdh"'})

    @app.post("/v1/jobs/{job_id}/complete", response_model=JobView, responses=_ERRORS)
    async def complete_job(job_id: str, report: CompletionReport, client: str = Depends(authenticate)) -> Any:
        """The device finished (its latency and, optionally, its quality reading) or failed (the edge takes over)."""
        rec = owned(job_id, client)
        try:
            return job_view(await asyncio.to_thread(service.report, rec, report))
        except JobConflict as exc:
            raise HTTPException(409, str(exc)) from None

    @app.get("/v1/jobs/{job_id}/image", responses={**_ERRORS, 200: {"content": {"image/png": {}}}},
             response_class=Response)
    async def get_image(job_id: str, wait_s: float = Query(0.0, ge=0.0, le=600.0,
                                                           description="wait up to this long for it"),
                        client: str = Depends(authenticate)) -> Response:
        """The image of a job the edge finished (edge only, or a fallback)."""
        owned(job_id, client)
        rec = await wait_for(job_id, wait_s, lambda r: r.terminal)
        if rec.state == "done" and rec.has_image:
            return Response(service.store.image(job_id), media_type="image/png")
        if rec.state == "done":
            raise HTTPException(404, f"job {job_id!r} was finished by its device; the image is there")
        if rec.terminal:
            raise HTTPException(409, f"job {job_id!r} is {rec.state}: {rec.error or 'no image'}")
        return _limit_response(409, f"job {job_id!r} is {rec.state}; the image is not ready", 0.5)

    @app.delete("/v1/jobs/{job_id}", response_model=JobView, responses=_ERRORS)
    async def cancel_job(job_id: str, client: str = Depends(authenticate)) -> Any:
        rec = owned(job_id, client)
        try:
            return job_view(service.cancel(rec))
        except JobConflict as exc:
            raise HTTPException(409, str(exc)) from None

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorBody}})
    async def readyz() -> Any:
        if service.ready and service.alive:
            return {"status": "ready", "unfinished": service.unfinished, "restarted_jobs": service.restarted_jobs}
        return _limit_response(503, "the edge worker is not running", 1.0)

    @app.get("/metrics", response_class=Response)
    async def metrics_endpoint() -> Response:
        body = metrics.render(service.store.count_by_state())
        return Response(body, media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def status_page() -> str:
        return render_status(service)

    return app
