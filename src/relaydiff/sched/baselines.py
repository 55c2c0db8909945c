"""Baseline solvers for one round: all local, all edge, random, greedy, local search.

Greedy and local search score moves with the incremental objective
(:class:`relaydiff.system.moves.MoveState`), so they handle N = 1000; the final objective always
comes from ``evaluate``. Solvers are run by name through :mod:`relaydiff.sched.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from relaydiff.system.moves import MoveState
from relaydiff.system.problem import RoundInstance, Solution, timed


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


def swap_repair_options(inst: RoundInstance, start: np.ndarray, cfg: LocalSearchConfig | None = None) -> tuple[np.ndarray, int]:
    """Local search with swaps at any load: evict one admitted user and make the best move of another.

    Single moves cannot undo a wrong admission when the edge is slow: admitting the right user beside
    the wrong one costs more (the batch interaction) than either alone, and evicting the wrong one
    first loses its gain (issue 18: DRL kept the highest-gain user local on a 10x-loaded edge). One
    pass costs one ``deltas`` per admitted user; it repeats with single moves until nothing improves.
    """
    cfg = cfg or LocalSearchConfig()
    opt, iters = local_search_options(inst, start=start, cfg=cfg)
    st = MoveState(inst, opt)
    swaps = 0
    improved = True
    while improved and swaps < cfg.max_iters:
        improved = False
        for evict in np.flatnonzero(st.opt > 0):
            before, old = st.objective(), int(st.opt[evict])
            st.move(int(evict), 0)
            d = st.deltas()
            d[evict, :] = -np.inf
            d[np.arange(inst.n_users), st.opt] = -np.inf
            r, b = divmod(int(np.argmax(d)), d.shape[1])
            if np.isfinite(d[r, b]) and st.objective() + d[r, b] > before + cfg.tol:
                st.move(r, b)
                swaps += 1
                improved = True
                break
            st.move(int(evict), old)
        if improved:
            opt, more = local_search_options(inst, start=st.opt, cfg=cfg)
            st, iters = MoveState(inst, opt), iters + more
    return st.opt, iters + swaps


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

