"""Families of rounds: a shipped scenario, overrides of its fields, an optional instance transform.

They are the perturbation set of issue 18 (edge compute share, edge memory, pooled edges, slow
edge, quality tables, channel, weights, device mix, steps). Training draws one family per episode
(domain randomization, :class:`relaydiff.sim.round_env.RoundEnvConfig` ``families``) from
:data:`TRAINING_FAMILIES`; the others stay held out, and ``relaydiff bench offload`` reports every
family apart. Each held-out family has a relative in training (slow edge ~ tiny edge share, pooled
edges ~ edge memory, latency first ~ extreme weights, laptops ~ low-end devices, 50 steps ~ 10
steps; the poor channel has none), so the held-out figures measure generalization, not luck.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from relaydiff.system.problem import RoundInstance, sample_instance
from relaydiff.system.scenario import Scenario, load_scenario


def _random_quality(inst: RoundInstance, rng: np.random.Generator) -> RoundInstance:
    """Quality tables unlike any measured or fitted curve: a random walk in k from a random start."""
    n, t = inst.n_users, inst.steps
    start = rng.uniform(0.3, 0.8, size=(n, 1))
    walk = np.cumsum(rng.normal(0.01, 0.03, size=(n, t)), axis=1)
    q = np.clip(np.concatenate([start, start + walk], axis=1), 0.0, 1.0)
    return dataclasses.replace(inst, quality=q)


def _pooled_edges(servers: int) -> Callable[[RoundInstance, np.random.Generator], RoundInstance]:
    """``servers`` edge servers pooled as one (step times / servers, memory x servers): an approximation,
    since the round model has one edge."""
    def transform(inst: RoundInstance, rng: np.random.Generator) -> RoundInstance:
        return dataclasses.replace(inst, edge_alpha_s=inst.edge_alpha_s / servers, edge_beta_s=inst.edge_beta_s / servers,
                                   max_batch=inst.max_batch * servers)
    return transform


def _slow_edge(factor: float) -> Callable[[RoundInstance, np.random.Generator], RoundInstance]:
    """The edge's per-step times x ``factor`` (a 10x load from other work on the same GPU)."""
    def transform(inst: RoundInstance, rng: np.random.Generator) -> RoundInstance:
        return dataclasses.replace(inst, edge_alpha_s=inst.edge_alpha_s * factor, edge_beta_s=inst.edge_beta_s * factor)
    return transform


@dataclasses.dataclass(frozen=True)
class Family:
    """A distribution of rounds: a shipped scenario, overrides of its fields, an optional instance transform."""

    name: str
    base: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    transform: Callable[[RoundInstance, np.random.Generator], RoundInstance] | None = None
    about: str = ""

    def scenario(self) -> Scenario:
        base = load_scenario(self.base)
        data = base.model_dump()
        for key, value in self.overrides.items():
            if isinstance(value, dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        data["name"] = self.name
        return Scenario.model_validate(data)

    def sample(self, sc: Scenario, n: int, rng: np.random.Generator) -> RoundInstance:
        """One round of ``n`` users (``sc`` is :meth:`scenario`, resolved once by the caller)."""
        inst = sample_instance(sc, n_users=n, seed=rng)
        return self.transform(inst, rng) if self.transform else inst


FAMILIES: tuple[Family, ...] = (
    Family("default", "default", about="the default scenario as shipped"),
    Family("congested", "congested", about="the congested scenario as shipped"),
    Family("tiny_edge_share", "default", {"edge": {"capacity": (0.03, 0.1)}}, about="3-10% of the edge GPU free"),
    Family("slow_edge_10x", "default", transform=_slow_edge(10.0), about="edge step times x10 (10x load)"),
    Family("edge_memory_4", "default", {"edge": {"max_batch": 4}}, about="the edge holds 4 chains: admission binds"),
    Family("three_edges", "default", transform=_pooled_edges(3), about="3 edge servers pooled (step times / 3, memory x 3)"),
    Family("random_quality", "default", transform=_random_quality, about="random-walk quality tables"),
    Family("poor_channel", "default", {"wireless": {"distance_m": (400.0, 2000.0), "bandwidth_hz": 2e6}},
           about="users 0.4-2 km away on a 2 MHz downlink"),
    Family("extreme_weights", "default", {"preferences": {"concentration": (0.15, 0.15, 0.15)}},
           about="Dirichlet(0.15): most users weigh one term only"),
    Family("latency_first", "default", {"preferences": {"concentration": (0.5, 6.0, 0.5)}}, about="latency dominates"),
    Family("low_end_devices", "default", {"devices": {"phone-low": 1.0}}, about="every device a low-end phone"),
    Family("laptops", "default", {"devices": {"laptop": 1.0}}, about="every device a laptop"),
    Family("steps_10", "default", {"steps": 10, "splits": (2, 4, 6, 8, 10)}, about="10-step chains"),
    Family("steps_50", "default", {"steps": 50, "splits": (10, 20, 30, 40, 50)}, about="50-step chains"),
)

# The domain-randomization mix of the shipped policy; the other six families are held out.
TRAINING_FAMILIES: tuple[str, ...] = ("default", "congested", "tiny_edge_share", "edge_memory_4", "random_quality",
                                      "extreme_weights", "low_end_devices", "steps_10")


def family_names() -> list[str]:
    return [f.name for f in FAMILIES]


def get_families(names: Sequence[str]) -> list[Family]:
    """The families called ``names`` (ValueError listing the known names otherwise)."""
    by_name = {f.name: f for f in FAMILIES}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown families {unknown}; available: {', '.join(by_name)}")
    return [by_name[n] for n in names]
