"""Contextual bandits that pick each request's relay configuration (numpy, one file for the family).

Every policy has the same two calls: ``decide(context) -> arm index`` and ``update(arm, context,
reward)``; the oracle decides from the expected rewards instead (``decide_expected``). Inputs are
checked before any state changes: a context with the wrong length or a NaN, an unknown arm or a
reward outside ``reward_range`` raises :class:`BanditError` naming the field, and the policy is left
as it was. State saves as ``<path>.safetensors`` (arrays) + ``<path>.json`` (settings, arm and
feature names, the random generator's state); nothing is pickled.

- :class:`LinUCB`: disjoint LinUCB (Li et al., WWW 2010): a ridge regression per arm, the inverse
  Gram matrix kept by Sherman-Morrison rank-one updates, score theta.x + alpha sqrt(x' A^-1 x).
- :class:`LinTS`: linear Thompson sampling (Agrawal & Goyal, ICML 2013) on the same statistics.
  For one context, theta ~ N(theta_hat, v^2 A^-1) gives a score ~ N(theta_hat.x, v^2 x' A^-1 x),
  so the score is drawn directly (one normal per arm, no Cholesky factor).
- :class:`EpsilonGreedy`: the same ridge estimates, a random arm with probability epsilon.
- :class:`SlidingWindowLinUCB`: LinUCB on the last ``window`` observations of any arm (SW-LinUCB,
  Cheung et al., AISTATS 2019): old data leaves by a Sherman-Morrison downdate, so an arm not played
  for a while regains its uncertainty and is tried again after a shift.
- :class:`SharedLinUCB`: LinUCB with one ridge regression shared by all arms (the shared part of
  Li et al.'s hybrid model): arm a's feature vector is ``arm_features[a] * context`` (elementwise),
  where ``arm_features`` holds what is known about each arm beforehand (for the relay: its measured
  fidelity per complexity, style fidelity, edge and device step fractions; one-hot columns give each
  arm its own intercept). Every reward teaches every arm, so it learns with far fewer requests than
  the disjoint model, which needs ``dim`` observations per arm before its estimate means anything.
- baselines: :class:`UCB1` (context-free, Auer et al. 2002), :class:`RandomArm`, :class:`FixedArm`,
  :class:`Oracle`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from safetensors.numpy import load_file, save_file

from relaydiff.shipped import read_json

STATE_FORMAT = "relaydiff.bandit/1"


def _hyperparameter(name: str, value: Any, low: float, *, above: bool = False, high: float | None = None) -> float:
    """``value`` as a float, or a BanditError naming the field when it is not a number >= ``low``
    (> ``low`` with ``above``; <= ``high`` when given): one check for every policy's parameters."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise BanditError(f"{name}: not a number ({value!r})") from None
    if not math.isfinite(v):
        raise BanditError(f"{name}: must be a finite number, got {value}")
    if high is not None and not low <= v <= high:
        raise BanditError(f"{name}: must be in [{low:g}, {high:g}], got {value}")
    if high is None and not (v > low if above else v >= low):
        raise BanditError(f"{name}: must be {'>' if above else '>='} {low:g}, got {value}")
    return v


class BanditError(ValueError):
    """A bad input to a bandit (context, arm, reward or state file); the message names the field."""


