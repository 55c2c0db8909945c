"""Incremental bookkeeping of one round decided user by user (the sequential view of the GQAP).

Every sequential solver (the RL environment, the numpy DRL policy, the local-improvement pass)
needs the exact change of the objective of :func:`relaydiff.system.problem.objective_value` when
one user is given an option while the others are fixed. With the decomposition

    objective(k) = sum_i V[i, k_i] - beta' sum_{i,j admitted} lam_i min(k_i, k_j) - (sum_{admitted} g_i)^2

(beta' = beta / c), adding user i at option o to a state whose admitted users give
CL[o] = sum_j lam_j min(k_o, k_j), CN[o] = sum_j min(k_o, k_j) and G = sum_j g_j changes it by

    gain[o] = V[i, o] - V[i, 0] - beta' (CL[o] + lam_i (CN[o] + k_o)) - g_i (2 G + g_i),  gain[0] = 0.

Keeping CL, CN (one number per option) and G makes each gain O(P) with P split points, so a
1000-user round is decided in a few milliseconds of bookkeeping. Undecided users count as local,
so the sum of applied gains is always objective(k) - objective(all local).

Interaction and bandwidth costs only grow as users are admitted, so a gain that is negative now
stays negative in every completion: such options are *dominated* by local and may be masked
without losing the optimum (:meth:`RoundState.mask` with ``dominated=True``).
"""

from __future__ import annotations

import numpy as np

from relaydiff.system.problem import RoundInstance


