"""A stream of relay requests through one edge server: the environment of the relay bandit.

Requests arrive at the edge as a Poisson process (:class:`relaydiff.system.relay_scenario.RelayScenario`).
Each comes from a new user (device class, distance, Rayleigh fading, quality weight w_q, maybe a
style adapter with weight rho) with a prompt from a :class:`PromptPool` (1-3 objects). A policy
picks an arm (:mod:`relaydiff.system.relay_arms`): the edge runs the first k steps, the device the
rest.

The edge is a real queue: it runs batched steps of the large member like the engine's executor
(every call advances the oldest ``max_batch`` chains by one step; a call of b chains takes the
edge profile's measured step latency at batch b), so the load a request sees depends on what was
chosen before it. A chain that leaves the edge sends its latent down the user's link, then the
device runs the remaining steps (its profile's step latency, times the arm's row factor, times the
measured cost factor of the style adapter for a user who has one) and decodes.

Reward (the user's utility) = w_q * Q - (1 - w_q) * min(L / L_ref, latency_cap), in
[-latency_cap, 1]: Q = (1 - rho) * prompt fidelity + rho * style fidelity (rho = 0 without an
adapter), drawn from the arm's measured distribution for the prompt's complexity (a Beta with the
table's mean and spread; style: a Bernoulli with the measured style fidelity); L = the request's
latency; L_ref = the user's reference latency, the whole chain on their own device with guidance.
Random draws are made up front per request and shared by every policy (common random numbers), so
two policies on one seed differ only by their choices. Feedback arrives when a request finishes
(delayed, as it would live).

The context the policy sees (:data:`CONTEXT_FEATURES`) is what the edge can observe when the
request arrives: the prompt's features (computed from its text at the edge, passed in by the pool),
the preference, the device's speed, the measured link rate and the edge's load.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from relaydiff.system import channel
from relaydiff.system.profiles import load_profile
from relaydiff.system.relay_arms import COMPLEXITY_CLASSES, ArmSpec, RelayArm, load_relay_arms
from relaydiff.system.relay_scenario import RelayScenario

PROMPT_FEATURES = ("tokens", "pc1", "pc2", "pc3")  # from the prompt text: token count / 32, MiniLM PCA 1-3

# The context vector, in order. wq = quality weight, wl = 1 - wq, rho = style weight (0: no adapter);
# the latency-side features are divided by the user's reference latency L_ref so that a linear
# model per arm can express w_q * quality - w_l * latency / L_ref.
CONTEXT_FEATURES = (
    "bias",
    "wq", "wq*tokens", "wq*pc1", "wq*pc2", "wq*pc3",
    "wq*rho", "wq*rho*tokens",
    "wl",
    "wl*edge_chain_s/ref",  # T steps at the edge's current batch + 1, over L_ref
    "wl*edge_backlog_s/ref",  # queued edge steps at full batches, over L_ref
    "wl*link_s/ref",  # the handoff latent at the measured downlink rate, over L_ref
    "wl*decode_s/ref",  # the device's decode time (its profile), over L_ref
    "wl*styled",  # w_l if the user has a style adapter (its LoRA makes every device step cost more), else 0
    "edge_occupancy",  # chains in the edge's next batch / max_batch
    "device_log10_step_s",  # the device's speed: log10 of its measured step latency
    "link_log10_mbps",  # the measured downlink rate
)


class StreamError(ValueError):
    """A prompt pool or stream setting that cannot run."""


@dataclass(frozen=True)
class PromptPool:
    """Prompts as the edge sees them: features from the text, and (for the quality draw only) objects."""

    features: np.ndarray  # [N, len(PROMPT_FEATURES)]
    n_objects: np.ndarray  # [N] in 1..3: which measured quality row a prompt draws from; never a context

    def __post_init__(self) -> None:
        f, n = np.asarray(self.features, float), np.asarray(self.n_objects)
        if f.ndim != 2 or f.shape[1] != len(PROMPT_FEATURES) or not np.isfinite(f).all():
            raise StreamError(f"prompt pool: features must be finite, shape [N, {len(PROMPT_FEATURES)}], got {f.shape}")
        if n.shape != (f.shape[0],) or not np.isin(n, [1, 2, 3]).all():
            raise StreamError("prompt pool: n_objects must hold 1, 2 or 3 per prompt")
        for c in COMPLEXITY_CLASSES:
            if not (n == int(c)).any():
                raise StreamError(f"prompt pool: no prompt with {c} objects")


@dataclass
class StreamResult:
    """One policy's run over a stream (arrays indexed by request)."""

    arms: np.ndarray
    rewards: np.ndarray
    quality: np.ndarray
    latency_s: np.ndarray
    phase: np.ndarray  # index into the scenario's phases (0: base)
    phase_starts: tuple[int, ...]
    arm_names: tuple[str, ...]


