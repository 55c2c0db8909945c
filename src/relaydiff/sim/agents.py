"""QoE agents: who scores a user's experience (1-10) from what the user perceives.

One protocol (:class:`QoEAgent`: ``score(traits, observations) -> scores``), two kinds:

- :class:`SurrogateAgent` (the default): a documented, seeded mapping from Big-Five traits to how
  a user weighs what they get. It stands in for the LLM-driven generative agents of RLLI (Du et
  al.); the mapping below is our modelling assumption, not a measured one.
- :class:`LLMAgent` (:mod:`relaydiff.sim.agents_llm`): any OpenAI-compatible chat endpoint playing
  a persona built from the traits; it falls back to the surrogate on any failure.

Traits are five numbers in [0, 1] in the order :data:`TRAITS` (openness, conscientiousness,
extraversion, agreeableness, neuroticism).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

TRAITS = ("openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism")


@dataclass(frozen=True)
class Perception:
    """What a user perceives of one round: the image's fidelity to their prompt (the judge's
    reading, or the quality table in simulation), its style fidelity when the user asked for a
    style (None otherwise), how long they waited, and the battery energy their device spent."""

    prompt: str
    prompt_fidelity: float
    latency_s: float
    battery_j: float
    style_fidelity: float | None = None

    def as_text(self) -> str:
        parts = [f'You asked for: "{self.prompt}".',
                 f"The image matches your request at {100 * self.prompt_fidelity:.0f}% (an automatic judge's reading).",
                 f"You waited {self.latency_s:.1f} s for it.",
                 f"Your phone spent {self.battery_j:.1f} J of battery on it."]
        if self.style_fidelity is not None:
            parts.insert(2, f"It is in your personal style at {100 * self.style_fidelity:.0f}%.")
        return " ".join(parts)


class QoEAgent(Protocol):
    """Scores each user's experience in [1, 10]."""

    def score(self, traits: np.ndarray, perceptions: Sequence[Perception]) -> np.ndarray: ...


def check_traits(traits: np.ndarray, n: int) -> np.ndarray:
    t = np.asarray(traits, dtype=float)
    if t.shape != (n, len(TRAITS)) or not np.all((t >= 0) & (t <= 1)):
        raise ValueError(f"traits must be an [{n}, 5] array in [0, 1] ({', '.join(TRAITS)}), got shape {t.shape}")
    return t


@dataclass(frozen=True)
class SurrogateAgent:
    """The personality surrogate. For traits (O, C, E, A, N) in [0, 1]:

    - weights: prompt fidelity 1 + 2C (conscientiousness: "did I get what I asked for"), style
      0.5 + 2O (openness: aesthetics; only when a style was requested), waiting 0.5 + 2N
      (neuroticism: impatience), battery 0.25 + 0.5N + 0.5(1 - E) (worry, and introverts' phones
      on long sessions);
    - perceived utilities in [0, 1]: fidelity as read, style as read, waiting exp(-L / tol) with a
      tolerance tol = ``latency_tolerance_s`` (1 - 0.6 N), battery exp(-J / ``battery_ref_j``);
    - agreeableness shifts the score up by ``leniency`` (A - 0.5) (lenient raters);
    - each user's weights get an idiosyncratic factor exp(N(0, ``jitter``)) drawn from a generator
      seeded by ``seed`` and the user's trait vector, so one user always scores alike.

    score = 1 + 9 clip(sum_k w_k u_k / sum_k w_k + leniency (A - 0.5), 0, 1).
    """

    seed: int = 0
    latency_tolerance_s: float = 10.0  # a patient user's e-folding waiting time (assumption)
    battery_ref_j: float = 20.0  # ~ 2.5 phone VAE decodes (phone profiles: 8 J a decode)
    leniency: float = 0.2
    jitter: float = 0.1

    def weights(self, traits: np.ndarray) -> np.ndarray:
        """[n, 4] weights of (fidelity, style, waiting, battery), idiosyncratic factor included."""
        o, c, e, _, n = np.asarray(traits, dtype=float).T
        w = np.stack([1 + 2 * c, 0.5 + 2 * o, 0.5 + 2 * n, 0.25 + 0.5 * n + 0.5 * (1 - e)], axis=1)
        for i, row in enumerate(np.asarray(traits, dtype=float)):
            digest = hashlib.sha256(np.round(row, 6).tobytes() + self.seed.to_bytes(8, "little", signed=True)).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            w[i] *= np.exp(rng.normal(0.0, self.jitter, 4))
        return w

    def score_arrays(self, traits: np.ndarray, fidelity: np.ndarray, latency_s: np.ndarray, battery_j: np.ndarray,
                     style: np.ndarray | None = None, weights: np.ndarray | None = None) -> np.ndarray:
        """Vectorized scores (the env's hot path); ``style`` NaN or None: no style requested."""
        t = np.asarray(traits, dtype=float)
        w = self.weights(t) if weights is None else weights
        n = t[:, 4]
        u = np.stack([np.clip(fidelity, 0, 1),
                      np.zeros(len(t)) if style is None else np.nan_to_num(np.clip(style, 0, 1)),
                      np.exp(-np.asarray(latency_s, float) / (self.latency_tolerance_s * (1 - 0.6 * n))),
                      np.exp(-np.asarray(battery_j, float) / self.battery_ref_j)], axis=1)
        if style is None:
            w = w.copy()
            w[:, 1] = 0.0
        else:
            w = np.where(np.isnan(np.asarray(style, float))[:, None] & (np.arange(4) == 1), 0.0, w)
        mix = (w * u).sum(1) / w.sum(1) + self.leniency * (t[:, 3] - 0.5)
        return 1.0 + 9.0 * np.clip(mix, 0.0, 1.0)

    def score(self, traits: np.ndarray, perceptions: Sequence[Perception]) -> np.ndarray:
        t = check_traits(traits, len(perceptions))
        style = np.array([np.nan if p.style_fidelity is None else p.style_fidelity for p in perceptions])
        return self.score_arrays(t, np.array([p.prompt_fidelity for p in perceptions]),
                                 np.array([p.latency_s for p in perceptions]),
                                 np.array([p.battery_j for p in perceptions]), style)


__all__ = ["TRAITS", "Perception", "QoEAgent", "SurrogateAgent", "check_traits"]
