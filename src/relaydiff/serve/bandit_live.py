"""`relaydiff bandit live`: the relay bandit choosing each request's configuration on the real engine.

One request stream (users, links, preferences, prompts, arrival times: a seed of a relay scenario,
:class:`relaydiff.sim.relay_stream.RelayStream`) is served through the engine, on a virtual clock
driven by measured compute:

- compute is timed as this thread's CPU time (``cpu_clock``, the default; torch runs one thread):
  policies are served one after another, and on a shared host wall time would charge other jobs'
  load to whichever policy ran then (the device's time, scaled up 4-14x, most of all).
- edge: the large member's steps of every chain go through the continuous-batching executor on
  this machine (node ``edge``); each batched call advances the clock by its measured time,
  and requests that arrive meanwhile join the next call. The context's edge features use an edge
  profile measured on this machine at the start of the run (batches 1..max_batch).
- network: the prompt up and the handoff latent down at the user's link rate (the system model).
- device: the small member (with the user's style adapter when they have one) runs the remaining
  steps here; its measured time is scaled by the device profile's step latency over this machine's
  measured small-member step (both with guidance), and the profile's decode time is added. The
  user's style adapter is switched in before the timer starts and every adapter is traced before the
  run (a device keeps its user's adapter loaded; one process playing every user would otherwise
  charge each styled segment a switch, about 7 ms here, and the first one a trace). With
  ``recalibrate`` (the default) this machine's step is measured again right after each device
  segment (median of 3 steps), so the scale follows the host's speed at that moment; one measurement
  at the start read 9.7 and 5.2 ms in two runs an hour apart on a shared 2-core host, which moved
  every device latency of a run by the same factor.
- reward: the judge reads the decoded image (prompt fidelity against the prompt's scene; for styled
  users also whether it shows their style) and the latency is the one above; utility as in the
  simulator. The bandit learns from each reward when its request finishes.

The policy (default: shared LinUCB, :data:`relaydiff.sched.relay_policy.RELAY_BANDIT`) starts from
a run on the simulator (``warm_requests`` requests of the same scenario, another seed; the loop
engine -> profile -> simulator -> policy -> engine) unless a saved state is given. Every fixed arm
then serves the same stream (same users, prompts and noise seeds), so the comparison is paired.

Images are deterministic per (request, arm): same prompt, seed and plan. The device segment, the
decode and the judge's reading are therefore done once per (request, arm) and reused by every policy
that picks that arm for that request (the device time is the one measured then). The edge segment
always runs, since its latency depends on what else the policy put on the edge.
"""

from __future__ import annotations

import heapq
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relaydiff.engine.chain import new_chain
from relaydiff.engine.executor import Executor
from relaydiff.engine.family import load_family
from relaydiff.engine.plan import Plan, Request
from relaydiff.engine.profile import hardware, measure_step_latency
from relaydiff.quality.judge import load_judge
from relaydiff.quality.metrics import prompt_fidelity
from relaydiff.sched.bandit import FixedArm
from relaydiff.sched.relay_policy import RELAY_BANDIT, RelayBandit
from relaydiff.serve.bandit_prompts import calibration_featurizer, prompt_pool, sample_prompts
from relaydiff.sim.relay_stream import CONTEXT_FEATURES, PromptPool, RelayStream
from relaydiff.system.profiles import load_profile
from relaydiff.system.quality import REFERENCE_TABLE
from relaydiff.system.relay_scenario import RelayScenario, load_relay_scenario