Decide = Callable[[np.ndarray, Callable[[], np.ndarray]], int]  # (context, expected rewards on demand) -> arm
Learn = Callable[[int, np.ndarray, float], None]  # (arm, context, reward)


def relay_utility(wq: float, q: Any, latency_s: Any, ref_latency_s: float, latency_cap: float) -> Any:
    """The reward: w_q * quality - (1 - w_q) * min(latency / the user's reference latency, cap)."""
    return wq * q - (1.0 - wq) * np.minimum(latency_s / ref_latency_s, latency_cap)


def relay_context(prompt_features: np.ndarray, wq: float, rho: float, device_step_s: float, decode_s: float,
                  down_bps: float, link_s: float, rem: list[int], edge_step_s: np.ndarray, steps: int) -> np.ndarray:
    """The context vector (:data:`CONTEXT_FEATURES`) of one request: its prompt's features, the user's
    quality weight and style weight, the device's step and decode time, the downlink rate and the
    handoff's time on it, and the edge's queue (remaining steps per chain; ``edge_step_s[b - 1]``: a
    batched step of b chains, ``len(edge_step_s)``: the largest batch)."""
    f = prompt_features
    ref = steps * device_step_s + decode_s  # the whole chain on the user's own device
    wl = 1.0 - wq
    n, cap = len(rem), len(edge_step_s)
    chain_s = steps * edge_step_s[min(n + 1, cap) - 1]
    backlog_s = sum(rem) * edge_step_s[cap - 1] / cap
    return np.array([
        1.0, wq, wq * f[0], wq * f[1], wq * f[2], wq * f[3], wq * rho, wq * rho * f[0], wl,
        wl * chain_s / ref, wl * backlog_s / ref, wl * link_s / ref, wl * decode_s / ref, wl * float(rho > 0),
        min(n, cap) / cap,
        np.log10(device_step_s), np.log10(down_bps / 1e6),
    ])


