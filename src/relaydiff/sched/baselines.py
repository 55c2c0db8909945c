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
    st = MoveState(inst, greedy_options(inst) if start is None else start)
    return st.opt, _descend(st, cfg or LocalSearchConfig())[0]


def _descend(st: MoveState, cfg: LocalSearchConfig) -> tuple[int, np.ndarray | None]:
    """Local search on ``st`` in place (best single move; at a full edge, the one evict-then-admit).

    Returns its iterations and, when it stopped below capacity, the last ``deltas`` (those of the final
    state, no move capacity-masked), which :func:`swap_deltas` can reuse.
    """
    inst = st.inst
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
            return it, d
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
    return it, None


def swap_deltas(st: MoveState, deltas: np.ndarray | None = None, users: np.ndarray | None = None) -> np.ndarray:
    """(E, N, P + 1) exact objective change of evicting admitted user e and moving user r to option b.

    The objective is separable but for pairwise terms (edge batch interaction
    beta' (lam_e + lam_r) k_min(o_e, o_r) and bandwidth 2 g_e g_r), so the joint change is the two
    single-move changes plus the pair term's correction: one ``deltas`` and O(E N P) arithmetic for
    every swap at once. Rows e = r and the no-op b = o_r are -inf; the order of ``e`` is that of
    ``np.flatnonzero(st.opt > 0)``. ``deltas``: ``st.deltas(capacity=False)`` if the caller has it.
    ``users``: only these r (sorted, every admitted user among them), axis 1 in their order.
    """
    inst = st.inst
    adm = np.flatnonzero(st.opt > 0)
    d = st.deltas(capacity=False) if deltas is None else deltas  # an eviction frees the slot an admission takes
    users = np.arange(inst.n_users) if users is None else np.asarray(users)
    ks = inst.options.astype(float)
    lam, g = inst.edge_weight[users], inst.bw_weight[users]
    oe, o = st.opt[adm], st.opt[users]
    b = np.arange(len(ks))
    kmin_b = ks[np.minimum(oe[:, None], b[None, :])]  # (E, P+1): k_min(o_e, b)
    kmin_r = ks[np.minimum(oe[:, None], o[None, :])]  # (E, N): k_min(o_e, o_r)
    edge_pair = inst.beta_eff * (inst.edge_weight[adm][:, None] + lam[None, :])  # (E, N)
    bw_pair = 2.0 * inst.bw_weight[adm][:, None] * g[None, :]  # (E, N)
    on_b = (b > 0).astype(float)[None, None, :]
    on_r = (o > 0).astype(float)[None, :, None]
    joint = (d[adm, 0][:, None, None] + d[users][None, :, :]
             + edge_pair[:, :, None] * (kmin_b[:, None, :] - kmin_r[:, :, None])
             + bw_pair[:, :, None] * (on_b - on_r))
    joint[np.arange(adm.size), np.searchsorted(users, adm), :] = -np.inf
    joint[:, np.arange(users.size), o] = -np.inf
    return joint


def _swap_candidates(st: MoveState, d: np.ndarray, tol: float) -> np.ndarray:
    """Users r some evict-and-move swap could improve with: every admitted one, and each local one whose
    bound ``max_b d[r, b] + max_e (d[e, 0] + beta' |lam_e| K) + beta' |lam_r| K + 2 |g_r| max_e |g_e|``
    (the pair terms an eviction can give back at most, K the longest split) exceeds ``tol``. At N = 1000
    most local users cannot gain, and :func:`swap_deltas` on the rest costs a fraction."""
    inst = st.inst
    adm = np.flatnonzero(st.opt > 0)
    scale = abs(inst.beta_eff) * float(inst.options[-1])
    lam, g = np.abs(inst.edge_weight), np.abs(inst.bw_weight)
    best_evict = float(np.max(d[adm, 0] + scale * lam[adm]))
    bound = d[:, 1:].max(axis=1) + best_evict + scale * lam + 2.0 * g * float(g[adm].max())
    return np.flatnonzero((st.opt > 0) | (bound > tol))


def swap_repair(st: MoveState, cfg: LocalSearchConfig | None = None) -> int:
    """Local search on ``st`` in place, then the best evict-and-move swap at any load while one improves
    (local search again after each); returns iterations + swaps.

    Single moves cannot undo a wrong admission when the edge is slow: admitting the right user beside
    the wrong one costs more (the batch interaction) than either alone, and evicting the wrong one
    first loses its gain (issue 18: DRL kept the highest-gain user local on a 10x-loaded edge). Every
    swap is scored at once (:func:`swap_deltas`), so a pass where none gains costs one ``deltas``.
    """
    cfg = cfg or LocalSearchConfig()
    iters, d = _descend(st, cfg)
    swaps = 0
    while swaps < cfg.max_iters and st.admitted > 0:
        d = st.deltas(capacity=False) if d is None else d
        users = _swap_candidates(st, d, cfg.tol)
        joint = swap_deltas(st, d, users)
        e, r, b = np.unravel_index(int(np.argmax(joint)), joint.shape)
        if not joint[e, r, b] > cfg.tol:
            break
        st.move(int(np.flatnonzero(st.opt > 0)[e]), 0)
        st.move(int(users[r]), int(b))
        swaps += 1
        more, d = _descend(st, cfg)
        iters += more
    return iters + swaps


def swap_repair_options(inst: RoundInstance, start: np.ndarray, cfg: LocalSearchConfig | None = None) -> tuple[np.ndarray, int]:
    """:func:`swap_repair` from the options ``start``: (options, iterations + swaps)."""
    st = MoveState(inst, start)
    return st.opt, swap_repair(st, cfg)


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

