"""The incremental objective: the exact change of the round objective for every single-user move.

Heuristics (greedy, local search, the DRL solver's sequential round) score all moves of all users
at once from O(P) aggregates (O(N P) per scoring), so they handle N = 1000; the final objective
always comes from :func:`relaydiff.system.problem.evaluate`.
"""

from __future__ import annotations

import numpy as np

from relaydiff.system.problem import RoundInstance


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

    def deltas(self, users: np.ndarray | None = None, capacity: bool = True) -> np.ndarray:
        """(len(users), P + 1) exact objective change of moving each user to each option.

        Moves that would exceed the edge's capacity get -inf (``capacity=False``: their objective
        change all the same, for moves combined with an eviction).
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
        if capacity and self.admitted >= inst.max_batch:
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