@dataclass
class LiveConfig:
    family: str = "reference"
    requests: int = 60
    seed: int = 0
    scenario: str = "stationary"
    arrival_rate_hz: float | None = None  # None: the scenario's
    algorithm: str = RELAY_BANDIT
    alpha: float = 0.1  # exploration of the LinUCB policies (UCB_POLICIES); lints and egreedy keep their own
    l2: float = 0.1
    warm_requests: int = 3000  # simulator requests before going live (0: start cold)
    state: str | None = None  # a saved bandit state instead of the warm start
    save_state: str | None = None  # where to save the bandit after the live run
    compare_fixed: bool = True
    max_batch: int = 16
    threads: int = 1
    cpu_clock: bool = True  # time compute by this thread's CPU time (False: wall time)
    recalibrate: bool = True  # re-measure this machine's small-member step after each device segment

    @property
    def clock(self) -> Callable[[], float]:
        return time.thread_time if self.cpu_clock else time.perf_counter


@dataclass
class LiveRun:
    """One policy over the live stream: per request arm, reward, quality and latency."""

    name: str
    arms: list[int]
    rewards: list[float]
    quality: list[float]
    latency_s: list[float]


def measured_edge_profile(family: Any, member: str, max_batch: int, guidance: float, folder: Path,
                          clock: Callable[[], float]) -> Path:
    """This machine as the edge: the member's batched step latency, written as a profile file."""
    sizes = sorted({1, 4, max_batch})
    lat = measure_step_latency(family, member, sizes, steps=3, guidance=guidance, warmup=1, clock=clock)
    prof = {"format": "relaydiff.profile/1", "kind": "edge", "name": "this-machine", "hardware": hardware(),
            "max_batch": max_batch,
            "members": {member: {"step_latency_s": {str(b): t for b, t in lat.items()},
                                 "source": "measured by relaydiff bandit live (engine executor, median)"}}}
    path = folder / "edge_this_machine.json"
    path.write_text(json.dumps(prof, indent=1))
    return path


def _device_scale(family: Any, stream: RelayStream, member: str, guidance: float,
                  clock: Callable[[], float]) -> tuple[np.ndarray, float]:
    """Per request: device profile step latency / this machine's measured step of ``member``."""
    here = measure_step_latency(family, member, [1], steps=6, guidance=guidance, warmup=1, clock=clock)[1]
    return stream.device_step_s / here, here


def table_guidance(scenario: str) -> float:
    """The guidance the scenario's quality table was measured at (the live run generates at it)."""
    table = json.loads(Path(_table_path(load_relay_scenario(scenario).quality_table)).read_text())
    return float(table.get("config", {}).get("guidance", 3.0))


UCB_POLICIES = ("linucb", "swlinucb", RELAY_BANDIT)  # the policies whose exploration is ``alpha``


def live_scenario(cfg: LiveConfig, edge_profile: str | Path | None) -> RelayScenario:
    """The scenario of a live run: ``cfg``'s requests (no phases) and rate, and ``edge_profile`` (this
    machine measured as the edge, :func:`measured_edge_profile`; None: the scenario's own) as the edge."""
    scenario = load_relay_scenario(cfg.scenario)
    updates: dict[str, Any] = {"requests": cfg.requests, "phases": ()}
    if cfg.arrival_rate_hz is not None:
        updates["arrival_rate_hz"] = cfg.arrival_rate_hz
    if edge_profile is not None:
        updates["edge"] = scenario.edge.model_copy(update={"profile": str(edge_profile), "member": "large",
                                                           "max_batch": cfg.max_batch})
    return scenario.model_copy(update=updates)


@dataclass
class LiveStreams:
    """The request stream of a live run (users, prompts and their scenes) and the simulated warm-start stream."""

    stream: RelayStream
    prompts: list[str]
    scenes: list[Any]
    warm: RelayStream | None  # None: no warm start (``warm_requests`` 0)


