"""Prometheus metrics of one edge service (its own registry: two services in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from relaydiff.serve.models import JOB_STATES


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("relaydiff_queue_depth", "Chains in the edge executor", registry=r)
        self.batch_size = Histogram("relaydiff_batch_size", "Chains advanced per batched U-Net call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.step_seconds = Histogram("relaydiff_step_seconds", "Wall time of one batched executor step",
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
                                      registry=r)
        self.jobs = Gauge("relaydiff_jobs", "Jobs in the store by state", ["state"], registry=r)
        self.completed = Counter("relaydiff_completed", "Jobs completed, by who finished them", ["by"], registry=r)
        self.fallbacks = Counter("relaydiff_fallbacks", "Jobs the edge finished for a device", registry=r)
        self.copies_joined = Counter("relaydiff_copies_joined", "Jobs that received a fork another member of "
                                     "their shared-prefix group ran (the same request and plan)", registry=r)
        self.rounds = Counter("relaydiff_rounds", "Scheduling rounds decided", registry=r)
        self.round_jobs = Histogram("relaydiff_round_jobs", "Jobs decided together in one round",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.handoff_bytes = Histogram("relaydiff_handoff_bytes", "Size of the handoffs offered to devices",
                                       buckets=(1e3, 4e3, 16e3, 64e3, 256e3, 1e6, 4e6), registry=r)
        self.rejected = Counter("relaydiff_rejected", "Requests refused by a limit", ["status"], registry=r)

    def render(self, counts: dict[str, int]) -> bytes:
        for state in JOB_STATES:
            self.jobs.labels(state=state).set(counts.get(state, 0))
        return generate_latest(self.registry)