class RelayStream:
    """The requests of one seed of a scenario, ready to be served by any policy (:meth:`run`)."""

    def __init__(self, scenario: RelayScenario, pool: PromptPool, seed: int = 0, arms: list[RelayArm] | None = None):
        self.scenario = sc = scenario
        if arms is None:
            specs = None if sc.arms is None else tuple(ArmSpec(k, g) for k, g in sc.arms)
            arms = load_relay_arms(specs, sc.quality_table) if specs else load_relay_arms(table=sc.quality_table)
        if any(a.steps != sc.steps for a in arms):
            raise StreamError(f"arms are priced for {arms[0].steps} steps, the scenario has {sc.steps}")
        self.arms = arms
        self.arm_names = tuple(a.name for a in arms)
        edge = load_profile(sc.edge.profile)
        self.max_batch = int(sc.edge.max_batch or edge.max_batch or 1)
        member = edge.member(sc.edge.member)
        self.edge_step_s = np.array([member.at(b) for b in range(1, self.max_batch + 1)])
        self._draw(pool, seed)

    def _draw(self, pool: PromptPool, seed: int) -> None:
        sc, rng, n = self.scenario, np.random.default_rng(seed), self.scenario.requests
        phases = [sc.phase_at(i) for i in range(n)]
        names = ["base"] + [p.name for p in sc.phases]
        self.phase = np.array([names.index(p["name"]) for p in phases])
        self.phase_starts = tuple(p.start for p in sc.phases)
        rate = np.array([p["arrival_rate_hz"] for p in phases])
        self.arrival_s = np.cumsum(rng.exponential(1.0, n) / rate)
        # prompt: a complexity class from the phase's mix, then a prompt of that class
        by_class = {c: np.flatnonzero(pool.n_objects == int(c)) for c in COMPLEXITY_CLASSES}
        u_class, u_prompt = rng.random(n), rng.random(n)
        prompt = np.empty(n, int)
        for i, p in enumerate(phases):
            w = np.array([p["complexity_mix"].get(c, 0.0) for c in COMPLEXITY_CLASSES])
            c = COMPLEXITY_CLASSES[int(np.searchsorted(np.cumsum(w / w.sum()), u_class[i], side="right").clip(0, 2))]
            prompt[i] = by_class[c][int(u_prompt[i] * len(by_class[c]))]
        self.prompt_index = prompt  # into the pool (a live run looks up the prompt's text)
        self.prompt_features = pool.features[prompt]
        self.complexity = pool.n_objects[prompt] - 1  # index into COMPLEXITY_CLASSES
        # user: device, preference, style
        dev_names = list(sc.devices)
        w = np.array([sc.devices[d] for d in dev_names], float)
        dev = rng.choice(len(dev_names), size=n, p=w / w.sum())
        profiles = [load_profile(d) for d in dev_names]
        for p in profiles:
            p.require("decode_s")
        dev_step = np.array([p.member(sc.device_member).at(1) for p in profiles])
        dev_decode = np.array([p.decode_s for p in profiles])
        self.device = dev
        self.device_step_s, self.decode_s = dev_step[dev], dev_decode[dev]
        self.ref_latency_s = sc.steps * self.device_step_s + self.decode_s
        u = sc.users
        self.wq = rng.uniform(*u.quality_weight, n)
        styled = rng.random(n) < u.styled_fraction
        self.rho = np.where(styled, rng.uniform(*u.style_weight, n), 0.0)
        # link: distance uniform in area over the annulus, Rayleigh fading, degradation per phase
        lk = sc.link
        d0, d1 = lk.distance_m
        dist = np.sqrt(rng.uniform(d0**2, d1**2, n))
        loss = np.array([p["extra_path_loss_db"] for p in phases])
        fade_dn, fade_up = channel.rayleigh_power(rng, n), channel.rayleigh_power(rng, n)
        att = 10.0 ** (-loss / 10.0)
        snr_dn = att * channel.snr_linear(dist, fade_dn, lk.bs_tx_power_dbm, lk.bandwidth_hz, lk.bs_noise_figure_db,
                                          lk.path_loss_1km_db, lk.path_loss_exponent)
        snr_up = att * channel.snr_linear(dist, fade_up, lk.ue_tx_power_dbm, lk.uplink_bandwidth_hz, lk.ue_noise_figure_db,
                                          lk.path_loss_1km_db, lk.path_loss_exponent)
        self.down_bps = np.maximum(lk.downlink_hz * channel.spectral_efficiency(snr_dn), 1.0)
        up_bps = np.maximum(lk.uplink_bandwidth_hz * channel.spectral_efficiency(snr_up), 1.0)
        self.link_s = 8.0 * sc.payload.latent_bytes / self.down_bps
        self.up_s = 8.0 * sc.payload.prompt_bytes / up_bps
        # quality draws: one uniform per request shared by the arms (a hard prompt is hard for all)
        u_q, u_s = rng.random(n), rng.random(n)
        mean = np.array([[a.fidelity[c] for a in self.arms] for c in self.complexity])  # [n, K]
        std = np.array([a.fidelity_std for a in self.arms])[None, :]
        var = np.minimum(std**2, 0.95 * mean * (1 - mean))
        conc = np.maximum(mean * (1 - mean) / np.maximum(var, 1e-12) - 1.0, 1e-3)
        self.prompt_q = stats.beta.ppf(u_q[:, None], mean * conc, (1 - mean) * conc)
        style_p = np.array([a.style_fidelity for a in self.arms])
        self.style_q = (u_s[:, None] < style_p[None, :]).astype(float)
        self.expected_q = (1 - self.rho[:, None]) * mean + self.rho[:, None] * style_p[None, :]
        self.quality = (1 - self.rho[:, None]) * self.prompt_q + self.rho[:, None] * self.style_q
        k = np.array([a.k for a in self.arms])
        self._arm_k = k
        # a styled user's device runs every step with their adapter: the arm's measured adapter factor
        adapter = np.where(self.rho[:, None] > 0, np.array([a.adapter_factor for a in self.arms])[None, :], 1.0)
        self._device_s = ((sc.steps - k)[None, :] * np.array([a.device_row_factor for a in self.arms])[None, :]
                          * adapter * self.device_step_s[:, None] + self.decode_s[:, None])  # [n, K]
        self._net_s = np.where(k[None, :] > 0, (self.up_s + self.link_s)[:, None], 0.0)

    # ---- the edge queue -----------------------------------------------------------------------

    def _finish_times(self, rem: list[int], clock: float, steps: int) -> np.ndarray:
        """When a chain that joins the edge now would finish each of its first ``steps`` steps, with
        no later arrival: ``times[j - 1]`` for j steps. Its own continuation does not change when
        its earlier steps end, so one pass prices every handoff step."""
        ahead = list(rem)  # the chains before it, oldest first
        out = np.empty(steps)
        t, step_s, cap = clock, self.edge_step_s, self.max_batch
        for j in range(steps):
            while len(ahead) >= cap:  # it waits: the oldest cap chains run
                t += step_s[cap - 1]
                ahead = [r - 1 if n < cap else r for n, r in enumerate(ahead)]
                ahead = [r for r in ahead if r > 0]
            t += step_s[len(ahead)]  # it runs with every chain ahead of it
            out[j] = t
            ahead = [r - 1 for r in ahead if r > 1]
        return out

    def context(self, i: int, rem: list[int]) -> np.ndarray:
        """The context vector of request ``i`` given the edge's queue (remaining steps per chain)."""
        return relay_context(self.prompt_features[i], self.wq[i], self.rho[i], self.device_step_s[i], self.decode_s[i],
                             self.down_bps[i], self.link_s[i], rem, self.edge_step_s, self.scenario.steps)

    def utility(self, i: int, q: Any, latency: Any) -> Any:
        """The user's utility for quality ``q`` and latency (scalars or one per arm)."""
        return relay_utility(self.wq[i], q, latency, self.ref_latency_s[i], self.scenario.latency_cap)

    def expected_rewards(self, i: int, rem: list[int], clock: float) -> np.ndarray:
        """Each arm's expected reward for request ``i`` joining the queue now (what the oracle knows)."""
        k = self._arm_k
        latency = self._device_s[i] + self._net_s[i]
        kmax = int(k.max())
        if kmax > 0:
            fin = self._finish_times(rem, clock, kmax)
            edge = np.where(k > 0, fin[np.maximum(k, 1) - 1] - self.arrival_s[i], 0.0)
            latency = latency + edge
        return self.utility(i, self.expected_q[i], latency)

    def run(self, decide: Decide, learn: Learn | None = None) -> StreamResult:
        """Serve every request with ``decide``; ``learn`` gets each reward when its request finishes."""
        n = self.scenario.requests
        arms, rewards = np.empty(n, int), np.empty(n)
        quality, latency = np.empty(n), np.empty(n)
        queue: list[list[int]] = []  # [remaining edge steps, request] per chain on the edge, oldest first
        pending: list[tuple[float, int, int, np.ndarray]] = []  # (finish time, request, arm, context)
        clock = 0.0
        step_s, cap = self.edge_step_s.tolist(), self.max_batch

        def leave_edge(i: int, t: float) -> None:
            a = arms[i]
            lat = self.up_s[i] + (t - self.arrival_s[i]) + self.link_s[i] + self._device_s[i, a]
            self._close(i, a, lat, arms, rewards, quality, latency, pending, contexts)

        def edge_call(t: float) -> float:
            """One batched call: the oldest ``cap`` chains advance a step; finished ones leave."""
            b = min(len(queue), cap)
            t += step_s[b - 1]
            done = 0
            for c in queue[:b]:
                c[0] -= 1
                if c[0] == 0:
                    leave_edge(c[1], t)
                    done += 1
            if done:
                queue[:] = [c for c in queue if c[0] > 0]
            return t

        contexts: dict[int, np.ndarray] = {}
        for i in range(n):
            t_arr = self.arrival_s[i]
            while queue and clock < t_arr:  # the edge works until this request arrives
                clock = edge_call(clock)
            clock = max(clock, t_arr)
            if learn is not None:
                while pending and pending[0][0] <= t_arr:
                    _, j, a, x = heapq.heappop(pending)
                    learn(a, x, float(rewards[j]))
            rem = [c[0] for c in queue]
            x = self.context(i, rem)
            a = int(decide(x, lambda i=i, rem=rem, clock=clock: self.expected_rewards(i, rem, clock)))
            if not 0 <= a < len(self.arms):
                raise StreamError(f"policy chose arm {a}; there are {len(self.arms)}")
            arms[i] = a
            contexts[i] = x
            if self._arm_k[a] > 0:
                queue.append([int(self._arm_k[a]), i])
            else:
                self._close(i, a, self._device_s[i, a], arms, rewards, quality, latency, pending, contexts)
        while queue:  # drain the edge
            clock = edge_call(clock)
        if learn is not None:
            while pending:
                _, j, a, x = heapq.heappop(pending)
                learn(a, x, float(rewards[j]))
        return StreamResult(arms=arms, rewards=rewards, quality=quality, latency_s=latency, phase=self.phase,
                            phase_starts=self.phase_starts, arm_names=self.arm_names)

    def _close(self, i, a, lat, arms, rewards, quality, latency, pending, contexts) -> None:
        q = float(self.quality[i, a])
        quality[i], latency[i] = q, lat
        rewards[i] = self.utility(i, q, lat)
        heapq.heappush(pending, (self.arrival_s[i] + lat, i, int(a), contexts.pop(i)))


__all__ = ["CONTEXT_FEATURES", "PROMPT_FEATURES", "PromptPool", "RelayStream", "StreamError", "StreamResult",
           "relay_context", "relay_utility"]
