"""Bearer tokens per client and per-client rate limits.

The tokens file has one ``client-id token`` pair a line (``#`` comments, blank lines allowed).
Only SHA-256 digests of the tokens are kept in memory; a presented token is hashed and compared
in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import threading
import time
from pathlib import Path

CLIENT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MIN_TOKEN_CHARS = 16


class TokenFileError(ValueError):
    """The tokens file is missing or malformed; the message names the line."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenTable:
    """client id by token digest."""

    def __init__(self, pairs: dict[str, str]):
        self._by_digest: dict[bytes, str] = {}
        for client, token in pairs.items():
            if not CLIENT_RE.match(client):
                raise TokenFileError(f"client id {client!r} must be 1-64 letters, digits, '_', '.', '-'")
            if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
                raise TokenFileError(f"the token of {client!r} must be at least {MIN_TOKEN_CHARS} characters, "
                                     "no spaces")
            self._by_digest[_digest(token)] = client

    @classmethod
    def from_file(cls, path: str | Path) -> "TokenTable":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise TokenFileError(f"cannot read the tokens file {path}: {exc.strerror or exc}") from None
        pairs: dict[str, str] = {}
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise TokenFileError(f"{path}:{n}: expected 'client-id token', got {len(parts)} field(s)")
            if parts[0] in pairs:
                raise TokenFileError(f"{path}:{n}: client {parts[0]!r} appears twice")
            pairs[parts[0]] = parts[1]
        if not pairs:
            raise TokenFileError(f"the tokens file {path} names no client")
        return cls(pairs)

    def client(self, token: str) -> str | None:
        """The client a token belongs to, or None (every digest compared: no early exit)."""
        got = _digest(token)
        found = None
        for digest, client in self._by_digest.items():
            if hmac.compare_digest(digest, got):
                found = client
        return found


class RateLimiter:
    """A token bucket per client: ``rate`` submissions a second, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = float(rate), int(burst)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """0 when allowed, else the seconds until the next submission would be."""
        now = time.monotonic()
        with self._lock:
            level, last = self._buckets.get(client, (float(self.burst), now))
            level = min(float(self.burst), level + (now - last) * self.rate)
            if level >= 1.0:
                self._buckets[client] = (level - 1.0, now)
                return 0.0
            self._buckets[client] = (level, now)
            return (1.0 - level) / self.rate if self.rate > 0 else math.inf
