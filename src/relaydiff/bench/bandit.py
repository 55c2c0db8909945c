"""`relaydiff bench bandit`: the relay bandits against a peer library, baselines and the oracle.

Every algorithm serves the same request streams (:class:`relaydiff.sim.relay_stream.RelayStream`,
common random numbers per seed) of each scenario in ``scenarios/relay/``; prompts are held-out
world prompts featurized from their text (:mod:`relaydiff.serve.bandit_prompts`). ``linucb`` is
disjoint LinUCB on the 17-number relay context (the algorithm MABWiser's LinUCB implements);
``linucb_shared`` is the relay scheduler of record: one LinUCB model for all arms over the context
combined with each arm's measured descriptors (:mod:`relaydiff.sim.relay_arm_features`). Reported per
algorithm (top level: the stationary scenario; ``by_scenario``: each): mean reward, cumulative
regret against the oracle (mean over seeds), reward ratio to the oracle, and the median time of a
decision and of an update in these runs. Peers: MABWiser's LinUCB and LinTS at the same alpha and
l2 on the same streams and feedback (optional dependency ``mabwiser``, the ``bench`` extra).

``shifts``: after each phase change of a drifting scenario, ``requests_to_recover`` is the number of
requests until the mean reward over the last ``recover_window`` requests (all after the shift,
means over seeds) is within 5% of the oracle's over the same requests (null: not within the stream).

``timing``: LinUCB's and shared LinUCB's decisions (from the relay context, the shared model's
feature map included) against MABWiser LinUCB's ``predict``, all trained on the same stream,
interleaved in rounds on the same contexts (median per round; the ratios per round). The shared
model is timed twice: its decision of record (``decide_projected`` on the 17 numbers the 28 columns
repeat) and the same scores from the full 28-column stack (``..._full_stack``, the path before it).

``targets``: the issue's targets for ``linucb`` and for ``linucb_shared``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from relaydiff.sched.bandit import Bandit, make_bandit
from relaydiff.sched.relay_policy import RELAY_BANDIT, RelayBandit
from relaydiff.sim.relay_stream import CONTEXT_FEATURES, PromptPool, RelayStream, StreamResult
from relaydiff.system.relay_scenario import load_relay_scenario

RECOVER_TOLERANCE = 0.05


@dataclass
class BanditBenchConfig:
    """What the bench runs (echoed in its JSON)."""

    scenarios: tuple[str, ...] = ("stationary", "complexity_shift", "network_degradation", "load_spike")
    seeds: int = 3
    requests: int | None = None  # None: each scenario's own length
    # Picked on tuning streams disjoint from the bench's (stream seeds 100-105, prompt pool seed 7;
    # the bench runs stream seeds 0..seeds-1 on prompt pool seed 0), stationary scenario. Disjoint
    # LinUCB, alpha {0.05, 0.1, 0.2} x l2 {0.3, 1}: 0.941-0.957 of the oracle, no setting reliably
    # above 0.95; shared LinUCB, alpha {0, 0.05, 0.1, 0.2} x l2 {0.1, 1}: 0.971-0.981, best worst
    # seed at alpha 0.1, l2 0.1 (0.983 mean, 0.975 worst seed).
    alpha: float = 0.1  # LinUCB, shared LinUCB and MABWiser LinUCB
    lints_v: float = 0.05  # LinTS and MABWiser LinTS (its alpha)
    l2: float = 0.1
    epsilon: float = 0.02
    ucb_c: float = 0.3
    window: int = 800  # sliding-window LinUCB
    peers: bool = True
    pool_per_class: int = 100  # held-out prompts per object count in the simulator's pool
    recover_window: int = 100
    timing_rounds: int = 7
    timing_calls: int = 300
    jobs: int = 1  # processes over (scenario, seed) streams


@dataclass
class _Run:
    """One algorithm on one stream, with per-call timings."""

    result: StreamResult
    decide_ns: list[int] = field(default_factory=list)
    update_ns: list[int] = field(default_factory=list)


class MabwiserPeer:
    """MABWiser's LinUCB or LinTS behind the bandit interface (arms before any feedback: in turn)."""

    def __init__(self, n_arms: int, policy: str, alpha: float, l2: float, seed: int):
        # lazy: MABWiser is optional (the bench extra); only the peer runs need it
        from mabwiser.mab import MAB, LearningPolicy

        lp = (LearningPolicy.LinUCB if policy == "linucb" else LearningPolicy.LinTS)(alpha=alpha, l2_lambda=l2)
        self.mab = MAB(list(range(n_arms)), lp, seed=seed)
        self.n_arms, self.fitted, self.cold = n_arms, False, 0

    def decide(self, x: np.ndarray) -> int:
        if not self.fitted:
            self.cold += 1
            return (self.cold - 1) % self.n_arms
        return int(self.mab.predict(x[None, :]))

    def update(self, arm: int, x: np.ndarray, reward: float) -> None:
        if self.fitted:
            self.mab.partial_fit([arm], [reward], x[None, :])
        else:
            self.mab.fit([arm], [reward], x[None, :])
            self.fitted = True


