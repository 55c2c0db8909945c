"""LLMAgent: a generative agent on any OpenAI-compatible chat endpoint scores a user's QoE.

The agent plays a persona built from the user's Big-Five traits, reads what the user perceived
(:meth:`relaydiff.sim.agents.Perception.as_text`; plus the image itself, as a PNG data URL, when
``images`` is on and the caller passes one), and answers with one JSON object
``{"score": <integer 1-10>, "reason": "<text>"}``, parsed strictly (anything else is malformed).

Robustness, so that it never breaks a training run: a per-request timeout, a bounded number of
retries, a cache keyed by (model, persona, observation), and a call budget. A malformed or
failed answer, or one past the budget, is counted and replaced by the :class:`SurrogateAgent`'s
score for that user. Nothing is contacted unless an endpoint is configured: the base URL, model
and key come from the arguments or from ``RELAYDIFF_LLM_BASE_URL``, ``RELAYDIFF_LLM_MODEL`` and
``RELAYDIFF_LLM_API_KEY``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from relaydiff.sim.agents import TRAITS, Perception, SurrogateAgent, check_traits

SYSTEM_PROMPT = (
    "You role-play one user of an image-generation service and rate your experience of one request. "
    "Stay in character. Answer with one JSON object and nothing else: "
    '{"score": <integer from 1 (awful) to 10 (perfect)>, "reason": "<one short sentence>"}.'
)


class LLMConfigError(ValueError):
    """The LLM endpoint is not configured (or configured badly)."""


def persona(traits: np.ndarray) -> str:
    """A short persona from Big-Five traits in [0, 1]."""
    words = []
    for name, v in zip(TRAITS, np.asarray(traits, dtype=float)):
        level = "very low" if v < 0.2 else "low" if v < 0.4 else "average" if v < 0.6 else "high" if v < 0.8 else "very high"
        words.append(f"{level} {name} ({v:.2f})")
    return "Your Big-Five personality: " + ", ".join(words) + "."


def parse_answer(text: str | None) -> tuple[int, str]:
    """(score, reason) from the model's reply; ValueError unless it is exactly the JSON asked for."""
    if not isinstance(text, str):
        raise ValueError("empty answer")
    data = json.loads(text.strip())
    if not isinstance(data, dict) or set(data) != {"score", "reason"}:
        raise ValueError(f"expected keys score and reason, got {sorted(data) if isinstance(data, dict) else type(data).__name__}")
    score, reason = data["score"], data["reason"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or score != int(score) or not 1 <= score <= 10:
        raise ValueError(f"score must be an integer in 1..10, got {score!r}")
    if not isinstance(reason, str):
        raise ValueError("reason must be a string")
    return int(score), reason


@dataclass
class LLMStats:
    """Counters of one agent's life."""

    calls: int = 0  # requests sent (retries included)
    answered: int = 0  # users scored by the endpoint
    cache_hits: int = 0
    malformed: int = 0  # answers that failed strict parsing (each attempt)
    failed: int = 0  # requests that raised (timeout, HTTP error, connection)
    fallbacks: int = 0  # users scored by the surrogate instead
    over_budget: int = 0  # users not sent because the call budget was spent


@dataclass
class LLMAgent:
    """QoE from an OpenAI-compatible chat endpoint; see the module docstring."""

    base_url: str | None = None
    model: str | None = None
    api_key: str | None = None
    timeout_s: float = 20.0
    retries: int = 2  # extra attempts after a failed or malformed answer
    max_calls: int = 1000  # the call budget (requests, retries included)
    json_mode: bool = True  # ask for response_format={"type": "json_object"}
    images: bool = False  # send the image when the caller gives one (vision endpoints)
    temperature: float = 0.0
    fallback: SurrogateAgent = field(default_factory=SurrogateAgent)
    stats: LLMStats = field(default_factory=LLMStats)
    reasons: list[str] = field(default_factory=list)  # the last score() call's reasons, one per user
    _cache: dict[str, tuple[int, str]] = field(default_factory=dict, repr=False)
    _client: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.base_url = self.base_url or os.environ.get("RELAYDIFF_LLM_BASE_URL")
        self.model = self.model or os.environ.get("RELAYDIFF_LLM_MODEL")
        self.api_key = self.api_key or os.environ.get("RELAYDIFF_LLM_API_KEY") or "none"
        if not self.base_url or not self.model:
            raise LLMConfigError("LLM agent: set a base URL and a model (RELAYDIFF_LLM_BASE_URL, RELAYDIFF_LLM_MODEL)")
        if self.timeout_s <= 0 or self.retries < 0 or self.max_calls < 0:
            raise LLMConfigError("LLM agent: timeout_s must be > 0, retries and max_calls >= 0")
        # lazy: openai is optional in use: only a configured LLM endpoint needs it
        from openai import OpenAI

        self._client = OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout_s, max_retries=0)

    def _messages(self, who: str, p: Perception, image_png: bytes | None) -> list[dict[str, Any]]:
        text = f"{who}\n\n{p.as_text()}\n\nHow satisfied are you? Answer in the JSON format."
        content: Any = text
        if self.images and image_png is not None:
            url = "data:image/png;base64," + base64.b64encode(image_png).decode()
            content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]

    def _ask(self, who: str, p: Perception, image_png: bytes | None) -> tuple[int, str] | None:
        key = hashlib.sha256(json.dumps([self.model, who, p.as_text(), self.images and image_png is not None and
                                         hashlib.sha256(image_png).hexdigest()]).encode()).hexdigest()
        if key in self._cache:
            self.stats.cache_hits += 1
            return self._cache[key]
        extra: dict[str, Any] = {"response_format": {"type": "json_object"}} if self.json_mode else {}
        for _ in range(self.retries + 1):
            if self.stats.calls >= self.max_calls:
                self.stats.over_budget += 1
                return None
            self.stats.calls += 1
            try:
                reply = self._client.chat.completions.create(model=self.model, messages=self._messages(who, p, image_png),
                                                             temperature=self.temperature, **extra)
                text = reply.choices[0].message.content
            except Exception:  # noqa: BLE001 - any endpoint failure falls back, never crashes training
                self.stats.failed += 1
                continue
            try:
                answer = parse_answer(text)
            except (ValueError, TypeError):
                self.stats.malformed += 1
                continue
            self._cache[key] = answer
            return answer
        return None

    def score(self, traits: np.ndarray, perceptions: Sequence[Perception],
              images_png: Sequence[bytes | None] | None = None) -> np.ndarray:
        """Scores in [1, 10]; users the endpoint could not score get the surrogate's score."""
        t = check_traits(traits, len(perceptions))
        imgs = list(images_png) if images_png is not None else [None] * len(perceptions)
        out = np.empty(len(perceptions))
        self.reasons = []
        fallback_idx = []
        for i, p in enumerate(perceptions):
            answer = self._ask(persona(t[i]), p, imgs[i])
            if answer is None:
                fallback_idx.append(i)
                self.reasons.append("(surrogate: the endpoint gave no valid answer)")
            else:
                out[i] = answer[0]
                self.stats.answered += 1
                self.reasons.append(answer[1])
        if fallback_idx:
            self.stats.fallbacks += len(fallback_idx)
            out[fallback_idx] = self.fallback.score(t[fallback_idx], [perceptions[i] for i in fallback_idx])
        return out


__all__ = ["LLMAgent", "LLMConfigError", "LLMStats", "SYSTEM_PROMPT", "parse_answer", "persona"]
