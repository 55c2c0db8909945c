"""Accepted jobs on disk (SQLite): nothing the edge accepted is lost when it restarts.

A job is written before its 202 goes out; every state change is written as it happens; finished
images are stored as PNG bytes. On start the service re-runs every job that is not in a terminal
state from its stored request and plan (same seed: the same image). One connection, one lock:
the worker thread and the HTTP handlers share it, and SQLite's own WAL keeps the file consistent
across a crash.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from relaydiff.serve.models import TERMINAL_STATES

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    client TEXT NOT NULL,
    idempotency_key TEXT,
    request TEXT NOT NULL,
    engine_request TEXT NOT NULL,
    plan TEXT NOT NULL,
    kind TEXT NOT NULL,
    handoff_step INTEGER NOT NULL,
    round_id INTEGER NOT NULL,
    state TEXT NOT NULL,
    fallback INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    latency_ms REAL,
    quality REAL,
    image BLOB,
    shared TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE (client, idempotency_key)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class JobRecord:
    id: str
    client: str
    idempotency_key: str | None
    request: dict[str, Any]          # the HTTP JobRequest, as sent
    engine_request: dict[str, Any]   # relaydiff.engine.plan.Request.to_dict()
    plan: list[dict[str, Any]]       # relaydiff.engine.plan.Plan.to_list()
    kind: str
    handoff_step: int
    round_id: int
    state: str
    fallback: bool = False
    error: str | None = None
    latency_ms: float | None = None
    quality: float | None = None
    has_image: bool = False
    shared: dict[str, Any] | None = None   # a shared-prefix member: {"steps", "leader", "leader_request", "leader_plan"}
    created: float = 0.0
    updated: float = 0.0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


_COLUMNS = ("id, client, idempotency_key, request, engine_request, plan, kind, handoff_step, round_id, state, "
            "fallback, error, latency_ms, quality, image IS NOT NULL, shared, created, updated")


def _record(row: tuple) -> JobRecord:
    (id_, client, key, request, engine_request, plan, kind, k, round_id, state, fallback, error, latency,
     quality, has_image, shared, created, updated) = row
    return JobRecord(id_, client, key, json.loads(request), json.loads(engine_request), json.loads(plan), kind,
                     int(k), int(round_id), state, bool(fallback), error, latency, quality, bool(has_image),
                     json.loads(shared) if shared else None, created, updated)


class JobStore:
    """The jobs table; ``path`` ``":memory:"`` keeps nothing across restarts (tests)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        self._lock = threading.Lock()
        self.listeners: list[Callable[[str], None]] = []   # called with a job id after each update (any thread)
        with self._lock:
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
            if "shared" not in columns:   # a store written before shared prefixes
                self._db.execute("ALTER TABLE jobs ADD COLUMN shared TEXT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _one(self, sql: str, args: tuple) -> tuple | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def next_round_id(self) -> int:
        """Round ids keep counting across restarts (they seed each round's channel draw)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key='round'").fetchone()
            value = int(row[0]) + 1 if row else 1
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('round', ?)", (str(value),))
            return value

    def add(self, job: JobRecord) -> None:
        now = time.time()
        job.created = job.updated = now
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, client, idempotency_key, request, engine_request, plan, kind, handoff_step, "
                "round_id, state, shared, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.client, job.idempotency_key, json.dumps(job.request), json.dumps(job.engine_request),
                 json.dumps(job.plan), job.kind, job.handoff_step, job.round_id, job.state,
                 json.dumps(job.shared) if job.shared else None, now, now))

    def get(self, job_id: str) -> JobRecord | None:
        row = self._one(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return _record(row) if row else None

    def by_key(self, client: str, key: str) -> JobRecord | None:
        row = self._one(f"SELECT {_COLUMNS} FROM jobs WHERE client = ? AND idempotency_key = ?", (client, key))
        return _record(row) if row else None

    def update(self, job_id: str, **fields: Any) -> None:
        allowed = {"state", "fallback", "error", "latency_ms", "quality", "image"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"cannot update {sorted(set(fields) - allowed)}")
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {cols}, updated = ? WHERE id = ?",
                             (*fields.values(), time.time(), job_id))
        for listener in self.listeners:
            listener(job_id)

    def image(self, job_id: str) -> bytes | None:
        row = self._one("SELECT image FROM jobs WHERE id = ?", (job_id,))
        return row[0] if row else None

    def unfinished(self) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state NOT IN "
                                    f"({', '.join('?' * len(TERMINAL_STATES))}) ORDER BY created",
                                    tuple(sorted(TERMINAL_STATES))).fetchall()
        return [_record(r) for r in rows]

    def recent(self, limit: int = 20) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY created DESC LIMIT ?", (limit,)).fetchall()
        return [_record(r) for r in rows]

    def count_by_state(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {s: int(n) for s, n in rows}