def live_streams(cfg: LiveConfig, scenario: RelayScenario) -> LiveStreams:
    """The live stream of ``cfg.seed`` (prompt features fitted on seeded calibration prompts) and the
    warm-start stream (``warm_requests`` simulated requests of the same scenario, seed + 1)."""
    featurizer = calibration_featurizer(cfg.seed, n=150)
    per_class = max(4, -(-cfg.requests // 3))
    prompts, scenes = sample_prompts(per_class, seed=cfg.seed + 777)
    pool = PromptPool(features=featurizer(prompts), n_objects=np.array([len(s.objects) for s in scenes]))
    stream = RelayStream(scenario, pool, seed=cfg.seed)
    warm = None
    if cfg.warm_requests > 0:
        warm = RelayStream(scenario.model_copy(update={"requests": cfg.warm_requests}),
                           prompt_pool(featurizer, 50, seed=cfg.seed + 1), seed=cfg.seed + 1)
    return LiveStreams(stream, prompts, scenes, warm)


def new_bandit(cfg: LiveConfig, arms: Sequence[Any]) -> RelayBandit:
    """A fresh ``cfg.algorithm`` over ``arms``: ``cfg.alpha`` for the LinUCB policies, ``cfg.l2`` for every linear one."""
    ucb = cfg.algorithm in UCB_POLICIES
    return RelayBandit.make(cfg.algorithm, arms, seed=cfg.seed, **({"alpha": cfg.alpha} if ucb else {}),
                            **({"l2": cfg.l2} if ucb or cfg.algorithm in ("lints", "egreedy") else {}))


def train_in_simulator(bandit: RelayBandit, stream: RelayStream) -> float:
    """Run ``bandit`` over a simulated stream, learning as it goes; returns its mean reward."""
    return float(stream.run(lambda x, e: bandit.decide(x), bandit.update).rewards.mean())


class LiveStream:
    """The engine side of a live run: family, judge, prompts and the stream's users."""

    def __init__(self, cfg: LiveConfig, family: Any, judge: Any, stream: RelayStream, prompts: list[str],
                 scenes: list[Any], scale: np.ndarray, guidance: float):
        self.cfg, self.family, self.judge, self.stream = cfg, family, judge, stream
        self.prompts, self.scenes, self.scale, self.guidance = prompts, scenes, scale, guidance
        styles = sorted(family.adapters)
        self.style = [styles[i % len(styles)] if stream.rho[i] > 0 and styles else None
                      for i in range(stream.scenario.requests)]
        self.finished: dict[tuple[int, int], tuple[float, float]] = {}  # (request, arm) -> (quality, device compute s)
        self.reference_steps: list[float] = []  # this machine's small-member step, measured after each device segment

    def serve(self, name: str, decide: Callable[[np.ndarray], int], learn: Callable[[int, np.ndarray, float], None] | None,
              say: Callable[[str], None] = lambda s: None) -> LiveRun:
        """Serve every request of the stream with ``decide`` on the engine (see the module docstring)."""
        st, fam, n = self.stream, self.family, self.stream.scenario.requests
        steps = st.scenario.steps
        edge = Executor(fam, node="edge", max_batch=self.cfg.max_batch)
        run = LiveRun(name, [0] * n, [0.0] * n, [0.0] * n, [0.0] * n)
        arrival, k_of, req_of = st.arrival_s, {}, {}
        pending: list[tuple[float, int, np.ndarray]] = []
        contexts: dict[int, np.ndarray] = {}
        clock, i = 0.0, 0

        def finish(idx: int, chain: Any, edge_done: float | None) -> None:
            a = run.arms[idx]
            arm = st.arms[a]
            if (idx, a) not in self.finished:
                if not chain.done:
                    # the user's adapter (or none) is resident on their device: switching it (peft,
                    # about 7 ms here) is what one process playing every user costs, not the device
                    fam.unet(chain.segment.member, self.style[idx])
                t0 = self.cfg.clock()
                if not chain.done:
                    dev = Executor(fam, node="device", max_batch=1)
                    dev.submit(chain)
                    dev.run()
                here_s = self.cfg.clock() - t0
                device_s = here_s * self.scale[idx]
                if self.cfg.recalibrate and arm.k < steps:
                    ref = measure_step_latency(fam, "small", [1], steps=3, guidance=self.guidance, warmup=1,
                                               clock=self.cfg.clock)[1]
                    self.reference_steps.append(ref)
                    device_s = here_s * st.device_step_s[idx] / ref
                image = fam.decode(chain.latents)
                pf = prompt_fidelity(image, [self.scenes[st.prompt_index[idx]]], self.judge).per_image[0]
                q = float(pf)
                if st.rho[idx] > 0:
                    sf = float(self.judge.read(image)[0].style == self.style[idx]) if self.style[idx] else 0.0
                    q = (1 - st.rho[idx]) * q + st.rho[idx] * sf
                self.finished[idx, a] = (q, device_s)
            q, device_s = self.finished[idx, a]
            device_s = device_s + st.decode_s[idx]
            latency = device_s if arm.k == 0 else st.up_s[idx] + (edge_done - arrival[idx]) + st.link_s[idx] + device_s
            reward = float(st.utility(idx, np.asarray(q), np.asarray(latency)))
            run.quality[idx], run.latency_s[idx], run.rewards[idx] = q, float(latency), reward
            heapq.heappush(pending, (arrival[idx] + latency, idx, contexts.pop(idx)))

        while i < n or not edge.idle:
            if edge.idle and i < n:
                clock = max(clock, arrival[i])
            while i < n and arrival[i] <= clock:
                while pending and pending[0][0] <= arrival[i]:
                    _, j, x = heapq.heappop(pending)
                    if learn is not None:
                        learn(run.arms[j], x, run.rewards[j])
                rem = [k_of[c.id] - c.step for c in edge.active]
                x = st.context(i, rem)
                a = int(decide(x))
                arm = st.arms[a]
                run.arms[i], contexts[i] = a, x
                plan = Plan.relay("large", "small", arm.k, steps, adapter=self.style[i],
                                  device_guidance=arm.device_guidance)
                req = Request(prompt=self.prompts[st.prompt_index[i]], steps=steps, guidance=self.guidance,
                              seed=self.cfg.seed * 1_000_003 + i)
                chain = new_chain(fam, req, plan)
                if arm.k > 0:
                    k_of[chain.id], req_of[chain.id] = arm.k, i
                    edge.submit(chain)
                else:
                    finish(i, chain, None)
                i += 1
            if not edge.idle:
                t0 = self.cfg.clock()
                edge.step()
                clock += self.cfg.clock() - t0
                for c in edge.drain():
                    finish(req_of.pop(c.id), c, clock)
        while pending:
            _, j, x = heapq.heappop(pending)
            if learn is not None:
                learn(run.arms[j], x, run.rewards[j])
        return run


def run_live(cfg: LiveConfig, say: Callable[[str], None] = print, report_dir: str | Path | None = None) -> dict[str, Any]:
    """Warm-start (or load) the bandit, serve the stream live with it and with every fixed arm."""
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    family = load_family(cfg.family, trace=True)
    judge = load_judge()
    guidance = table_guidance(cfg.scenario)
    with tempfile.TemporaryDirectory() as tmp:
        edge_profile = measured_edge_profile(family, "large", cfg.max_batch, guidance, Path(tmp), cfg.clock)
        edge_measured = load_profile(edge_profile)
        scenario = live_scenario(cfg, edge_profile)
        say(f"edge = this machine ({hardware()}): large-member step {edge_measured.member('large').at(1) * 1e3:.1f} ms "
            f"at batch 1, {edge_measured.member('large').at(cfg.max_batch) * 1e3:.1f} ms at {cfg.max_batch} (measured now, "
            f"{'CPU' if cfg.cpu_clock else 'wall'} time)")
        streams = live_streams(cfg, scenario)
        stream, prompts, scenes = streams.stream, streams.prompts, streams.scenes
        names = stream.arm_names
        if cfg.state:
            bandit = RelayBandit.from_pretrained(cfg.state)
            if bandit.arms != names:
                raise ValueError(f"bandit state {cfg.state}: arms {bandit.arms} do not match this stream's arms {names}")
            say(f"policy: {bandit.kind} loaded from {cfg.state} ({bandit.bandit.t} updates)")
        else:
            bandit = new_bandit(cfg, stream.arms)
            if streams.warm is not None:
                mean = train_in_simulator(bandit, streams.warm)
                say(f"policy: {bandit.kind} trained on {cfg.warm_requests} simulated requests of '{cfg.scenario}' "
                    f"(this machine's edge profile; mean reward {mean:.3f})")
        scale, here = _device_scale(family, stream, "small", guidance, cfg.clock)
        for adapter in sorted(family.adapters):  # each adapter's trace is made now, not in a timed segment
            for g in sorted({guidance, 1.0}):
                measure_step_latency(family, "small", [1], steps=1, guidance=g, adapter=adapter, warmup=0,
                                     clock=cfg.clock)
    say(f"device latency = measured small-member time here x (device profile step / {here * 1e3:.2f} ms measured "
        f"here{', re-measured after each device segment' if cfg.recalibrate else ''}): x{scale.min():.0f}.."
        f"x{scale.max():.0f} by device class at the start; plus the profile's decode time")
    live = LiveStream(cfg, family, judge, stream, prompts, scenes, scale, guidance)
    runs = [live.serve(f"bandit_{bandit.kind}", bandit.decide, bandit.update)]
    say(f"{runs[0].name}: mean utility {np.mean(runs[0].rewards):.4f}")
    saved = str(bandit.save_pretrained(cfg.save_state)) if cfg.save_state else None
    fixed_runs = [(a, name) for a, name in enumerate(names)] if cfg.compare_fixed else []
    for a, name in fixed_runs:
        if report_dir is not None:  # what is done so far survives an interrupted run
            _report(_summary(cfg, runs, names, scale, here, edge_measured, t_start, live.reference_steps), runs, names,
                        Path(report_dir))
        fixed = FixedArm(names, len(CONTEXT_FEATURES), arm=a)
        runs.append(live.serve(f"fixed_{name}", fixed.decide, None))
        say(f"{runs[-1].name}: mean utility {np.mean(runs[-1].rewards):.4f}")
    out = _summary(cfg, runs, names, scale, here, edge_measured, t_start, live.reference_steps)
    out["model_check"] = model_check(live)
    out["arms"] = {a.name: {"style_fidelity": a.style_fidelity, "style_source": a.style_source,
                            "adapter_factor": a.adapter_factor, "adapter_source": a.adapter_source,
                            "device_row_factor": a.device_row_factor, "row_source": a.row_source}
                   for a in stream.arms}
    out["saved_state"] = saved
    if report_dir is not None:
        out["report"] = _report(out, runs, names, Path(report_dir))
    return out


def model_check(live: LiveStream) -> dict[str, Any]:
    """Live against the simulator's model of the same (request, arm), per arm and for users with and
    without a style adapter: the median ratio of the measured device time (decode excluded) to the
    modelled one (the profile's steps times the arm's row and adapter factors), and the mean quality
    read by the judge minus the arm's expected quality. Where the two disagree, the table or the
    pricing misses something (the style curve without device guidance, the adapter's cost)."""
    st = live.stream
    rows: dict[str, dict[str, Any]] = {}
    for (i, a), (q, device_s) in sorted(live.finished.items()):
        key = "styled" if st.rho[i] > 0 else "plain"
        row = rows.setdefault(st.arm_names[a], {}).setdefault(key, {"ratio": [], "dq": []})
        model = st._device_s[i, a] - st.decode_s[i]
        if model > 0:
            row["ratio"].append(device_s / model)
        row["dq"].append(q - st.expected_q[i, a])
    return {name: {key: {"n": len(r["dq"]),
                         "device_time_over_model_median": float(np.median(r["ratio"])) if r["ratio"] else None,
                         "quality_minus_expected_mean": float(np.mean(r["dq"]))}
                   for key, r in sorted(by.items())}
            for name, by in rows.items()}


def _table_path(table: str) -> Path:
    return REFERENCE_TABLE if table == "auto" else Path(table)


def _spread(values: Sequence[float]) -> dict[str, Any] | None:
    if not values:
        return None
    v = np.asarray(values)
    return {"n": len(v), "median": float(np.median(v)), "p10": float(np.percentile(v, 10)),
            "p90": float(np.percentile(v, 90)), "min": float(v.min()), "max": float(v.max())}


def _summary(cfg: LiveConfig, runs: list[LiveRun], names: tuple[str, ...], scale: np.ndarray, here: float,
             edge_measured: Any, t_start: float, reference_steps: Sequence[float] = ()) -> dict[str, Any]:
    """The report's figures: per policy mean utility, quality, latency, arm counts, paired difference."""
    bandit = runs[0]
    policies = {}
    for r in runs:
        counts = np.bincount(r.arms, minlength=len(names))
        policies[r.name] = {"mean_utility": float(np.mean(r.rewards)), "mean_quality": float(np.mean(r.quality)),
                            "mean_latency_s": float(np.mean(r.latency_s)),
                            "arm_counts": {names[a]: int(c) for a, c in enumerate(counts)}}
    fixed = {k: v["mean_utility"] for k, v in policies.items() if k.startswith("fixed_")}
    complete = len(fixed) == len(names) or not cfg.compare_fixed
    verdict = bandit_vs_fixed({r.name: r.rewards for r in runs}, bandit.name, complete)
    for name, row in verdict.pop("by_arm").items():
        policies[name]["bandit_minus_this"] = row
    return {"config": asdict(cfg), "hardware": hardware(), "requests": cfg.requests,
            "clock": "this thread's CPU time" if cfg.cpu_clock else "wall time",
            "edge": {"profile": "measured on this machine at the start of the run",
                     "step_latency_s": dict(zip(map(str, edge_measured.member("large").batch_sizes),
                                                edge_measured.member("large").step_latency_s))},
            "device_scaling": {"this_machine_small_step_s": here,
                               "scale_by_request": {"min": float(scale.min()), "max": float(scale.max())},
                               "recalibrated": cfg.recalibrate,
                               "reference_steps_s": _spread(reference_steps),
                               "note": "device compute measured here x (device profile small step / this machine's"
                                       + (", re-measured after each device segment)" if cfg.recalibrate else
                                          ", measured at the start)")},
            "policies": policies,
            "complete": complete,
            **verdict,
            "wall_s": time.perf_counter() - t_start}


def bandit_vs_fixed(rewards: dict[str, Sequence[float]], bandit: str, complete: bool = True) -> dict[str, Any]:
    """The bandit against each fixed arm, paired over the same requests: the mean difference and its
    95% t-interval per arm (``by_arm``), the same against the best fixed arm, and the verdict. The
    bandit beats every fixed arm when each interval's lower bound is above 0 (a mean above each
    arm's, noise included, is reported beside it, not taken for a win)."""
    # lazy: scipy.stats is slow to import; only the paired interval needs it
    from scipy import stats

    ours = np.asarray(rewards[bandit], dtype=float)
    by_arm: dict[str, dict[str, Any]] = {}
    for name, r in rewards.items():
        if not name.startswith("fixed_"):
            continue
        diff = ours - np.asarray(r, dtype=float)
        if len(diff) < 2:
            by_arm[name] = {"mean": float(diff.mean()), "se": None, "ci95": None}
            continue
        se = float(diff.std(ddof=1) / np.sqrt(len(diff)))
        half = float(stats.t.ppf(0.975, len(diff) - 1)) * se
        by_arm[name] = {"mean": float(diff.mean()), "se": se,
                        "ci95": [float(diff.mean() - half), float(diff.mean() + half)]}
    vs_best = None
    if by_arm:
        best = max(by_arm, key=lambda n: float(np.mean(rewards[n])))
        vs_best = {"best_fixed": best, "bandit_minus_best_mean": by_arm[best]["mean"], "ci95": by_arm[best]["ci95"],
                   "note": "paired over the same requests; 95% t-interval of the per-request difference"}
    return {"by_arm": by_arm, "bandit_vs_best_fixed": vs_best,
            "bandit_mean_above_every_fixed_arm": bool(complete and by_arm
                                                      and all(v["mean"] > 0 for v in by_arm.values())),
            "bandit_beats_every_fixed_arm": bool(complete and by_arm and all(
                v["ci95"] is not None and v["ci95"][0] > 0 for v in by_arm.values()))}


def pool_reports(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several `bandit live` reports (other seeds: other streams, same protocol) as one paired sample:
    each policy's per-request rewards concatenated, then :func:`bandit_vs_fixed`. Every report must
    carry ``per_request`` and the same policies, and differ only in the seed."""
    if len(reports) < 1:
        raise ValueError("pool: need at least one bandit live report")
    first = reports[0]
    for i, rep in enumerate(reports):
        if "per_request" not in rep or "config" not in rep:
            raise ValueError(f"report {i}: not a bandit live report (no per_request/config)")
        if set(rep["per_request"]) != set(first["per_request"]):
            raise ValueError(f"report {i}: other policies than report 0's")
        other = {k: v for k, v in rep["config"].items() if k not in ("seed", "report", "save_state")}
        same = {k: v for k, v in first["config"].items() if k not in ("seed", "report", "save_state")}
        if other != same:
            raise ValueError(f"report {i}: another protocol than report 0's (" + ", ".join(
                sorted(k for k in set(other) | set(same) if other.get(k) != same.get(k))) + ")")
    seeds = [rep["config"].get("seed") for rep in reports]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"pool: the reports repeat a seed ({seeds}): the same stream counted twice")
    bandit = next(n for n in first["per_request"] if not n.startswith("fixed_"))
    rewards = {n: [x for rep in reports for x in rep["per_request"][n]["rewards"]] for n in first["per_request"]}
    complete = all(rep.get("complete", False) for rep in reports)
    return {"seeds": seeds, "requests": len(rewards[bandit]), "bandit": bandit,
            "mean_utility": {n: float(np.mean(v)) for n, v in rewards.items()},
            **bandit_vs_fixed(rewards, bandit, complete)}


def _report(out: dict[str, Any], runs: list[LiveRun], names: tuple[str, ...], folder: Path) -> list[str]:
    # lazy: matplotlib is slow to import; only the plots need it
    import matplotlib

    matplotlib.use("Agg")
    # lazy: matplotlib is slow to import; only the plots need it
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bandit_live.json").write_text(json.dumps(
        {**out, "per_request": {r.name: {"arms": r.arms, "rewards": r.rewards, "quality": r.quality,
                                         "latency_s": r.latency_s} for r in runs}}, indent=1) + "\n")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.0, 3.4), dpi=80)
    means = [np.mean(r.rewards) for r in runs]
    ax1.barh([r.name for r in runs], means, color=["C3"] + ["C0"] * (len(runs) - 1))
    ax1.set_xlabel("mean utility (live)")
    ax1.tick_params(labelsize=7)
    arms = np.asarray(runs[0].arms)
    ax2.scatter(np.arange(len(arms)), arms, s=8, c=np.asarray(runs[0].rewards), cmap="viridis")
    ax2.set_yticks(range(len(names)), names, fontsize=7)
    ax2.set_xlabel("request")
    ax2.set_title(f"{runs[0].name}: arm per request (colour: utility)", fontsize=8)
    fig.tight_layout()
    png = folder / "bandit_live.png"
    fig.savefig(png)
    plt.close(fig)
    return [str(folder / "bandit_live.json"), str(png)]


__all__ = ["UCB_POLICIES", "LiveConfig", "LiveRun", "LiveStream", "LiveStreams", "live_scenario", "live_streams",
           "measured_edge_profile", "model_check", "new_bandit", "run_live", "table_guidance", "train_in_simulator"]
