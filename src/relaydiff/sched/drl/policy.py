"""The DRL + convex solver at inference: a numpy MLP picks each user's split, the closed form splits bandwidth.

This is what a service loads: numpy only (no torch), weights from safetensors + a JSON config
(no pickle); a 1000-user round takes milliseconds. The round is visited user by user
(:class:`relaydiff.sim.round_env.SequentialRound`), each fixed-size observation mapped to a masked
argmax over {local} ∪ splits. Once every discrete choice is made, the downlink shares come from
the convex half in closed form (b_i ∝ sqrt(c_i), :mod:`relaydiff.system.bandwidth`). Optionally
(``improve=True``) the local-search baseline's best-improvement pass plus evict-and-admit swaps at
any load (:func:`relaydiff.sched.baselines.swap_repair`, which can re-admit a user the
policy left local) starts from the policy's choices; both
variants are reported separately by the bench. Training: :mod:`relaydiff.sched.drl.train`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np

from relaydiff.sched.baselines import swap_repair
from relaydiff.shipped import read_json
from relaydiff.sim.round_env import SequentialRound, obs_size
from relaydiff.system.bandwidth import allocate_bandwidth
from relaydiff.system.problem import Decision, RoundInstance, Solution, evaluate

POLICY_DIR = Path(__file__).resolve().parent.parent / "policies"
DEFAULT_POLICY = POLICY_DIR / "offload_ppo"
POLICY_FORMAT = "relaydiff.offload-policy/1"


class PolicyError(ValueError):
    """A policy file is missing, malformed, or does not fit the instance."""


@dataclass
class NumpyPolicy:
    """The actor MLP (tanh hidden layers, linear logits) in numpy: masked argmax over options."""

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    n_splits: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.weights) != len(self.biases) or not self.weights:
            raise PolicyError("policy needs one bias per weight matrix and at least one layer")
        if self.weights[0].shape[1] != obs_size(self.n_splits):
            raise PolicyError(f"first layer takes {self.weights[0].shape[1]} inputs, expected {obs_size(self.n_splits)} for {self.n_splits} splits")
        if self.weights[-1].shape[0] != self.n_splits + 1:
            raise PolicyError(f"last layer gives {self.weights[-1].shape[0]} logits, expected {self.n_splits + 1}")
        # float64 copies, transposed for x @ W: inference is a handful of tiny matmuls
        self._wt = [np.ascontiguousarray(w.T, dtype=np.float64) for w in self.weights]
        self._b = [np.asarray(b, dtype=np.float64) for b in self.biases]

    def logits(self, obs: np.ndarray) -> np.ndarray:
        h = np.asarray(obs, dtype=np.float64)
        for w, b in zip(self._wt[:-1], self._b[:-1]):
            h = np.tanh(h @ w + b)
        return h @ self._wt[-1] + self._b[-1]

    def act(self, obs: np.ndarray, mask: np.ndarray) -> int:
        """The valid option with the largest logit (the logits written out: it runs once per decision)."""
        h = np.asarray(obs, dtype=np.float64)
        for w, b in zip(self._wt[:-1], self._b[:-1]):
            h = np.tanh(np.dot(h, w) + b)
        z = np.dot(h, self._wt[-1]) + self._b[-1]
        z[~np.asarray(mask, dtype=bool)] = -np.inf
        return int(z.argmax())

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``path.safetensors`` (fp32) and ``path.json`` (what :meth:`from_pretrained` reads)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for n, (w, b) in enumerate(zip(self.weights, self.biases)):
            tensors[f"layer{n}.weight"] = np.ascontiguousarray(w, dtype=np.float32)
            tensors[f"layer{n}.bias"] = np.ascontiguousarray(b, dtype=np.float32)
        save_np(tensors, str(path.with_suffix(".safetensors")))
        cfg = {"format": POLICY_FORMAT, "n_splits": int(self.n_splits), "n_layers": len(self.weights),
               "activation": "tanh", "obs_size": obs_size(self.n_splits), "meta": self.meta}
        path.with_suffix(".json").write_text(json.dumps(cfg, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path = DEFAULT_POLICY) -> "NumpyPolicy":
        path = Path(path)
        if path.suffix in (".json", ".safetensors"):
            path = path.with_suffix("")
        jpath, tpath = path.with_suffix(".json"), path.with_suffix(".safetensors")
        if not jpath.is_file() or not tpath.is_file():
            raise PolicyError(f"policy {path} not found: need {jpath.name} and {tpath.name}")
        cfg = read_json(jpath, "policy config", PolicyError)
        if cfg.get("format") != POLICY_FORMAT:
            raise PolicyError(f"policy config {jpath}: format {cfg.get('format')!r}, expected {POLICY_FORMAT!r}")
        if cfg.get("activation") != "tanh":
            raise PolicyError(f"policy config {jpath}: unsupported activation {cfg.get('activation')!r}")
        t = load_np(str(tpath))
        n = int(cfg["n_layers"])
        try:
            ws = [t[f"layer{j}.weight"].astype(np.float64) for j in range(n)]
            bs = [t[f"layer{j}.bias"].astype(np.float64) for j in range(n)]
        except KeyError as exc:
            raise PolicyError(f"policy weights {tpath} lack tensor {exc}") from None
        return cls(ws, bs, int(cfg["n_splits"]), cfg.get("meta", {}))


# ---- the solver ------------------------------------------------------------------------------
_CACHE: dict[str, NumpyPolicy] = {}


def load_policy(path: str | Path | None = None) -> NumpyPolicy:
    """The shipped policy (cached), or one from ``path``."""
    key = str(Path(path) if path is not None else DEFAULT_POLICY)
    if key not in _CACHE:
        _CACHE[key] = NumpyPolicy.from_pretrained(key)
    return _CACHE[key]


def decide(instance: RoundInstance, act: Callable[[np.ndarray, np.ndarray, SequentialRound], int], improve: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """Visit the round user by user with ``act(obs, mask, round) -> option``; optional polish pass."""
    rnd = SequentialRound(instance)
    steps = 0
    while not rnd.done:
        rnd.step(act(rnd.observation(), rnd.mask(), rnd))
        steps += 1
    info: dict[str, Any] = {"decisions": steps, "sequential_gain": rnd.total_gain}
    if not improve:
        return rnd.k.copy(), info
    info["improve_iterations"] = swap_repair(rnd.moves)  # the round's own move state, repaired in place
    return instance.options[rnd.moves.opt], info


def solve_drl(instance: RoundInstance, policy: NumpyPolicy | str | Path | None = None, improve: bool = False) -> Solution:
    """DRL + convex: the policy's splits, then closed-form bandwidth shares; ``improve`` adds the polish pass."""
    pol = policy if isinstance(policy, NumpyPolicy) else load_policy(policy)
    if pol.n_splits != len(instance.splits):
        raise PolicyError(f"policy was trained for {pol.n_splits} split points, the instance has {len(instance.splits)}")
    t0 = time.perf_counter()
    k, info = decide(instance, lambda obs, mask, _r: pol.act(obs, mask), improve)
    bw = allocate_bandwidth(instance.bw_cost, k > 0)  # the convex half, closed form
    wall = time.perf_counter() - t0
    obj, _ = evaluate(instance, Decision(k, bw))
    return Solution("drl+ls" if improve else "drl", Decision(k, bw), obj, wall, "ok", info)
