"""Is QoEEnv.best_allocation near the optimum? Against Powell from random starts on the true objective.

python docs/measurements/qoe_bound_check.py [ROUNDS] [STARTS]   (defaults 6 and 8; ~2 min on one core)

For each of the bench's first ROUNDS evaluation rounds: the bound, and the best of STARTS Powell
searches from uniform random actions in the box, each evaluation re-picking the shared steps (the
objective the bound alternates on). Prints one line a round and the largest amount by which a
search beat the bound.
"""

import sys

import numpy as np
from scipy.optimize import minimize

from relaydiff.bench.qoe import EVAL_SEED
from relaydiff.sim.qoe_env import QoEEnv

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 6
starts = int(sys.argv[2]) if len(sys.argv) > 2 else 8
env = QoEEnv()
worst = 0.0
for j in range(rounds):
    env.reset(seed=EVAL_SEED + j)
    bound = env.best_allocation()["qoe"]
    k = env.round.k

    def total(x: np.ndarray) -> float:
        a = -np.ones((2, env.k_max))
        a[:, :k] = x.reshape(2, k)
        return float(env.outcome(*env.decode_action(a.ravel())).scores.sum())

    rng = np.random.default_rng(j)
    searched = max(-minimize(lambda z: -total(z), rng.uniform(-1, 1, 2 * k), method="Powell",
                             bounds=[(-1, 1)] * (2 * k), options={"maxfev": 20000}).fun for _ in range(starts))
    worst = max(worst, searched - bound)
    print(f"round {j}: K={k} bound {bound:.3f} best of {starts} Powell searches {searched:.3f}", flush=True)
print(f"largest amount a search beat the bound by: {worst:.4f}")
