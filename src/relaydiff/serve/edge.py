"""The edge's job state machine and the background worker that runs its chains.

One worker thread owns a continuous-batching :class:`~relaydiff.engine.executor.Executor` and
every chain in it; HTTP handlers talk to it only through thread-safe methods. A job's life:

    edge_only:   queued -> running -> done (image on the edge)
    relay:       queued -> running -> awaiting_device -> on_device -> done (device reports)
    device_only: queued -> awaiting_device -> on_device -> done (its handoff is the seeded noise, step 0)

A device that does not fetch its handoff within ``fetch_timeout_s``, does not report within
``report_timeout_s`` of fetching, or reports failure sends the job to ``fallback``: the edge
finishes the chain itself from the handoff (the same member, adapter and seed: the same image)
and the image can be fetched. Any job can be cancelled until it is terminal. On start, every job
the store holds unfinished is re-run from its request and plan.

Shared prefixes (seed 002, :meth:`RoundDecider.share`): the members of a group run one chain, the
leader's request and plan, for the group's first s steps; then each continues as a fork with its
own prompt, plan and handoff step. Each member's record holds the leader's request and plan, so a
member re-run after a restart rebuilds the same prefix (the same image). Members that sent the same
request (all but the seed) with the same plan and handoff step run one fork (a prompt runs once per
group, as in the QoE env): after the fork the seed plays no part (the fork carries the prefix's
generator), so their chains would be the same; each receives its result. The fork lives while
any of them wants it (a cancelled copy leaves it to the others).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from relaydiff.engine.chain import Chain, new_chain
from relaydiff.engine.executor import Executor
from relaydiff.engine.family import Family
from relaydiff.engine.handoff import decode_handoff, encode_handoff
from relaydiff.engine.plan import Plan, Request
from relaydiff.engine.runner import finish_chains, from_handoff
from relaydiff.serve.metrics import ServiceMetrics
from relaydiff.serve.models import CompletionReport, JobRequest
from relaydiff.serve.png import png_bytes
from relaydiff.serve.rounds import RoundDecider, RoundJob
from relaydiff.serve.store import JobRecord, JobStore

log = logging.getLogger("relaydiff.serve")


@dataclass
class EdgeSettings:
    """Every knob of the edge service (the CLI's options map onto these one to one)."""

    scheduler: str = "local_search"  # bench offload: the best captured gain per CPU time (issue 18)
    scenario: str = "default"
    db_path: str = ":memory:"
    default_steps: int | None = None     # None: the family's metadata default_steps, else 8
    round_window_s: float = 0.02         # a round closes at most this long after its first job ...
    round_gap_s: float | None = 0.005    # ... or this long after its latest (None: the whole window; docs/service.md)
    max_batch: int = 64                  # chains per U-Net call: a full queue in one call (docs/service.md)
    max_queue: int = 256                 # unfinished jobs; more: 503
    rate_per_s: float = 20.0             # job submissions per client (token bucket)
    burst: int = 40
    max_body_bytes: int = 16 * 1024
    fetch_timeout_s: float = 10.0        # a device must fetch its handoff within this
    report_timeout_s: float = 30.0       # ... and report within this after fetching
    max_wait_s: float = 30.0             # longest long-poll a client may ask for
    decide_timeout_s: float = 10.0       # longest a submission waits for its round
    handoff_dtype: str = "fp32"          # fp32: the device's image equals the edge's fallback image
    handoff_compress: bool = True
    status_thumbnails: bool = False      # the public status page shows finished images (operators only)
    share_prefix: bool = True            # similar prompts of a round share their first edge steps (seed 002)
    job_id_prefix: str = ""              # an engine replica's mark on its job ids (Ray Serve routes by it)


_JOINED_PREFIX: Any = object()   # _chain_for's answer for a job that waits on its group's prefix chain


class JobConflict(Exception):
    """A request that the job's current state does not allow (HTTP 409); the message says why."""


class EdgeService:
    def __init__(self, family: Family, settings: EdgeSettings, metrics: ServiceMetrics | None = None):
        members = list(family.members)
        large, small = ("large", "small") if {"large", "small"} <= set(members) else (members[0], members[-1])
        self.family, self.settings = family, settings
        self.default_steps = settings.default_steps or int(family.metadata.get("default_steps", 8))
        self.decider = RoundDecider(settings.scheduler, large, small, settings.scenario,
                                    share_prefix=settings.share_prefix)
        self.store = JobStore(settings.db_path)
        self.metrics = metrics or ServiceMetrics()
        self.executor = Executor(family, node=None, max_batch=settings.max_batch)
        self._cv = threading.Condition()
        self._inbox: deque[tuple[str, str]] = deque()      # (job id, "start" | "fallback")
        self._cancelled: set[str] = set()
        self._deadlines: dict[str, float] = {}             # job id -> when it falls back
        self._handoffs: dict[str, bytes] = {}
        self._chain_jobs: dict[int, list[str]] = {}   # chain id -> the jobs it runs for (a fork: its copies too)
        self._prefixes: dict[tuple, Chain] = {}                       # group key -> its prefix chain
        self._prefix_members: dict[int, list[tuple[str, int | None]]] = {}   # prefix chain id -> (job, stop_at)
        self._unfinished = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self.ready = False
        self.restarted_jobs = 0

    # ---- life ----------------------------------------------------------------------------
    def start(self) -> None:
        """Re-run what the store holds unfinished, then start the worker."""
        pending = self.store.unfinished()
        with self._cv:
            self._unfinished = len(pending)
            for job in pending:
                self._inbox.append((job.id, "fallback" if job.state == "fallback" else "start"))
        self.restarted_jobs = len(pending)
        if pending:
            log.info("re-running %d unfinished job(s) from %s", len(pending), self.settings.db_path)
        self._thread = threading.Thread(target=self._run, name="relaydiff-edge-worker", daemon=True)
        self._thread.start()
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.store.close()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def unfinished(self) -> int:
        return self._unfinished

    # ---- admission (called from the round batcher's thread) -------------------------------
    def check(self, job: JobRequest) -> None:
        """Reject what no plan can serve (ValueError with the reason: the handler answers 422)."""
        self.decider.check_device_class(job.device_class)
        if job.adapter is not None and job.adapter not in self.family.adapters:
            known = ", ".join(sorted(self.family.adapters)) or "none"
            raise ValueError(f"unknown adapter {job.adapter!r}; this family has: {known}")

    def admit(self, batch: list[tuple[str, JobRequest]]) -> list[JobRecord]:
        """Decide one round for ``(client, job)`` pairs, persist the jobs and queue them."""
        out: list[JobRecord | None] = [None] * len(batch)
        fresh = []
        for i, (client, job) in enumerate(batch):
            if job.idempotency_key and (old := self.store.by_key(client, job.idempotency_key)) is not None:
                out[i] = old
            else:
                fresh.append(i)
        if fresh:
            round_id = self.store.next_round_id()
            requests = [batch[i][1].engine_request(self.default_steps) for i in fresh]
            jobs = [RoundJob(r.steps, r.prompt, batch[i][1].preferences.normalized(), batch[i][1].device_class,
                             batch[i][1].adapter, r.sampler) for i, r in zip(fresh, requests)]
            decided = self.decider.decide(jobs, round_id, self._edge_remaining())
            shared = self.decider.share(jobs, decided)
            self.metrics.rounds.inc()
            self.metrics.round_jobs.observe(len(fresh))
            ids = [self.settings.job_id_prefix + uuid.uuid4().hex for _ in fresh]
            queued = []
            for n, (i, request, d) in enumerate(zip(fresh, requests, decided)):
                client, job = batch[i]
                group = shared[n]
                share = None if group is None else {
                    "steps": group.steps, "leader": ids[group.leader],
                    "leader_request": requests[group.leader].to_dict(), "leader_plan": decided[group.leader].plan.to_list()}
                rec = JobRecord(id=ids[n], client=client, idempotency_key=job.idempotency_key,
                                request=job.model_dump(), engine_request=request.to_dict(), plan=d.plan.to_list(),
                                kind=d.kind, handoff_step=d.k, round_id=round_id, state="queued", shared=share)
                try:
                    self.store.add(rec)
                except Exception:  # the same idempotency key twice in one round: the first one wins
                    existing = self.store.by_key(client, job.idempotency_key or "")
                    if existing is None:
                        raise
                    out[i] = existing
                    continue
                out[i] = rec
                queued.append(rec.id)
            with self._cv:   # the round's jobs reach the worker together (a group's prefix runs once)
                self._unfinished += len(queued)
                self._inbox.extend((job_id, "start") for job_id in queued)
                self._cv.notify()
        return [r for r in out if r is not None]

    # ---- device side (called from handlers) ----------------------------------------------
    def fetch_handoff(self, job: JobRecord) -> bytes:
        with self._cv:
            data = self._handoffs.get(job.id)
            state = self.store.get(job.id).state  # type: ignore[union-attr]
            if state in ("awaiting_device", "on_device") and data is not None:
                if state == "awaiting_device":
                    self.store.update(job.id, state="on_device")
                self._deadlines[job.id] = time.monotonic() + self.settings.report_timeout_s
                return data
        if state in ("queued", "running") or (state in ("awaiting_device", "on_device") and data is None):
            raise JobConflict(f"the handoff of job {job.id} is not ready yet (state {state}); retry")
        if job.kind == "edge_only":
            raise JobConflict(f"job {job.id} runs on the edge only: it has no handoff; fetch its image")
        raise JobConflict(f"job {job.id} is {state}: its handoff is no longer offered")

    def report(self, job: JobRecord, report: CompletionReport) -> JobRecord:
        with self._cv:
            rec = self.store.get(job.id)
            state = rec.state  # type: ignore[union-attr]
            if rec.terminal or (not report.ok and state not in ("awaiting_device", "on_device")):  # type: ignore[union-attr]
                raise JobConflict(f"job {job.id} is {state}; only a job handed to a device takes a report")
            self._deadlines.pop(job.id, None)
            if report.ok:  # the device has the image, whatever the edge was doing (a restart, a fallback)
                self.store.update(job.id, state="done", latency_ms=report.latency_ms, quality=report.quality)
                self._handoffs.pop(job.id, None)
                self._cancelled.add(job.id)  # an edge chain still running for it stops
                self._unfinished -= 1
                self.metrics.completed.labels(by="device").inc()
            else:
                self._fallback(job.id, f"the device reported failure: {report.error or 'no reason given'}")
        self.decider_observe(job, report)
        return self.store.get(job.id)  # type: ignore[return-value]

    def decider_observe(self, job: JobRecord, report: CompletionReport) -> None:
        """Hand a completion to a learning scheduler (one that has ``observe``): the device's report, or
        the edge's own (an edge-only job or a fallback: its time from acceptance to the image)."""
        observe = getattr(self.decider.solver, "observe", None)
        if observe is not None and report.ok:
            try:
                observe(job, report)
            except Exception:  # a scheduler's defect must not fail the job
                log.exception("scheduler observe failed for job %s", job.id)

    def _edge_remaining(self) -> list[int]:
        """Edge steps left per chain in the executor now (the bandit's edge-load context; a snapshot)."""
        return [(c.steps if c.stop_at is None else c.stop_at) - c.step for c in list(self.executor.active)]

    def cancel(self, job: JobRecord) -> JobRecord:
        with self._cv:
            rec = self.store.get(job.id)
            if rec is None or rec.terminal:
                raise JobConflict(f"job {job.id} is already {rec.state if rec else 'gone'}")
            self._cancelled.add(job.id)
            self._deadlines.pop(job.id, None)
            self._handoffs.pop(job.id, None)
            self.store.update(job.id, state="cancelled")
            self._unfinished -= 1
            self._cv.notify()
        return self.store.get(job.id)  # type: ignore[return-value]

    def _fallback(self, job_id: str, reason: str) -> None:
        """(Holding the lock.) The edge finishes the job itself."""
        log.info("job %s falls back to the edge: %s", job_id, reason)
        self.store.update(job_id, state="fallback", fallback=1, error=reason)
        self.metrics.fallbacks.inc()
        self._inbox.append((job_id, "fallback"))
        self._cv.notify()

    # ---- the worker ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                if self._stop:
                    return
                if not self._inbox and self.executor.idle:
                    self._cv.wait(timeout=0.05)
                work = list(self._inbox)
                self._inbox.clear()
                now = time.monotonic()
                for job_id, when in list(self._deadlines.items()):
                    if when <= now:
                        del self._deadlines[job_id]
                        state = self.store.get(job_id).state  # type: ignore[union-attr]
                        what = "fetch its handoff" if state == "awaiting_device" else "report"
                        self._fallback(job_id, f"the device did not {what} in time")  # runs next turn
                cancelled = set(self._cancelled)
                self._cancelled.clear()
            try:
                self._work(work, cancelled)
            except Exception:  # the worker must outlive any one job's defect
                log.exception("edge worker step failed")

    def _work(self, work: list[tuple[str, str]], cancelled: set[str]) -> None:
        ready: list[Chain] = []
        for job_id, what in work:
            if job_id in cancelled:
                continue
            try:
                chain = self._chain_for(job_id, what)
            except Exception as exc:
                self._fail(job_id, f"cannot build the chain: {exc}")
                continue
            if chain is None:
                continue
            if chain is _JOINED_PREFIX:
                if what == "start":
                    self._mark_running(job_id)
                continue
            self._chain_jobs[chain.id] = [job_id]
            if chain.done or chain.stopped:
                ready.append(chain)
            else:
                self.executor.submit(chain)
                if what == "start":
                    self._mark_running(job_id)
        if cancelled:
            self.executor.active = self._still_wanted(self.executor.active, cancelled)
        if ready:  # chains with nothing to run here (device only: the seeded noise) leave before the next step
            self._finish(ready, cancelled)
            ready = []
        if not self.executor.idle:
            t0 = time.perf_counter()
            n = self.executor.step()
            self.metrics.step_seconds.observe(time.perf_counter() - t0)
            self.metrics.batch_size.observe(n)
        self.metrics.queue_depth.set(len(self.executor.active))
        self._finish(self.executor.drain(), cancelled)

    def _finish(self, chains: list[Chain], cancelled: set[str]) -> None:
        """Chains that leave the edge: decode the finished ones, encode the others' handoffs; a group's
        prefix forks into its members' chains."""
        prefixes = [c for c in chains if c.id in self._prefix_members]
        chains = [c for c in chains if c.id not in self._prefix_members]
        for prefix in prefixes:
            chains += self._fork_members(prefix, cancelled)
        chains = self._still_wanted(chains, cancelled)
        if chains:
            for chain, result in zip(chains, finish_chains(self.family, chains, self.settings.max_batch)):
                for job_id in self._chain_jobs.pop(chain.id):
                    self._left_edge(job_id, result)

    def _still_wanted(self, chains: list[Chain], cancelled: set[str]) -> list[Chain]:
        """``chains`` without those whose every job is cancelled (a group's prefix chain, which has no
        job of its own, stays); a fork keeps running for its copies that are not."""
        kept = []
        for chain in chains:
            jobs = self._chain_jobs.get(chain.id)
            if jobs is not None:
                jobs = self._chain_jobs[chain.id] = [j for j in jobs if j not in cancelled]
                if not jobs:   # nobody wants it any more
                    del self._chain_jobs[chain.id]
                    continue
            kept.append(chain)
        return kept

    def _join_prefix(self, job: JobRecord, stop_at: int | None) -> None:
        """Queue ``job`` behind its group's prefix chain (started here if the group has none running)."""
        share = job.shared or {}
        key = (job.round_id, share["leader"], share["steps"])
        prefix = self._prefixes.get(key)
        if prefix is None:
            prefix = new_chain(self.family, Request.from_dict(share["leader_request"]),
                               Plan.from_list(share["leader_plan"]), stop_at=share["steps"])
            self._prefixes[key] = prefix
            self._prefix_members[prefix.id] = []
            self.executor.submit(prefix)
        self._prefix_members[prefix.id].append((job.id, stop_at))

    def _fork_members(self, prefix: Chain, cancelled: set[str]) -> list[Chain]:
        """The prefix reached s: each member continues as a fork (own prompt, plan and stop); the forks
        with nothing left to run here are returned (they leave the edge now)."""
        self._prefixes = {k: c for k, c in self._prefixes.items() if c is not prefix}
        leaving = []
        forks: dict[str, Chain] = {}   # what a fork's chain depends on -> the fork
        for job_id, stop_at in self._prefix_members.pop(prefix.id, []):
            rec = self.store.get(job_id)
            if job_id in cancelled or rec is None or rec.terminal:
                continue
            key = json.dumps([{k: v for k, v in rec.engine_request.items() if k != "seed"}, rec.plan, stop_at],
                             sort_keys=True)
            if key in forks:   # the same chain from here: run once, for both
                self._chain_jobs[forks[key].id].append(job_id)
                self.metrics.copies_joined.inc()
                continue
            fork = prefix.fork(Request.from_dict(rec.engine_request), Plan.from_list(rec.plan), self.family)
            fork.stop_at = stop_at
            forks[key] = fork
            self._chain_jobs[fork.id] = [job_id]
            if fork.done or fork.stopped:
                leaving.append(fork)
            else:
                self.executor.submit(fork)
        return leaving

    def _mark_running(self, job_id: str) -> None:
        with self._cv:  # a cancel that came in while the chain was built wins
            rec = self.store.get(job_id)
            if rec is not None and not rec.terminal:
                self.store.update(job_id, state="running")

    def _chain_for(self, job_id: str, what: str) -> Chain | None:
        job = self.store.get(job_id)
        if job is None or job.terminal:
            return None
        request, plan = Request.from_dict(job.engine_request), Plan.from_list(job.plan)
        stop_at = None if job.kind == "edge_only" else job.handoff_step
        if what == "fallback":
            data = self._handoffs.pop(job_id, None)
            if data is not None:
                return from_handoff(self.family, decode_handoff(data))
            stop_at = None   # after a restart: the whole chain, same seed (and the same prefix)
        if job.shared:
            self._join_prefix(job, stop_at)
            return _JOINED_PREFIX
        return new_chain(self.family, request, plan, stop_at=stop_at)

    def _left_edge(self, job_id: str, result: Any) -> None:
        with self._cv:
            rec = self.store.get(job_id)
            if rec is None or rec.terminal:
                return
            if result.image is not None:
                self.store.update(job_id, state="done", image=png_bytes(result.image))
                self._unfinished -= 1
                self.metrics.completed.labels(by="fallback" if rec.fallback else "edge").inc()
                waited_ms = min(max(0.0, (time.time() - rec.created) * 1e3), 86_400_000.0)  # the report's range
                edge_done = CompletionReport(latency_ms=waited_ms)
            else:
                edge_done = None
                data = encode_handoff(result.handoff, dtype=self.settings.handoff_dtype,
                                      compress=self.settings.handoff_compress)
                self.metrics.handoff_bytes.observe(len(data))
                self._handoffs[job_id] = data
                self.store.update(job_id, state="awaiting_device")
                self._deadlines[job_id] = time.monotonic() + self.settings.fetch_timeout_s
        if edge_done is not None:
            self.decider_observe(rec, edge_done)

    def _fail(self, job_id: str, reason: str) -> None:
        log.error("job %s failed: %s", job_id, reason)
        with self._cv:
            rec = self.store.get(job_id)
            if rec is not None and not rec.terminal:
                self.store.update(job_id, state="failed", error=reason)
                self._unfinished -= 1