class RoundState:
    """Decisions so far in one round and the exact marginal gain of each option for any user."""

    def __init__(self, instance: RoundInstance) -> None:
        self.instance = instance
        opts = instance.options.astype(float)
        self.k_opts = opts  # (P+1,) with k_opts[0] = 0
        self.min_k = np.minimum(opts[:, None], opts[None, :])  # min(k_o, k_o')
        vt = instance.value_table
        self.dv = vt - vt[:, :1]  # V[i, o] - V[i, 0]
        self.lam = instance.edge_weight
        self.g = instance.bw_weight
        self.beta = float(instance.beta_eff)
        self.max_batch = int(instance.max_batch)
        n = instance.n_users
        self.option = np.zeros(n, dtype=np.int64)  # index into options, 0 = local/undecided
        self.cl = np.zeros(len(opts))
        self.cn = np.zeros(len(opts))
        self.big_g = 0.0
        self.n_admitted = 0
        self.total_gain = 0.0
        # gain with an empty edge: an upper bound on any later gain of the same user
        self.solo_gain = self.dv - self.beta * self.lam[:, None] * opts[None, :] - (self.g**2)[:, None]
        self.solo_gain[:, 0] = 0.0

    @property
    def k(self) -> np.ndarray:
        """Split point per user (0 = local), the decision as :func:`evaluate` takes it."""
        return self.instance.options[self.option]

    def gains(self, i: int) -> np.ndarray:
        """Change of the objective for each option of user i (who must currently be local)."""
        g_i = self.g[i]
        out = self.dv[i] - self.beta * (self.cl + self.lam[i] * (self.cn + self.k_opts)) - g_i * (2.0 * self.big_g + g_i)
        out[0] = 0.0
        return out

    def mask(self, i: int, gains: np.ndarray | None = None, dominated: bool = True) -> np.ndarray:
        """Options user i may take: capacity left (n_0 <= M), and, if ``dominated``, gain >= 0."""
        m = np.ones(len(self.k_opts), dtype=bool)
        if self.n_admitted >= self.max_batch:
            m[1:] = False
        elif dominated:
            m[1:] = (self.gains(i) if gains is None else gains)[1:] >= 0.0
        return m

    def apply(self, i: int, o: int, gain: float | None = None) -> float:
        """Give local user i option o; returns the objective change."""
        if self.option[i] != 0:
            raise ValueError(f"user {i} already has option {self.option[i]}; remove it first")
        if o == 0:
            return 0.0
        if self.n_admitted >= self.max_batch:
            raise ValueError(f"edge is full ({self.max_batch} users); user {i} cannot be admitted")
        delta = float(self.gains(i)[o]) if gain is None else float(gain)
        self.cl += self.lam[i] * self.min_k[o]
        self.cn += self.min_k[o]
        self.big_g += self.g[i]
        self.n_admitted += 1
        self.option[i] = o
        self.total_gain += delta
        return delta

    def remove(self, i: int) -> float:
        """Make user i local again; returns the objective change (minus its current gain)."""
        o = int(self.option[i])
        if o == 0:
            return 0.0
        self.cl -= self.lam[i] * self.min_k[o]
        self.cn -= self.min_k[o]
        self.big_g -= self.g[i]
        self.n_admitted -= 1
        self.option[i] = 0
        delta = -float(self.gains(i)[o])
        self.total_gain += delta
        return delta

    # ---- whole-round moves (vectorized over users), used by the improvement pass -------------
    def leave_one_out_gains(self) -> np.ndarray:
        """G[i, o]: objective change of moving user i alone from local to o, all others fixed."""
        o_cur = self.option
        adm = o_cur > 0
        own = self.min_k[o_cur] * adm[:, None]  # (N, P+1): min(k_o, k_i) for admitted i, else 0
        cl = self.cl[None, :] - self.lam[:, None] * own
        cn = self.cn[None, :] - own
        big_g = self.big_g - self.g * adm
        out = self.dv - self.beta * (cl + self.lam[:, None] * (cn + self.k_opts[None, :]))
        out -= (self.g * (2.0 * big_g + self.g))[:, None]
        out[:, 0] = 0.0
        return out

    def improve(self, max_rounds: int = 50, swaps: bool = True) -> int:
        """Best-improvement local search: move one user, or (edge full) swap one in for one out.

        Stops at a local optimum of both neighbourhoods or after ``max_rounds`` moves; returns
        the number of moves. Every accepted move strictly increases the objective.
        """
        moves = 0
        eps = 1e-12
        for _ in range(max_rounds):
            loo = self.leave_one_out_gains()
            cur = loo[np.arange(loo.shape[0]), self.option]
            delta = loo - cur[:, None]
            if self.n_admitted >= self.max_batch:  # a local user cannot be admitted by a single move
                delta[self.option == 0, 1:] = -np.inf
            flat = int(np.argmax(delta))
            i, o = divmod(flat, delta.shape[1])
            best = float(delta[i, o])
            swap = None
            if swaps and self.n_admitted >= self.max_batch:
                swap = self._best_swap(loo, cur)
                if swap is not None and swap[0] > best:
                    best = swap[0]
                else:
                    swap = None
            if best <= eps:
                break
            if swap is not None:
                _, j_out, i_in, o_in = swap
                self.remove(j_out)
                self.apply(i_in, o_in)
            else:
                self.remove(i)
                self.apply(i, o)
            moves += 1
        return moves

    def _best_swap(self, loo: np.ndarray, cur: np.ndarray) -> tuple[float, int, int, int] | None:
        """Best (gain, out, in, option) exchanging an admitted user for a local one at the edge limit."""
        adm = np.flatnonzero(self.option > 0)
        loc = np.flatnonzero(self.option == 0)
        if adm.size == 0 or loc.size == 0:
            return None
        cand = loc[np.max(loo[loc, 1:], axis=1) > 0]  # only users with something to gain can come in
        if cand.size == 0:
            return None
        k_out = self.option[adm]
        # removing j gives back its interaction with i: beta' (lam_i + lam_j) min(k_o, k_j) + 2 g_i g_j
        back = self.beta * (self.lam[cand][:, None, None] + self.lam[adm][None, :, None]) * self.min_k[k_out][None, :, 1:]
        back += 2.0 * (self.g[cand][:, None] * self.g[adm][None, :])[:, :, None]
        total = loo[cand][:, None, 1:] + back - cur[adm][None, :, None]  # (C, A, P)
        flat = int(np.argmax(total))
        c, a, p = np.unravel_index(flat, total.shape)
        return float(total[c, a, p]), int(adm[a]), int(cand[c]), int(p) + 1
