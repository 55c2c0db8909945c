"""Exact one-round solver: a MILP (HiGHS via ``scipy.optimize.milp``) with outer approximation.

Variables (P split points, options k_0 = 0 < k_1 < ... < k_P, C = min(N, M)):
- x[i, o] binary, one option per user (o = 0 is local); y[i, m] = sum_{o >= m} x[i, o] says that
  user i is still on the edge in segment m, the steps [k_{m-1}, k_m) that all run with the same
  batch n_m = sum_i y[i, m];
- u[m, t] binary, one-hot batch size of segment m (sum_t t u[m, t] = n_m, t = 0..C);
- q[i, m, t] >= 0, the product y[i, m] u[m, t], linearized by reformulation-linearization (RLT):
  sum_t q[i, m, t] = y[i, m], q[i, m, t] <= u[m, t], and sum_i q[i, m, t] = t u[m, t] (the batch
  equation multiplied by u[m, t]). Then y[i, m] n_m = sum_t t q[i, m, t] exactly at integer points,
  and the LP relaxation is tighter than a big-M product (in a trial at N = 30, one of three rounds
  hit a 60 s limit with big-M and was proven optimal in 4 s with RLT; the others took similar time);
- theta >= (sum_i g_i a_i)^2 with a_i = 1 - x[i, 0]: the optimal-bandwidth term, a convex function
  of one linear expression, under-approximated by tangent cuts. A cut at the incumbent's value is
  added until theta matches it within the MILP's relative gap (Kelley's outer approximation); then
  the MILP value is an upper bound that the incumbent attains, so the incumbent is optimal.

Objective (maximized): sum V[i, o] x[i, o] - (beta / c) sum_m len_m sum_i lam_i sum_t t q[i, m, t]
- theta, i.e. :func:`relaydiff.system.problem.objective_value` at integer points.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from relaydiff.sched.baselines import greedy_options, local_search_options
from relaydiff.system.problem import Decision, RoundInstance, Solution, evaluate, objective_value


@dataclass(frozen=True)
class ExactConfig:
    """HiGHS time limit (whole solve) and relative gap; tangent cuts placed before the first solve."""

    time_limit_s: float = 60.0
    mip_rel_gap: float = 1e-6
    initial_cuts: int = 64
    max_oa_iters: int = 50


def _build(inst: RoundInstance) -> tuple[np.ndarray, list[tuple[coo_matrix, np.ndarray, np.ndarray]], int, int]:
    """Cost vector and structural constraints.

    Variable layout: [x (N*(P+1)), u (P*(C+1)), q (N*P*C), theta], C = min(N, M).
    """
    n, opts = inst.n_users, inst.options
    n_opt = len(opts)
    p = n_opt - 1
    cap = int(min(n, inst.max_batch))
    nt = cap + 1
    nx, nu, nq = n * n_opt, p * nt, n * p * cap
    nvar = nx + nu + nq + 1
    seg_len = np.diff(opts).astype(float)  # len_m for m = 1..P
    ts = np.arange(1, cap + 1, dtype=float)

    def xi(i: int, o: int) -> int:
        return i * n_opt + o

    def ui(m: int, t: int) -> int:
        return nx + (m - 1) * nt + t

    def qi(i: int, m: int, t: int) -> int:  # t in 1..C
        return nx + nu + ((m - 1) * n + i) * cap + (t - 1)

    cost = np.zeros(nvar)
    cost[:nx] = -inst.value_table.ravel()
    for m in range(1, p + 1):
        for i in range(n):
            base = qi(i, m, 1)
            cost[base : base + cap] = inst.beta_eff * seg_len[m - 1] * inst.edge_weight[i] * ts
    cost[-1] = 1.0

    r: list[int] = []
    c: list[int] = []
    v: list[float] = []
    lb: list[float] = []
    ub: list[float] = []

    def add_row(entries: list[tuple[int, float]], lo: float, hi: float) -> None:
        row = len(lb)
        for col, val in entries:
            r.append(row), c.append(col), v.append(val)
        lb.append(lo), ub.append(hi)

    for i in range(n):  # one option per user
        add_row([(xi(i, o), 1.0) for o in range(n_opt)], 1.0, 1.0)
    if inst.max_batch < n:  # capacity: sum_i x[i,0] >= N - M
        add_row([(xi(i, 0), 1.0) for i in range(n)], float(n - inst.max_batch), np.inf)
    for m in range(1, p + 1):
        higher = range(m, n_opt)  # options with k_o >= k_m: user on the edge in segment m
        add_row([(ui(m, t), 1.0) for t in range(nt)], 1.0, 1.0)  # one batch size
        # sum_t t u[m,t] = n_m = sum_i y[i,m]
        add_row([(ui(m, t), float(t)) for t in range(1, nt)] + [(xi(i, o), -1.0) for i in range(n) for o in higher], 0.0, 0.0)
        for t in range(1, nt):  # RLT: sum_i q[i,m,t] = t u[m,t]
            add_row([(qi(i, m, t), 1.0) for i in range(n)] + [(ui(m, t), -float(t))], 0.0, 0.0)
        for i in range(n):
            # sum_t q[i,m,t] = y[i,m]
            add_row([(qi(i, m, t), 1.0) for t in range(1, nt)] + [(xi(i, o), -1.0) for o in higher], 0.0, 0.0)
            for t in range(1, nt):  # q[i,m,t] <= u[m,t]
                add_row([(qi(i, m, t), 1.0), (ui(m, t), -1.0)], -np.inf, 0.0)
    a = coo_matrix((v, (r, c)), shape=(len(lb), nvar))
    return cost, [(a, np.array(lb), np.array(ub))], nx + nu, nvar


def _cut(inst: RoundInstance, sigma0: float, nx: int, nvar: int) -> tuple[np.ndarray, float]:
    """Tangent of s^2 at sigma0 in terms of x: theta - 2 sigma0 sum_i g_i (1 - x[i,0]) >= -sigma0^2."""
    n_opt = len(inst.options)
    row = np.zeros(nvar)
    row[-1] = 1.0
    row[np.arange(inst.n_users) * n_opt] = 2.0 * sigma0 * inst.bw_weight
    # theta + 2 s0 sum g_i x_i0 >= 2 s0 sum g_i - s0^2
    return row, 2.0 * sigma0 * inst.bw_weight.sum() - sigma0**2


def solve_exact(inst: RoundInstance, config: ExactConfig | None = None) -> Solution:
    """The proven optimum of one round (status 'optimal'), or, unproven (status 'time_limit', info
    ``proven_optimal`` False), the best of the MILP's incumbent and the baselines' decisions."""
    cfg = config or ExactConfig()
    t0 = time.perf_counter()
    cost, cons, n_int, nvar = _build(inst)
    nx = inst.n_users * len(inst.options)
    n_opt = len(inst.options)
    g = inst.bw_weight
    g_max = float(np.sort(g)[::-1][: inst.max_batch].sum())
    cut_rows: list[np.ndarray] = []
    cut_lb: list[float] = []
    for s0 in np.linspace(0.0, g_max, max(cfg.initial_cuts, 1)):
        row, lb = _cut(inst, float(s0), nx, nvar)
        cut_rows.append(row), cut_lb.append(lb)
    integrality = np.zeros(nvar)
    integrality[:n_int] = 1
    upper = np.full(nvar, np.inf)
    upper[:n_int] = 1.0
    bounds = Bounds(np.zeros(nvar), upper)
    status, iters, res = "optimal", 0, None
    best_k: np.ndarray | None = None
    for iters in range(1, cfg.max_oa_iters + 1):
        remaining = cfg.time_limit_s - (time.perf_counter() - t0)
        if remaining <= 0:
            status = "time_limit"
            break
        constraints = [LinearConstraint(a, lb, ub) for a, lb, ub in cons]
        constraints.append(LinearConstraint(np.array(cut_rows), np.array(cut_lb), np.full(len(cut_lb), np.inf)))
        res = milp(cost, constraints=constraints, integrality=integrality, bounds=bounds,
                   options={"time_limit": remaining, "mip_rel_gap": cfg.mip_rel_gap, "disp": False})
        if res.x is None:
            status = "time_limit" if res.status == 1 else f"failed: {res.message}"
            break
        x = np.round(res.x[:nx]).reshape(inst.n_users, n_opt)
        best_k = inst.options[np.argmax(x, axis=1)]
        if res.status != 0:
            status = "time_limit"
            break
        sigma = float(g @ (1.0 - x[:, 0]))
        # Converged when theta's under-estimate is within the MILP's own relative gap.
        if sigma**2 - res.x[-1] <= cfg.mip_rel_gap * max(1.0, abs(res.fun)):
            break
        row, lb = _cut(inst, sigma, nx, nvar)
        cut_rows.append(row), cut_lb.append(lb)
    else:
        status = "oa_iteration_limit"
    source = "milp"
    if status != "optimal":
        best_k, source = _best_unproven(inst, best_k)
    wall = time.perf_counter() - t0
    obj, _ = evaluate(inst, Decision(best_k))
    dual = getattr(res, "mip_dual_bound", None) if res is not None else None
    bound = float(-dual) if dual is not None else float("nan")
    info = {"oa_iterations": iters, "milp_bound": bound, "mip_gap": getattr(res, "mip_gap", None),
            "proven_optimal": status == "optimal", "decision_from": source}
    return Solution("exact", Decision(best_k), obj, wall, status, info)


def _best_unproven(inst: RoundInstance, incumbent: np.ndarray | None) -> tuple[np.ndarray, str]:
    """Without a proof, the best of the MILP's incumbent and the baselines' decisions (and its source).

    A MILP stopped at its time limit can hold an incumbent worse than greedy (about 3% below it on a
    congested N = 1000 round, issue 18); the baselines cost milliseconds next to the limit.
    """
    candidates: list[tuple[str, np.ndarray]] = [("all_local", np.zeros(inst.n_users, dtype=np.int64))]
    if incumbent is not None:
        candidates.append(("milp", np.asarray(incumbent, dtype=np.int64)))
        ls_from_milp, _ = local_search_options(inst, start=inst.option_index(incumbent))
        candidates.append(("milp+local_search", inst.options[ls_from_milp]))
    candidates.append(("greedy", inst.options[greedy_options(inst)]))
    candidates.append(("local_search", inst.options[local_search_options(inst)[0]]))
    scores = [objective_value(inst, k) for _, k in candidates]
    best = int(np.argmax(scores))  # first of ties: the MILP's own incumbent before a baseline's equal one
    return candidates[best][1], candidates[best][0]
