"""Baseline solvers for one round, and the registry every solver is run through.

``solve(name, instance) -> Solution``; ``register_solver(name, fn)`` adds one (the DRL + convex
solver registers itself the same way). Heuristics score moves with an incremental form of the
objective (O(P) state, O(N P) to score every move of every user at once), so greedy and local
search handle N = 1000; the final objective always comes from ``evaluate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from relaydiff.system.problem import RoundInstance, Solution, timed

SolverFn = Callable[[RoundInstance], Solution]
_REGISTRY: dict[str, SolverFn] = {}
# Solvers whose module is imported on first use: "module:function" registers that function,
# a bare module name is imported so that it registers itself (the DRL solvers do).
_LAZY: dict[str, str] = {
    "exact": "relaydiff.sched.exact:solve_exact",
    "drl": "relaydiff.sched.drl",
    "drl+ls": "relaydiff.sched.drl",
}


def register_solver(name: str, fn: SolverFn) -> None:
    """Make ``fn(instance) -> Solution`` available as ``solve(name, instance)``."""
    _REGISTRY[name] = fn


def available_solvers() -> list[str]:
    return sorted(set(_REGISTRY) | set(_LAZY))


def get_solver(name: str) -> SolverFn:
    """The solver registered under ``name`` (ValueError listing the known names otherwise)."""
    if name not in _REGISTRY and name in _LAZY:
        import importlib

        mod, _, attr = _LAZY[name].partition(":")
        module = importlib.import_module(mod)
        if attr:
            _REGISTRY[name] = getattr(module, attr)
    if name not in _REGISTRY:
        raise ValueError(f"unknown solver {name!r}; available: {', '.join(available_solvers())}")
    return _REGISTRY[name]


def solve(name: str, instance: RoundInstance) -> Solution:
    """Run a registered solver by name."""
    return get_solver(name)(instance)


# ---- incremental objective ------------------------------------------------------------------
class MoveState:
    """Current options of all users plus the per-segment aggregates that make moves O(1) each.

    Segment m (1..P) holds the steps [k_{m-1}, k_m); a user at option o is on the edge in
    segments 1..o. ``deltas`` gives the exact objective change of moving user i to option b.
    """

    def __init__(self, inst: RoundInstance, opt: np.ndarray | None = None) -> None:
        self.inst = inst
        self.p = len(inst.options) - 1
        self.seg_len = np.diff(inst.options).astype(float)
        self.opt = np.zeros(inst.n_users, dtype=np.int64) if opt is None else np.asarray(opt, dtype=np.int64).copy()
        self.cnt = np.zeros(self.p + 1)  # index m = 1..P used
        self.lam = np.zeros(self.p + 1)
        for m in range(1, self.p + 1):
            on = self.opt >= m
            self.cnt[m] = on.sum()
            self.lam[m] = inst.edge_weight[on].sum()
        self.sigma = float(inst.bw_weight[self.opt > 0].sum())
        self.admitted = int((self.opt > 0).sum())

    @property
    def k(self) -> np.ndarray:
        return self.inst.options[self.opt]

    def objective(self) -> float:
        inst = self.inst
        v = inst.value_table[np.arange(inst.n_users), self.opt].sum()
        edge = inst.beta_eff * float(np.sum(self.seg_len * self.lam[1:] * self.cnt[1:]))
        return float(v - edge - self.sigma**2)

    def deltas(self, users: np.ndarray | None = None) -> np.ndarray:
        """(len(users), P + 1) exact objective change of moving each user to each option.

        Moves that would exceed the edge's capacity get -inf.
        """
        inst = self.inst
        users = np.arange(inst.n_users) if users is None else np.asarray(users)
        a = self.opt[users]
        lam = inst.edge_weight[users][:, None]
        g = inst.bw_weight[users]
        ks = inst.options.astype(float)
        A = np.concatenate([[0.0], np.cumsum(self.seg_len * self.lam[1:])])  # sum_{s<k_o} Lambda_s
        Nn = np.concatenate([[0.0], np.cumsum(self.seg_len * self.cnt[1:])])  # sum_{s<k_o} n_s
        b = np.arange(self.p + 1)[None, :]
        kmin = ks[np.minimum(a[:, None], b)]
        add = A[b] - lam * kmin + lam * (Nn[b] - kmin) + lam * ks[b]
        rem = A[a] + lam[:, 0] * Nn[a] - lam[:, 0] * ks[a]
        d_edge = inst.beta_eff * (add - rem[:, None])
        sig_wo = self.sigma - np.where(a > 0, g, 0.0)
        sig_new = sig_wo[:, None] + np.where(b > 0, g[:, None], 0.0)
        d_bw = sig_new**2 - self.sigma**2
        v = inst.value_table[users]
        d = v - v[np.arange(len(users)), a][:, None] - d_edge - d_bw
        if self.admitted >= inst.max_batch:
            d[(a == 0)[:, None] & (b > 0)] = -np.inf
        return d

    def move(self, i: int, b: int) -> None:
        """Apply the move of user i to option index b (updates the aggregates in O(P))."""
        a = int(self.opt[i])
        if a == b:
            return
        lam, g = self.inst.edge_weight[i], self.inst.bw_weight[i]
        self.cnt[1 : a + 1] -= 1
        self.lam[1 : a + 1] -= lam
        self.cnt[1 : b + 1] += 1
        self.lam[1 : b + 1] += lam
        self.sigma += (g if b > 0 else 0.0) - (g if a > 0 else 0.0)
        self.admitted += int(b > 0) - int(a > 0)
        self.opt[i] = b


# ---- baselines --------------------------------------------------------------------------------
def _all_local(inst: RoundInstance) -> tuple[np.ndarray, dict[str, Any]]:
    return np.zeros(inst.n_users, dtype=np.int64), {}


def _fixed_split_body(split: int | None) -> Callable[[RoundInstance], tuple[np.ndarray, dict[str, Any]]]:
    def body(inst: RoundInstance) -> tuple[np.ndarray, dict[str, Any]]:
        k = int(inst.splits[len(inst.splits) // 2]) if split is None else int(split)
        if k not in inst.splits:
            raise ValueError(f"all-edge split {k} is not one of the instance's splits {inst.splits.tolist()}")
        o = int(np.searchsorted(inst.options, k))
        out = np.full(inst.n_users, k, dtype=np.int64)
        if inst.n_users > inst.max_batch:  # over capacity: keep the users who gain most alone
            gain = inst.value_table[:, o] - inst.value_table[:, 0]
            out[np.argsort(-gain, kind="stable")[inst.max_batch :]] = 0
        return out, {"split": k}

    return body


def _random_body(seed: int) -> Callable[[RoundInstance], tuple[np.ndarray, dict[str, Any]]]:
    def body(inst: RoundInstance) -> tuple[np.ndarray, dict[str, Any]]:
        rng = np.random.default_rng(seed)
        k = rng.choice(inst.options, size=inst.n_users)
        adm = np.flatnonzero(k > 0)
        if adm.size > inst.max_batch:
            k[rng.choice(adm, size=adm.size - inst.max_batch, replace=False)] = 0
        return k, {"seed": seed}

    return body


def greedy_options(inst: RoundInstance) -> np.ndarray:
    """Start all-local; repeatedly fix the (user, option) with the largest gain until none is positive."""
    st = MoveState(inst)
    free = np.ones(inst.n_users, dtype=bool)
    while free.any():
        users = np.flatnonzero(free)
        d = st.deltas(users)
        d[:, 0] = -np.inf  # staying local is the default, not a move
        flat = int(np.argmax(d))
        r, b = divmod(flat, d.shape[1])
        if not d[r, b] > 1e-12:
            break
        st.move(int(users[r]), b)
        free[users[r]] = False
    return st.opt


@dataclass(frozen=True)
class LocalSearchConfig:
    """Best-improvement 1-move local search from the greedy solution, with swaps at capacity."""

    max_iters: int = 10_000
    tol: float = 1e-12


def local_search_options(inst: RoundInstance, start: np.ndarray | None = None, cfg: LocalSearchConfig | None = None) -> tuple[np.ndarray, int]:
    """Improve a start (default: greedy) by single-user moves, and admit/evict swaps when the edge is full."""
    cfg = cfg or LocalSearchConfig()
    st = MoveState(inst, greedy_options(inst) if start is None else start)
    it = 0
    for it in range(1, cfg.max_iters + 1):
        d = st.deltas()
        d[np.arange(inst.n_users), st.opt] = 0.0
        flat = int(np.argmax(d))
        r, b = divmod(flat, d.shape[1])
        if d[r, b] > cfg.tol:
            st.move(r, b)
            continue
        if st.admitted < inst.max_batch:
            break
        # Full edge: try evicting the admitted user whose removal hurts least, then the best admit.
        adm = np.flatnonzero(st.opt > 0)
        evict = adm[int(np.argmax(d[adm, 0]))]
        before = st.objective()
        old = int(st.opt[evict])
        st.move(int(evict), 0)
        d2 = st.deltas()
        d2[evict, :] = -np.inf
        d2[np.arange(inst.n_users), st.opt] = 0.0
        flat = int(np.argmax(d2))
        r2, b2 = divmod(flat, d2.shape[1])
        if d2[r2, b2] > 0 and st.objective() + d2[r2, b2] > before + cfg.tol:
            st.move(r2, b2)
            continue
        st.move(int(evict), old)
        break
    return st.opt, it


def _greedy(inst: RoundInstance) -> tuple[np.ndarray, dict[str, Any]]:
    return inst.options[greedy_options(inst)], {}


def _local_search(inst: RoundInstance) -> tuple[np.ndarray, dict[str, Any]]:
    opt, iters = local_search_options(inst)
    return inst.options[opt], {"iterations": iters}


def all_local(inst: RoundInstance) -> Solution:
    return timed("all_local", _all_local, inst)


def all_edge(inst: RoundInstance, split: int | None = None) -> Solution:
    """Everyone on the edge at one fixed split (default: the middle split point)."""
    return timed("all_edge", _fixed_split_body(split), inst)


def random_policy(inst: RoundInstance, seed: int = 0) -> Solution:
    return timed("random", _random_body(seed), inst)


def greedy(inst: RoundInstance) -> Solution:
    return timed("greedy", _greedy, inst)


def local_search(inst: RoundInstance) -> Solution:
    return timed("local_search", _local_search, inst)


for _name, _fn in {
    "all_local": all_local,
    "all_edge": all_edge,
    "random": random_policy,
    "greedy": greedy,
    "local_search": local_search,
}.items():
    register_solver(_name, _fn)
