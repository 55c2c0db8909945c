"""A bandit that picks relay configurations from the relay context (what the bench, the live run and the
service call).

Every caller holds the relay context of :data:`relaydiff.sim.relay_stream.CONTEXT_FEATURES` (17
numbers the edge observes when a request arrives). The disjoint policies (``linucb``, ``lints``,
``egreedy``, ``swlinucb``) read it as is; ``linucb_shared`` reads it combined with the arms'
measured descriptors (:mod:`relaydiff.sim.relay_arm_features`). :class:`RelayBandit` hides the
difference: ``decide(context) -> arm index`` and ``update(arm, context, reward)``, with the context
always the 17-number relay context.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from relaydiff.sched.bandit import Bandit, BanditError, SharedLinUCB, make_bandit
from relaydiff.sim.relay_arm_features import (arm_context, arm_context_features, arm_context_lift,
                                              arm_context_projection, arm_feature_matrix)
from relaydiff.sim.relay_stream import CONTEXT_FEATURES
from relaydiff.system.relay_arms import RelayArm

RELAY_BANDIT = "linucb_shared"  # the relay scheduler of record (bench bandit: 0.98 of the oracle, stationary)


class RelayBandit:
    """A bandit over the relay arms that takes the relay context (see the module docstring)."""

    def __init__(self, bandit: Bandit):
        self.bandit = bandit
        self.shared = isinstance(bandit, SharedLinUCB)
        dim = len(arm_context_features(bandit.arms)) if self.shared else len(CONTEXT_FEATURES)
        if bandit.needs_context and bandit.dim != dim:
            raise BanditError(f"bandit state: dim {bandit.dim} does not fit the relay context ({dim} for {bandit.kind})")
        if self.shared:  # decisions from the 18 numbers the 29 columns repeat (SharedLinUCB.project)
            bandit.project(arm_context_projection(len(bandit.arms)))

    @classmethod
    def make(cls, kind: str, arms: Sequence[RelayArm], seed: int = 0, **params: Any) -> "RelayBandit":
        """A new policy of ``kind`` over ``arms`` (params: the policy's own, e.g. alpha and l2)."""
        names = [a.name for a in arms]
        if kind == SharedLinUCB.kind:
            return cls(make_bandit(kind, names, len(arm_context_features(names)), seed=seed,
                                   arm_features=arm_feature_matrix(arms),
                                   feature_names=arm_context_features(names), **params))
        return cls(make_bandit(kind, names, len(CONTEXT_FEATURES), seed=seed, feature_names=CONTEXT_FEATURES,
                               **params))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "RelayBandit":
        return cls(Bandit.from_pretrained(path))

    def save_pretrained(self, path: str | Path) -> Path:
        return self.bandit.save_pretrained(path)

    @property
    def kind(self) -> str:
        return self.bandit.kind

    @property
    def arms(self) -> tuple[str, ...]:
        return self.bandit.arms

    def _checked(self, context: Any) -> np.ndarray:
        x = np.asarray(context, dtype=np.float64)
        if x.shape != (len(CONTEXT_FEATURES),):
            raise BanditError(f"context: expected {len(CONTEXT_FEATURES)} relay features, got shape {x.shape}")
        if not math.isfinite(x @ x):  # NaN and inf propagate through one dot product
            bad = np.flatnonzero(~np.isfinite(x))
            j = int(bad[0]) if len(bad) else 0
            raise BanditError(f"context[{j}] ({CONTEXT_FEATURES[j]}): not a finite number ({x[j]})")
        return x

    def policy_context(self, context: Any) -> np.ndarray:
        """The bandit's own context for a relay context (checked: shape and finite numbers)."""
        if not self.shared:
            return context  # the bandit checks it
        return arm_context(self._checked(context), len(self.bandit.arms))

    def decide(self, context: Any) -> int:
        if self.shared and self.bandit.t > 0:  # checked here; the lifted numbers are products of checked ones
            return self.bandit.decide_projected(arm_context_lift(self._checked(context)))
        return self.bandit.decide(self.policy_context(context))

    def update(self, arm: int | str, context: Any, reward: float) -> None:
        self.bandit.update(arm, self.policy_context(context), reward)


__all__ = ["RELAY_BANDIT", "RelayBandit"]