class Bandit:
    """The interface and the input checks every policy shares."""

    kind: ClassVar[str] = ""
    needs_context: ClassVar[bool] = True
    hyperparameters: ClassVar[tuple[str, ...]] = ()  # constructor settings this class adds (see params)

    def __init__(self, arms: Sequence[str], dim: int, *, reward_range: tuple[float, float] = (-3.0, 1.0),
                 feature_names: Sequence[str] | None = None, seed: int = 0):
        if len(arms) < 1 or len(set(arms)) != len(arms):
            raise BanditError(f"arms: need distinct arm names, got {list(arms)}")
        _hyperparameter("dim", dim, 1)
        if feature_names is not None and len(feature_names) != dim:
            raise BanditError(f"feature_names: {len(feature_names)} names for dim {dim}")
        lo, hi = (float(v) for v in reward_range)
        if not lo < hi:
            raise BanditError(f"reward_range: need low < high, got {reward_range}")
        self.arms = tuple(str(a) for a in arms)
        self.dim = int(dim)
        self.reward_range = (lo, hi)
        self.feature_names = tuple(feature_names) if feature_names is not None else None
        self.seed = int(seed)
        self.rng = np.random.default_rng(seed)
        self.t = 0  # updates so far
        self._cold = 0  # decisions before the first update
        self._index = {a: i for i, a in enumerate(self.arms)}

    # ---- checks (run before any state changes) ----------------------------------------------

    def check_context(self, context: Any) -> np.ndarray:
        x = np.asarray(context, dtype=np.float64)
        if x.shape != (self.dim,):
            raise BanditError(f"context: expected {self.dim} features, got shape {x.shape}")
        if not math.isfinite(x @ x):  # one dot product: NaN and inf propagate (faster than isfinite().all())
            bad = np.flatnonzero(~np.isfinite(x))
            if not len(bad):
                raise BanditError(f"context: features too large (sum of squares overflows): {x}")
            j = int(bad[0])
            name = f" ({self.feature_names[j]})" if self.feature_names else ""
            raise BanditError(f"context[{j}]{name}: not a finite number ({x[j]})")
        return x

    def check_arm(self, arm: int | str) -> int:
        if isinstance(arm, str):
            if arm not in self._index:
                raise BanditError(f"arm: unknown arm {arm!r} (arms: {', '.join(self.arms)})")
            return self._index[arm]
        if isinstance(arm, (bool, np.bool_)) or not isinstance(arm, (int, np.integer)) or not 0 <= arm < len(self.arms):
            raise BanditError(f"arm: unknown arm {arm!r} (indices 0..{len(self.arms) - 1})")
        return int(arm)

    def check_reward(self, reward: Any) -> float:
        try:
            r = float(reward)
        except (TypeError, ValueError):
            raise BanditError(f"reward: not a number ({reward!r})") from None
        lo, hi = self.reward_range
        if not lo <= r <= hi:  # NaN fails too
            raise BanditError(f"reward: {r} is outside its range [{lo:g}, {hi:g}]")
        return r

    # ---- the policy -------------------------------------------------------------------------

    def decide(self, context: Any) -> int:
        x = self.check_context(context)
        if self.t == 0 and self.needs_context:  # no feedback yet: arms in turn (not arm 0 until the first reward)
            self._cold += 1
            return (self._cold - 1) % len(self.arms)
        return self._decide(x)

    def update(self, arm: int | str, context: Any, reward: float) -> None:
        a, x, r = self.check_arm(arm), self.check_context(context), self.check_reward(reward)
        self._update(a, x, r)
        self.t += 1

    def _decide(self, x: np.ndarray) -> int:
        raise NotImplementedError

    def _update(self, a: int, x: np.ndarray, r: float) -> None:
        pass

    # ---- state ------------------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        """The constructor's own settings (saved in the JSON): the ``hyperparameters`` each class in
        the hierarchy names, base classes' first."""
        names = [n for cls in reversed(type(self).__mro__) for n in vars(cls).get("hyperparameters", ())]
        return {n: getattr(self, n) for n in names}

    def arrays(self) -> dict[str, np.ndarray]:
        """The learned state (saved as safetensors)."""
        return {}

    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        pass

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Bandit":
        """A policy saved with :meth:`save_pretrained` (``path`` with or without a suffix; the JSON
        names its kind)."""
        return _load_bandit(path)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` and ``<path>.json``; returns the JSON path."""
        base = Path(path).with_suffix("")
        base.parent.mkdir(parents=True, exist_ok=True)
        arrays = {k: np.ascontiguousarray(v) for k, v in self.arrays().items()}
        arrays["_t"] = np.array([self.t], dtype=np.int64)
        save_file(arrays, str(base.with_suffix(".safetensors")))
        meta = {"format": STATE_FORMAT, "kind": self.kind, "arms": list(self.arms), "dim": self.dim,
                "reward_range": list(self.reward_range), "seed": self.seed,
                "feature_names": list(self.feature_names) if self.feature_names else None,
                "params": self.params(), "rng": self.rng.bit_generator.state}
        out = base.with_suffix(".json")
        out.write_text(json.dumps(meta, indent=1) + "\n")
        return out


class _Ridge(Bandit):
    """Disjoint ridge regression per arm: A^-1 (Sherman-Morrison), b, theta = A^-1 b."""

    hyperparameters = ("l2",)

    def __init__(self, arms: Sequence[str], dim: int, *, l2: float = 1.0, **kw: Any):
        super().__init__(arms, dim, **kw)
        self.l2 = _hyperparameter("l2", l2, 0, above=True)
        k, d = len(self.arms), self.dim
        # theta and every arm's A^-1 in one matrix, so that a decision is one matrix-vector product
        # for the means and the A^-1 x rows together (views; updates write in place)
        self._stack = np.zeros((k * (d + 1), d))
        self.theta = self._stack[:k]
        self.a_inv = self._stack[k:].reshape(k, d, d)
        self.a_inv[:] = np.eye(d) / self.l2
        self.b = np.zeros((k, d))
        self.counts = np.zeros(k, dtype=np.int64)

    def _scores(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(theta . x, |x' A^-1 x|) for every arm."""
        k = len(self.arms)
        s = self._stack @ x
        var = s[k:].reshape(k, self.dim) @ x
        return s[:k], np.abs(var, out=var)  # A^-1 is positive definite: abs only absorbs rounding

    def _rank_one(self, a: int, x: np.ndarray, sign: float) -> None:
        """A += sign x x' on arm a's inverse (sign -1: a downdate)."""
        ax = self.a_inv[a] @ x
        self.a_inv[a] -= sign * np.outer(ax, ax) / (1.0 + sign * (x @ ax))

    def _decide(self, x: np.ndarray) -> int:
        """The arm of the highest index theta.x + width * sqrt(x' A^-1 x): LinUCB's width is alpha,
        LinTS's a normal draw per arm (scaled by v)."""
        mean, sd = self._scores(x)
        np.sqrt(sd, out=sd)
        sd *= self._width()
        sd += mean
        return int(sd.argmax())

    def _width(self) -> float | np.ndarray:
        raise NotImplementedError

    def _update(self, a: int, x: np.ndarray, r: float) -> None:
        self._rank_one(a, x, 1.0)
        self.b[a] += r * x
        self.theta[a] = self.a_inv[a] @ self.b[a]
        self.counts[a] += 1

    def arrays(self) -> dict[str, np.ndarray]:
        return {"a_inv": self.a_inv, "b": self.b, "theta": self.theta, "counts": self.counts}

    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.a_inv[:], self.theta[:] = arrays["a_inv"], arrays["theta"]
        self.b, self.counts = arrays["b"].copy(), arrays["counts"].copy()


class LinUCB(_Ridge):
    """Optimism in the face of uncertainty: the width is a fixed multiple (alpha) of the score's
    standard deviation, so an arm's bonus shrinks only as its own data grows."""

    kind = "linucb"
    hyperparameters = ("alpha",)

    def __init__(self, arms: Sequence[str], dim: int, *, alpha: float = 1.0, **kw: Any):
        super().__init__(arms, dim, **kw)
        self.alpha = _hyperparameter("alpha", alpha, 0)

    def _width(self) -> float:
        return self.alpha


class LinTS(_Ridge):
    """Posterior sampling: one normal draw per arm and decision scales the width, so exploration is random."""

    kind = "lints"
    hyperparameters = ("v",)

    def __init__(self, arms: Sequence[str], dim: int, *, v: float = 0.5, **kw: Any):
        super().__init__(arms, dim, **kw)
        self.v = _hyperparameter("v", v, 0)

    def _width(self) -> np.ndarray:
        return self.v * self.rng.standard_normal(len(self.arms))


class EpsilonGreedy(_Ridge):
    kind = "egreedy"
    hyperparameters = ("epsilon",)

    def __init__(self, arms: Sequence[str], dim: int, *, epsilon: float = 0.05, **kw: Any):
        super().__init__(arms, dim, **kw)
        self.epsilon = _hyperparameter("epsilon", epsilon, 0, high=1)

    def _decide(self, x: np.ndarray) -> int:
        if self.rng.random() < self.epsilon:
            return int(self.rng.integers(len(self.arms)))
        untried = np.flatnonzero(self.counts == 0)
        if len(untried):  # every arm once before trusting a zero estimate
            return int(untried[0])
        return int(np.argmax(self.theta @ x))


class SlidingWindowLinUCB(LinUCB):
    """LinUCB on the last ``window`` updates (all arms together); see the module docstring."""

    kind = "swlinucb"
    hyperparameters = ("window",)

    def __init__(self, arms: Sequence[str], dim: int, *, window: int = 400, **kw: Any):
        super().__init__(arms, dim, **kw)
        self.window = int(_hyperparameter("window", window, 1))
        self.buf_x = np.zeros((self.window, self.dim))
        self.buf_r = np.zeros(self.window)
        self.buf_a = np.full(self.window, -1, dtype=np.int64)

    def _update(self, a: int, x: np.ndarray, r: float) -> None:
        slot = self.t % self.window
        old = int(self.buf_a[slot])
        if old >= 0:  # the oldest observation leaves the window
            ox, orw = self.buf_x[slot], self.buf_r[slot]
            self._rank_one(old, ox, -1.0)
            self.b[old] -= orw * ox
            self.counts[old] -= 1
            self.theta[old] = self.a_inv[old] @ self.b[old]
        self.buf_x[slot], self.buf_r[slot], self.buf_a[slot] = x, r, a
        super()._update(a, x, r)
        if (self.t + 1) % self.window == 0:  # refresh the inverses exactly (downdates accumulate rounding)
            self._refresh()

    def _refresh(self) -> None:
        gram = np.repeat((np.eye(self.dim) * self.l2)[None], len(self.arms), axis=0)
        live = self.buf_a >= 0
        for a in range(len(self.arms)):
            xs = self.buf_x[live & (self.buf_a == a)]
            gram[a] += xs.T @ xs
        self.a_inv[:] = np.linalg.inv(gram)
        self.theta[:] = np.einsum("kij,kj->ki", self.a_inv, self.b)

    def arrays(self) -> dict[str, np.ndarray]:
        return {**super().arrays(), "buf_x": self.buf_x, "buf_r": self.buf_r, "buf_a": self.buf_a}

    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        super()._load_arrays(arrays)
        self.buf_x, self.buf_r, self.buf_a = (arrays[k].copy() for k in ("buf_x", "buf_r", "buf_a"))


class SharedLinUCB(Bandit):
    """LinUCB on ``z_a = arm_features[a] * x``: one ridge regression (Sherman-Morrison) for all arms."""

    kind = "linucb_shared"

    def __init__(self, arms: Sequence[str], dim: int, *, arm_features: Any = None, alpha: float = 1.0,
                 l2: float = 1.0, **kw: Any):
        super().__init__(arms, dim, **kw)
        if arm_features is None:
            raise BanditError(f"arm_features: {self.kind} needs the arms' feature matrix [{len(self.arms)}, {self.dim}]")
        feats = np.asarray(arm_features, dtype=np.float64)
        if feats.shape != (len(self.arms), self.dim) or not np.isfinite(feats).all():
            raise BanditError(f"arm_features: need finite numbers of shape [{len(self.arms)}, {self.dim}], "
                              f"got shape {feats.shape}")
        self.arm_features = feats
        self.alpha, self.l2 = _hyperparameter("alpha", alpha, 0), _hyperparameter("l2", l2, 0, above=True)
        self.a_inv = np.eye(self.dim) / self.l2
        self.b = np.zeros(self.dim)
        self.theta = np.zeros(self.dim)
        self.counts = np.zeros(len(self.arms), dtype=np.int64)
        # With z_a = f_a * x (f_a: arm a's features), z_a' A^-1 z_a = x' (f_a f_a' * A^-1) x and
        # theta . z_a = (f_a * theta) . x: per arm, the matrix alpha^2 f_a f_a' * A^-1 and the row
        # f_a * theta are kept in one stack (refreshed on update), so that a decision is two
        # matrix-vector products, as for the disjoint model.
        k, d = len(self.arms), self.dim
        self._outer = feats[:, :, None] * feats[:, None, :]
        self._stack = np.empty((k * d + k, d))
        self._quad = self._stack[: k * d].reshape(k, d, d)
        self._means = self._stack[k * d:]
        self._proj: np.ndarray | None = None
        self._restack()

    def project(self, proj: Any) -> None:
        """Also keep the decision's stack for contexts ``proj @ u`` ([dim, m], m < dim; see ``decide_projected``).

        When the context is a fixed linear map of fewer numbers (the relay's 29 columns repeat 18 numbers),
        z_a' A^-1 z_a = u' (M_a' A^-1 M_a) u and theta . z_a = (M_a' theta) . u with M_a = diag(f_a) proj:
        a decision reads k (m x m) matrices instead of k (dim x dim) ones. It is not saved: the caller who
        knows the map sets it again after loading."""
        proj = np.asarray(proj, dtype=np.float64)
        if proj.ndim != 2 or proj.shape[0] != self.dim or not np.isfinite(proj).all():
            raise BanditError(f"proj: need finite numbers of shape [{self.dim}, m], got shape {proj.shape}")
        k, d, m = len(self.arms), self.dim, proj.shape[1]
        arm_proj = self.arm_features[:, :, None] * proj[None]                # M_a: [k, d, m]
        self._proj = proj
        self._arm_proj = arm_proj
        self._arm_proj_t = np.ascontiguousarray(arm_proj.transpose(0, 2, 1))  # M_a': [k, m, d]
        self._arm_proj_flat = np.ascontiguousarray(arm_proj.transpose(1, 0, 2).reshape(d, k * m))
        self._pstack = np.empty((k * m + k, m))
        self._pquad = self._pstack[: k * m].reshape(k, m, m)
        self._pmeans = self._pstack[k * m:]
        self._restack()

    def _restack(self) -> None:
        np.multiply(self._outer, (self.alpha * self.alpha) * self.a_inv, out=self._quad)
        np.multiply(self.arm_features, self.theta, out=self._means)
        if self._proj is not None:
            k, m = len(self.arms), self._proj.shape[1]
            t = ((self.alpha * self.alpha) * self.a_inv) @ self._arm_proj_flat             # [d, k m]
            np.matmul(self._arm_proj_t, t.reshape(self.dim, k, m).transpose(1, 0, 2), out=self._pquad)
            np.matmul(self.theta, self._arm_proj, out=self._pmeans)

    def decide_projected(self, u: np.ndarray) -> int:
        """``decide(proj @ u)`` for a checked, finite ``u`` (after ``project``; before the first update the
        caller takes ``decide``, which serves the arms in turn)."""
        k, m = len(self.arms), len(u)
        s = self._pstack @ u
        width = s[: k * m].reshape(k, m) @ u  # alpha^2 z_a' A^-1 z_a per arm
        np.abs(width, out=width)
        np.sqrt(width, out=width)
        width += s[k * m:]
        return int(width.argmax())

    def _decide(self, x: np.ndarray) -> int:
        k = len(self.arms)
        s = self._stack @ x
        width = s[: k * self.dim].reshape(k, self.dim) @ x  # alpha^2 z_a' A^-1 z_a per arm
        np.abs(width, out=width)  # A^-1 is positive definite: abs only absorbs rounding
        np.sqrt(width, out=width)
        width += s[k * self.dim:]
        return int(width.argmax())

    def _update(self, a: int, x: np.ndarray, r: float) -> None:
        z = self.arm_features[a] * x
        az = self.a_inv @ z
        self.a_inv -= np.outer(az, az) / (1.0 + z @ az)
        self.b += r * z
        self.theta = self.a_inv @ self.b
        self.counts[a] += 1
        self._restack()

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "l2": self.l2, "arm_features": self.arm_features.tolist()}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"a_inv": self.a_inv, "b": self.b, "theta": self.theta, "counts": self.counts}

    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.a_inv, self.theta = arrays["a_inv"].copy(), arrays["theta"].copy()
        self.b, self.counts = arrays["b"].copy(), arrays["counts"].copy()
        self._restack()


class UCB1(Bandit):
    """Context-free UCB1: mean + c sqrt(2 ln n / n_a); every arm once first. c is the reward's scale."""

    kind = "ucb1"
    hyperparameters = ("c",)
    needs_context = False

    def __init__(self, arms: Sequence[str], dim: int, *, c: float = 0.5, **kw: Any):
        super().__init__(arms, dim, **kw)
        self.c = _hyperparameter("c", c, 0)
        self.sums = np.zeros(len(self.arms))
        self.counts = np.zeros(len(self.arms), dtype=np.int64)

    def _decide(self, x: np.ndarray) -> int:
        untried = np.flatnonzero(self.counts == 0)
        if len(untried):
            return int(untried[0])
        n = self.counts
        return int(np.argmax(self.sums / n + self.c * np.sqrt(2.0 * math.log(n.sum()) / n)))

    def _update(self, a: int, x: np.ndarray, r: float) -> None:
        self.sums[a] += r
        self.counts[a] += 1

    def arrays(self) -> dict[str, np.ndarray]:
        return {"sums": self.sums, "counts": self.counts}

    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.sums, self.counts = arrays["sums"].copy(), arrays["counts"].copy()


class RandomArm(Bandit):
    kind = "random"
    needs_context = False

    def _decide(self, x: np.ndarray) -> int:
        return int(self.rng.integers(len(self.arms)))


class FixedArm(Bandit):
    """Always the same arm (a baseline per arm)."""

    kind = "fixed"
    needs_context = False
    hyperparameters = ("arm",)

    def __init__(self, arms: Sequence[str], dim: int, *, arm: int | str = 0, **kw: Any):
        super().__init__(arms, dim, **kw)
        self.arm = self.check_arm(arm)

    def _decide(self, x: np.ndarray) -> int:
        return self.arm


class Oracle(Bandit):
    """Knows each arm's expected reward in each context and takes the best (the regret baseline)."""

    kind = "oracle"
    needs_context = False

    def decide_expected(self, expected: Any) -> int:
        e = np.asarray(expected, dtype=np.float64)
        if e.shape != (len(self.arms),) or not np.isfinite(e).all():
            raise BanditError(f"expected: need {len(self.arms)} finite expected rewards, got shape {e.shape}")
        return int(np.argmax(e))

    def _decide(self, x: np.ndarray) -> int:
        raise BanditError("oracle: decides from expected rewards (decide_expected), not from a context")


POLICIES: dict[str, type[Bandit]] = {c.kind: c for c in (LinUCB, LinTS, EpsilonGreedy, SlidingWindowLinUCB,
                                                        SharedLinUCB, UCB1, RandomArm, FixedArm, Oracle)}


def make_bandit(kind: str, arms: Sequence[str], dim: int, **kw: Any) -> Bandit:
    """A policy by its kind name (``POLICIES``); unknown names list the known ones."""
    if kind not in POLICIES:
        raise BanditError(f"policy: unknown kind {kind!r} (known: {', '.join(POLICIES)})")
    return POLICIES[kind](arms, dim, **kw)


def _load_bandit(path: str | Path) -> Bandit:
    base = Path(path).with_suffix("")
    meta_path, arr_path = base.with_suffix(".json"), base.with_suffix(".safetensors")
    for p in (meta_path, arr_path):
        if not p.is_file():
            raise BanditError(f"bandit state: {p} does not exist")
    meta = read_json(meta_path, "bandit state", BanditError)
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise BanditError(f"bandit state {meta_path}: 'format' must be {STATE_FORMAT!r}")
    for field in ("kind", "arms", "dim", "reward_range", "params", "rng"):
        if field not in meta:
            raise BanditError(f"bandit state {meta_path}: missing field '{field}'")
    if not isinstance(meta["params"], dict):
        raise BanditError(f"bandit state {meta_path}: 'params' must be an object")
    try:
        bandit = make_bandit(meta["kind"], meta["arms"], meta["dim"], reward_range=tuple(meta["reward_range"]),
                             feature_names=meta.get("feature_names"), seed=int(meta.get("seed", 0)), **meta["params"])
    except TypeError as exc:
        raise BanditError(f"bandit state {meta_path}: bad 'params' ({exc})") from None
    try:
        arrays = load_file(str(arr_path))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise BanditError(f"bandit state {arr_path}: not a readable safetensors file ({exc})") from None
    expected = {k: v for k, v in bandit.arrays().items()}
    for name, ref in expected.items():
        got = arrays.get(name)
        if got is None or got.shape != ref.shape or got.dtype != ref.dtype:
            raise BanditError(f"bandit state {arr_path}: array '{name}' must have shape {ref.shape} and dtype "
                              f"{ref.dtype}, got {None if got is None else (got.shape, got.dtype)}")
        if got.dtype.kind == "f" and not np.isfinite(got).all():
            raise BanditError(f"bandit state {arr_path}: array '{name}' holds non-finite numbers")
    bandit._load_arrays(arrays)
    bandit.t = int(arrays["_t"][0]) if "_t" in arrays else 0
    try:
        bandit.rng.bit_generator.state = meta["rng"]
    except (TypeError, ValueError, KeyError) as exc:
        raise BanditError(f"bandit state {meta_path}: bad 'rng' state ({exc})") from None
    return bandit


__all__ = ["POLICIES", "Bandit", "BanditError", "EpsilonGreedy", "FixedArm", "LinTS", "LinUCB", "Oracle", "RandomArm",
           "SharedLinUCB", "SlidingWindowLinUCB", "UCB1", "make_bandit"]