def _algorithms(cfg: BanditBenchConfig, stream: RelayStream, peers: bool) -> dict[str, Callable[[int], Any]]:
    arms, d = stream.arm_names, len(CONTEXT_FEATURES)
    kw = {"feature_names": CONTEXT_FEATURES}
    algos: dict[str, Callable[[int], Any]] = {
        "oracle": lambda s: make_bandit("oracle", arms, d, seed=s, **kw),
        "linucb": lambda s: make_bandit("linucb", arms, d, alpha=cfg.alpha, l2=cfg.l2, seed=s, **kw),
        RELAY_BANDIT: lambda s: RelayBandit.make(RELAY_BANDIT, stream.arms, seed=s, alpha=cfg.alpha, l2=cfg.l2),
        "lints": lambda s: make_bandit("lints", arms, d, v=cfg.lints_v, l2=cfg.l2, seed=s, **kw),
        "egreedy": lambda s: make_bandit("egreedy", arms, d, epsilon=cfg.epsilon, l2=cfg.l2, seed=s, **kw),
        "swlinucb": lambda s: make_bandit("swlinucb", arms, d, alpha=cfg.alpha, l2=cfg.l2, window=cfg.window, seed=s,
                                          **kw),
        "ucb1": lambda s: make_bandit("ucb1", arms, d, c=cfg.ucb_c, seed=s, **kw),
        "random": lambda s: make_bandit("random", arms, d, seed=s, **kw),
    }
    if peers:
        algos["mabwiser_linucb"] = lambda s: MabwiserPeer(len(arms), "linucb", cfg.alpha, cfg.l2, s)
        algos["mabwiser_lints"] = lambda s: MabwiserPeer(len(arms), "lints", cfg.lints_v, cfg.l2, s)
    for i, name in enumerate(arms):
        algos[f"fixed_{name}"] = lambda s, i=i: make_bandit("fixed", arms, d, arm=i, seed=s, **kw)
    return algos


def run_policy(stream: RelayStream, policy: Any) -> _Run:
    """Serve ``stream`` with ``policy`` (a bandit, the oracle or a peer), timing every call."""
    clock = time.perf_counter_ns
    run = _Run(result=None)  # type: ignore[arg-type]
    is_oracle = hasattr(policy, "decide_expected")

    def decide(x: np.ndarray, expected: Callable[[], np.ndarray]) -> int:
        if is_oracle:
            e = expected()
            t0 = clock()
            a = policy.decide_expected(e)
        else:
            t0 = clock()
            a = policy.decide(x)
        run.decide_ns.append(clock() - t0)
        return a

    def learn(a: int, x: np.ndarray, r: float) -> None:
        t0 = clock()
        policy.update(a, x, r)
        run.update_ns.append(clock() - t0)

    run.result = stream.run(decide, learn)
    return run


def requests_to_recover(alg: np.ndarray, oracle: np.ndarray, start: int, window: int,
                        tolerance: float = RECOVER_TOLERANCE) -> int | None:
    """Requests after ``start`` until the trailing-window mean of ``alg`` is within ``tolerance`` of
    the oracle's (relative to its magnitude); None when it never is."""
    a, o = np.cumsum(alg[start:]), np.cumsum(oracle[start:])
    for n in range(window, len(a) + 1):
        ma = (a[n - 1] - (a[n - window - 1] if n > window else 0.0)) / window
        mo = (o[n - 1] - (o[n - window - 1] if n > window else 0.0)) / window
        if ma >= mo - tolerance * abs(mo):
            return n
    return None


def _timing(cfg: BanditBenchConfig, linucb: Bandit, shared: RelayBandit, peer: MabwiserPeer,
            contexts: np.ndarray) -> dict[str, Any]:
    """Interleaved rounds: LinUCB and shared LinUCB decide vs MABWiser LinUCB predict on the same contexts."""
    clock = time.perf_counter_ns
    ours, mine, full, theirs = [], [], [], []
    full_stack = lambda x: shared.bandit._decide(shared.policy_context(x))  # noqa: E731
    for _ in range(cfg.timing_rounds):
        for fn, out in ((linucb.decide, ours), (shared.decide, mine), (full_stack, full), (peer.decide, theirs)):
            ts = []
            for x in contexts[: cfg.timing_calls]:
                t0 = clock()
                fn(x)
                ts.append(clock() - t0)
            out.append(float(np.median(ts)) / 1e3)
    ratio, ratio_shared = np.array(ours) / np.array(theirs), np.array(mine) / np.array(theirs)
    return {"rounds": cfg.timing_rounds, "calls_per_round": cfg.timing_calls,
            "linucb_decide_us": ours, f"{RELAY_BANDIT}_decide_us": mine, f"{RELAY_BANDIT}_full_stack_decide_us": full,
            "mabwiser_linucb_predict_us": theirs,
            "ratio_median": float(np.median(ratio)), "ratio_range": [float(ratio.min()), float(ratio.max())],
            f"{RELAY_BANDIT}_ratio_median": float(np.median(ratio_shared)),
            f"{RELAY_BANDIT}_ratio_range": [float(ratio_shared.min()), float(ratio_shared.max())]}


def bench_bandit(cfg: BanditBenchConfig, pool: PromptPool, say: Callable[[str], None] = lambda s: None,
                 plot_dir: str | Path | None = None) -> dict[str, Any]:
    """Run every algorithm on every scenario and seed; returns the JSON of record (see the module docstring)."""
    t_start = time.perf_counter()
    out: dict[str, Any] = {"config": asdict(cfg), "context_features": list(CONTEXT_FEATURES), "requests": {},
                           "seeds": cfg.seeds}
    curves: dict[str, dict[str, Any]] = {}  # scenario -> algorithm -> rewards [seeds, n]
    shares: dict[str, dict[str, Any]] = {}  # scenario -> algorithm -> arms [seeds, n]
    timings: dict[str, dict[str, list[int]]] = {}
    phase_starts: dict[str, tuple[int, ...]] = {}
    tasks = []
    for sc_name in cfg.scenarios:
        sc = _scenario(cfg, sc_name)
        out["requests"][sc_name] = sc.requests
        curves[sc_name], shares[sc_name] = {}, {}
        tasks += [(cfg, sc_name, seed, pool) for seed in range(cfg.seeds)]
    if cfg.jobs > 1:
        with ProcessPoolExecutor(max_workers=cfg.jobs) as ex:
            results = list(ex.map(_run_task, tasks))
    else:
        results = [_run_task(t, say) for t in tasks]
    for (_, sc_name, seed, _), res in zip(tasks, results):
        if "arms" not in out:
            out["arms"] = res["arms"]
        if "timing" in res:
            out["timing"] = res["timing"]
        phase_starts[sc_name] = res["phase_starts"]
        for name, run in res["runs"].items():
            curves[sc_name].setdefault(name, []).append(run["rewards"])
            shares[sc_name].setdefault(name, []).append(run["arms"])
            tm = timings.setdefault(name, {"decide": [], "update": []})
            tm["decide"] += run["decide_ns"]
            tm["update"] += run["update_ns"]
            if cfg.jobs > 1:  # a single process said it as it went
                say(f"{sc_name} seed {seed} {name}: reward {run['rewards'].mean():.4f} ({run['wall_s']:.1f}s)")
    for sc_name in cfg.scenarios:
        for name in curves[sc_name]:
            curves[sc_name][name] = np.array(curves[sc_name][name])
            shares[sc_name][name] = np.array(shares[sc_name][name])
    arm_names = tuple(a["name"] for a in out["arms"])

    first = cfg.scenarios[0]
    algorithms: dict[str, Any] = {}
    for name in curves[first]:
        entry: dict[str, Any] = {}
        for sc_name in cfg.scenarios:
            if name not in curves[sc_name]:
                continue
            r, o = curves[sc_name][name], curves[sc_name]["oracle"]
            regret = (o - r).sum(1)
            entry.setdefault("by_scenario", {})[sc_name] = {
                "reward_mean": float(r.mean()), "regret": float(regret.mean()),
                "regret_se": float(regret.std(ddof=1) / np.sqrt(len(regret))) if len(regret) > 1 else None,
                "reward_ratio_to_oracle": float(r.mean() / o.mean()),
                "arm_shares": (np.bincount(shares[sc_name][name].ravel(), minlength=len(arm_names))
                               / shares[sc_name][name].size).round(4).tolist()}
        top = entry["by_scenario"][first]
        entry = {"reward_mean": top["reward_mean"], "regret": top["regret"],
                 "reward_ratio_to_oracle": top["reward_ratio_to_oracle"],
                 "decide_us_median": float(np.median(timings[name]["decide"])) / 1e3,
                 "update_us_median": float(np.median(timings[name]["update"])) / 1e3 if timings[name]["update"] else None,
                 **entry}
        algorithms[name] = entry
    out["algorithms"] = algorithms
    shifts: dict[str, Any] = {}
    for name in algorithms:
        rec: dict[str, Any] = {}
        for sc_name in cfg.scenarios:
            for start in phase_starts[sc_name] if name in curves[sc_name] else ():
                alg, orc = curves[sc_name][name].mean(0), curves[sc_name]["oracle"].mean(0)
                rec[f"{sc_name}@{start}"] = requests_to_recover(alg, orc, start, cfg.recover_window)
        if not rec:
            continue
        shifts[name] = {"requests_to_recover": rec,
                        "max": None if any(v is None for v in rec.values()) else max(rec.values(), default=None)}
    out["shifts"] = shifts
    out["paired"] = _paired(curves[first], cfg)
    out["targets"] = _targets(out, arm_names)
    if plot_dir is not None:
        out["plots"] = _plots(curves, shares, phase_starts, arm_names, cfg, Path(plot_dir))
    out["wall_s"] = time.perf_counter() - t_start
    return out


def _scenario(cfg: BanditBenchConfig, name: str) -> Any:
    """A scenario, resized to ``cfg.requests`` when set (its phases move along)."""
    sc = load_relay_scenario(name)
    if cfg.requests is None:
        return sc
    return sc.model_copy(update={"requests": cfg.requests, "phases": tuple(
        p.model_copy(update={"start": p.start * cfg.requests // sc.requests}) for p in sc.phases)})


def _run_task(task: tuple, say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Every algorithm on one (scenario, seed) stream; the first stream of seed 0 also times LinUCB vs MABWiser."""
    cfg, sc_name, seed, pool = task
    stream = RelayStream(_scenario(cfg, sc_name), pool, seed=seed)
    first = sc_name == cfg.scenarios[0] and seed == 0
    out: dict[str, Any] = {"phase_starts": stream.phase_starts, "runs": {}, "arms": [
        {"name": a.name, "k": a.k, "device_guidance": a.device_guidance, "fidelity_by_objects": list(a.fidelity),
         "fidelity_std": a.fidelity_std, "style_fidelity": a.style_fidelity, "device_row_factor": a.device_row_factor,
         "source": a.source, "style_source": a.style_source,
         "adapter_factor": a.adapter_factor, "adapter_source": a.adapter_source, "row_source": a.row_source}
        for a in stream.arms]}
    # the peers on the first scenario only: MABWiser's partial_fit costs ~6 ms an update here
    algos = _algorithms(cfg, stream, peers=cfg.peers and sc_name == cfg.scenarios[0])
    trained = {}
    for name, factory in algos.items():
        policy = factory(seed)
        t0 = time.perf_counter()
        run = run_policy(stream, policy)
        out["runs"][name] = {"rewards": run.result.rewards, "arms": run.result.arms, "decide_ns": run.decide_ns,
                             "update_ns": run.update_ns, "wall_s": time.perf_counter() - t0}
        say(f"{sc_name} seed {seed} {name}: reward {run.result.rewards.mean():.4f} ({time.perf_counter() - t0:.1f}s)")
        if first and name in ("linucb", RELAY_BANDIT, "mabwiser_linucb"):
            trained[name] = policy
    if len(trained) == 3:
        rng = np.random.default_rng(99)
        idx = rng.choice(stream.scenario.requests, size=min(cfg.timing_calls, stream.scenario.requests), replace=False)
        contexts = np.array([stream.context(int(i), [int(r) for r in rng.integers(1, 20, 6)]) for i in idx])
        out["timing"] = _timing(cfg, trained["linucb"], trained[RELAY_BANDIT], trained["mabwiser_linucb"], contexts)
    return out


def _paired(curves: dict[str, np.ndarray], cfg: BanditBenchConfig) -> dict[str, Any]:
    """Per-seed paired difference of total reward (common random numbers), mean and 95% t-interval."""
    # lazy: scipy.stats is slow to import; only the paired interval needs it
    from scipy import stats

    out = {}
    pairs = [("linucb", "mabwiser_linucb"), ("lints", "mabwiser_lints"), ("linucb", "oracle"),
             (RELAY_BANDIT, "mabwiser_linucb"), (RELAY_BANDIT, "linucb"), (RELAY_BANDIT, "oracle")]
    best_fixed = max((n for n in curves if n.startswith("fixed_")), key=lambda n: curves[n].mean(), default=None)
    if best_fixed:
        pairs += [("linucb", best_fixed), (RELAY_BANDIT, best_fixed)]
    for a, b in pairs:
        if a not in curves or b not in curves:
            continue
        diff = curves[a].sum(1) - curves[b].sum(1)
        half = (float(stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff)))
                if len(diff) > 1 else None)
        out[f"{a}_minus_{b}"] = {"total_reward_diff_mean": float(diff.mean()), "ci95_half_width": half,
                                 "per_seed": diff.round(3).tolist()}
    return out


def _targets(out: dict[str, Any], arms: tuple[str, ...]) -> dict[str, Any]:
    """The issue's targets, for disjoint LinUCB and for the shared model (``{algorithm: {target: met}}``)."""
    alg = out["algorithms"]
    fixed = max(alg[f"fixed_{a}"]["reward_mean"] for a in arms)
    targets = {}
    for name, ratio_key in (("linucb", "ratio_median"), (RELAY_BANDIT, f"{RELAY_BANDIT}_ratio_median")):
        t: dict[str, Any] = {"decide_us_median<15": alg[name]["decide_us_median"] < 15}
        if "timing" in out:
            t["decide<=1/4_mabwiser_predict"] = out["timing"][ratio_key] <= 0.25
        if "mabwiser_linucb" in alg:
            t["regret<=mabwiser_linucb"] = alg[name]["regret"] <= alg["mabwiser_linucb"]["regret"]
        t["reward>=0.95_oracle"] = alg[name]["reward_ratio_to_oracle"] >= 0.95
        t["beats_every_fixed_arm"] = alg[name]["reward_mean"] > fixed
        rec = out["shifts"].get(name)  # None: no scenario here shifts
        t["recovers_within_300"] = None if rec is None else rec["max"] is not None and rec["max"] <= 300
        targets[name] = t
    return targets


def _plots(curves, shares, phase_starts, arm_names, cfg: BanditBenchConfig, plot_dir: Path) -> list[str]:
    # lazy: matplotlib is slow to import; only the plots need it
    import matplotlib

    matplotlib.use("Agg")
    # lazy: matplotlib is slow to import; only the plots need it
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    first = cfg.scenarios[0]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=80)
    orc = curves[first]["oracle"]
    fixed = [n for n in curves[first] if n.startswith("fixed_")]
    best_fixed = max(fixed, key=lambda n: curves[first][n].mean())
    for name in [n for n in curves[first] if not n.startswith("fixed_") and n != "oracle"] + [best_fixed]:
        reg = np.cumsum(orc - curves[first][name], axis=1)
        m = reg.mean(0)
        ax.plot(m, label=name, lw=1.2, ls="--" if name.startswith(("mabwiser", "fixed")) else "-")
    ax.set_xlabel("request")
    ax.set_ylabel("cumulative regret vs oracle")
    ax.set_title(f"relay bandits, {first} stream (mean of {cfg.seeds} seeds)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    regret_png = plot_dir / "bench_bandit_regret.png"
    fig.savefig(regret_png)
    plt.close(fig)

    drifting = [s for s in cfg.scenarios if phase_starts[s]]
    show = [a for a in ("linucb", RELAY_BANDIT, "swlinucb", "oracle") if a in curves[first]]
    fig, axes = plt.subplots(len(drifting) or 1, len(show), figsize=(3.2 * len(show), 2.4 * max(len(drifting), 1)),
                             dpi=70, squeeze=False)
    w = cfg.recover_window
    for i, sc_name in enumerate(drifting):
        for j, name in enumerate(show):
            arms = shares[sc_name][name]
            n = arms.shape[1]
            edges = np.arange(0, n + 1, w)
            frac = np.array([[np.mean(arms[:, a:b] == k) for a, b in zip(edges[:-1], edges[1:])]
                             for k in range(len(arm_names))])
            ax = axes[i][j]
            ax.stackplot(edges[:-1] + w / 2, frac, labels=arm_names)
            for s in phase_starts[sc_name]:
                ax.axvline(s, color="k", lw=1.2, ls="--")
            ax.set_title(f"{sc_name}: {name}", fontsize=8)
            ax.set_ylim(0, 1)
            ax.tick_params(labelsize=6)
    axes[0][-1].legend(fontsize=5, loc="upper right")
    fig.tight_layout()
    shares_png = plot_dir / "bench_bandit_shares.png"
    fig.savefig(shares_png)
    plt.close(fig)
    return [str(regret_png), str(shares_png)]


__all__ = ["BanditBenchConfig", "MabwiserPeer", "bench_bandit", "requests_to_recover", "run_policy"]
