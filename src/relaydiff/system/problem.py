"""The one-round offloading problem: instance, decision, and the single ``evaluate``.

One edge server, one round, N users, each with a T-step denoising chain. User i gets
k_i in {0} ∪ S (S = ``splits``): k_i = 0 runs the whole chain on the device (not admitted);
k_i = k > 0 runs k steps on the edge's large model, batched with the other admitted users, and
the remaining T - k steps on the user's personalized device model (k = T: the device only decodes).

Edge (continuous batching): step s runs n_s = #{j : k_j > s} chains and takes
t(n) = (alpha + beta n) / c seconds (c in (0, 1] the compute share of this round), so user i leaves
the edge after E_i = (alpha k_i + beta sum_j min(k_i, k_j)) / c. Capacity: n_0 <= M (memory).

Wireless: the handoff latent (D bytes) goes down at b_i B r_i bit/s (shares b_i, sum b_i <= 1);
the prompt goes up on the user's own uplink (fixed ``uplink_s``). The device always decodes, so no
image crosses the air, and the edge's compute is shared only through batching (no per-user shares).

Per-user latency, energy and quality (all-local: T d_i + decode_i, T e_i + decode_j_i):
    L_i = uplink_i + E_i + down_i + (T - k_i) d_i + decode_i
    En_i = (T - k_i) e_i + decode_j_i + p_tx uplink_i + p_rx down_i
    Q_i = quality[i, k_i]
Utility, with weights w (quality, latency, energy) summing to 1 and all-local references:
    u_i = wq_i Q_i + wl_i (1 - L_i / Lref_i) + we_i (1 - En_i / Eref_i)
This is U_i = wq Q - wl L/Lref - we En/Eref plus the per-user constant wl_i + we_i, so it has the
same argmax as the lead's utility but is positive at the all-local decision (u_i = wq_i Q_i(0)),
which makes "solver objective / exact optimum" ratios well defined. Objective = sum_i u_i. (A bad
decision, e.g. everyone on an overloaded edge, can still score below 0, so ratios can be < 0.)

Bandwidth: for a fixed k the downlink terms are sum_i c_i / b_i with
c_i = (8 D / (B r_i)) (wl_i / Lref_i + we_i p_rx_i / Eref_i); minimizing over sum b_i <= 1 gives
b_i = sqrt(c_i) / sum_j sqrt(c_j) and the value (sum_i sqrt(c_i))^2 (the convex half).

Decomposition used by every solver (see :meth:`RoundInstance.value_table`):
    objective(k) = sum_i V[i, k_i] - (beta / c) sum_s Lambda_s n_s - (sum_{i admitted} g_i)^2
with Lambda_s = sum_{i : k_i > s} lam_i, lam_i = wl_i / Lref_i, g_i = sqrt(c_i).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np

from relaydiff.system import channel
from relaydiff.system.bandwidth import allocate_bandwidth
from relaydiff.system.profiles import Profile, ProfileError, load_profile
from relaydiff.system.quality import QualityModel, load_quality
from relaydiff.system.scenario import Scenario, load_scenario

_PER_USER = (
    "spectral_eff",
    "uplink_s",
    "device_step_s",
    "device_step_j",
    "decode_s",
    "decode_j",
    "tx_power_w",
    "rx_power_w",
    "w_quality",
    "w_latency",
    "w_energy",
)


class InfeasibleDecision(ValueError):
    """A decision violates the instance's constraints (bad split, capacity, bandwidth)."""


@dataclass(frozen=True, eq=False)
class RoundInstance:
    """All numbers of one round. Per-user fields are float arrays of length N.

    Units: seconds, joules, watts, bytes, Hz; ``spectral_eff`` in bit/s/Hz; ``quality`` is an
    (N, steps + 1) table of Q_i(k) in [0, 1] for every k in 0..steps (only {0} ∪ splits are used).
    """

    steps: int
    splits: np.ndarray
    edge_alpha_s: float
    edge_beta_s: float
    capacity: float
    max_batch: int
    bandwidth_hz: float
    latent_bytes: float
    spectral_eff: np.ndarray
    uplink_s: np.ndarray
    device_step_s: np.ndarray
    device_step_j: np.ndarray
    decode_s: np.ndarray
    decode_j: np.ndarray
    tx_power_w: np.ndarray
    rx_power_w: np.ndarray
    quality: np.ndarray
    w_quality: np.ndarray
    w_latency: np.ndarray
    w_energy: np.ndarray
    device_class: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "splits", np.asarray(self.splits, dtype=np.int64))
        for name in _PER_USER:
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=float))
        object.__setattr__(self, "quality", np.asarray(self.quality, dtype=float))
        n = self.spectral_eff.shape[0]
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        s = self.splits
        if s.ndim != 1 or s.size == 0 or np.any(np.diff(s) <= 0) or s[0] < 1 or s[-1] > self.steps:
            raise ValueError(f"splits must be strictly increasing in 1..{self.steps}, got {s.tolist()}")
        for name in _PER_USER:
            arr = getattr(self, name)
            if arr.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
            if not np.all(np.isfinite(arr)) or np.any(arr < 0):
                raise ValueError(f"{name} must be finite and >= 0")
        if np.any(self.device_step_s <= 0) or np.any(self.spectral_eff <= 0):
            raise ValueError("device_step_s and spectral_eff must be > 0")
        if self.quality.shape != (n, self.steps + 1):
            raise ValueError(f"quality must have shape ({n}, {self.steps + 1}), got {self.quality.shape}")
        if not 0 < self.capacity <= 1:
            raise ValueError(f"capacity must be in (0, 1], got {self.capacity}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.edge_alpha_s < 0 or self.edge_beta_s < 0 or self.edge_alpha_s + self.edge_beta_s <= 0:
            raise ValueError("edge_alpha_s, edge_beta_s must be >= 0 and not both 0")
        if self.bandwidth_hz <= 0 or self.latent_bytes < 0:
            raise ValueError("bandwidth_hz must be > 0 and latent_bytes >= 0")
        w = self.w_quality + self.w_latency + self.w_energy
        if np.any(w <= 0):
            raise ValueError("each user needs a positive total preference weight")
        no_ref = (self.w_energy > 0) & (self.steps * self.device_step_j + self.decode_j <= 0)
        if np.any(no_ref):
            raise ValueError(f"w_energy: user {int(np.flatnonzero(no_ref)[0])} weighs energy but its all-local energy "
                             "(steps x device_step_j + decode_j) is 0, so the energy term is undefined")
        if self.device_class and len(self.device_class) != n:
            raise ValueError(f"device_class must have {n} entries")

    # ---- sizes and references -------------------------------------------------------------
    @property
    def n_users(self) -> int:
        return int(self.spectral_eff.shape[0])

    @cached_property
    def options(self) -> np.ndarray:
        """The allowed k values: 0 (local) then the splits, ascending."""
        return np.concatenate([[0], self.splits]).astype(np.int64)

    @cached_property
    def ref_latency_s(self) -> np.ndarray:
        """All-local latency T d_i + decode_i (normalizes the latency term)."""
        return self.steps * self.device_step_s + self.decode_s

    @cached_property
    def ref_energy_j(self) -> np.ndarray:
        """All-local energy T e_i + decode_j_i (normalizes the energy term)."""
        return np.maximum(self.steps * self.device_step_j + self.decode_j, 1e-12)

    # ---- the decomposition every solver uses ---------------------------------------------
    @cached_property
    def edge_weight(self) -> np.ndarray:
        """lam_i = wl_i / Lref_i: utility lost per second of latency."""
        return self.w_latency / self.ref_latency_s

    @cached_property
    def alpha_eff(self) -> float:
        return self.edge_alpha_s / self.capacity

    @cached_property
    def beta_eff(self) -> float:
        return self.edge_beta_s / self.capacity

    @cached_property
    def bw_cost(self) -> np.ndarray:
        """c_i: downlink utility cost is c_i / b_i (b_i the bandwidth share)."""
        t_full = 8.0 * self.latent_bytes / (self.bandwidth_hz * self.spectral_eff)
        return t_full * (self.edge_weight + self.w_energy * self.rx_power_w / self.ref_energy_j)

    @cached_property
    def bw_weight(self) -> np.ndarray:
        """g_i = sqrt(c_i): the bandwidth term of an admitted set A is (sum_A g_i)^2."""
        return np.sqrt(self.bw_cost)

    @cached_property
    def value_table(self) -> np.ndarray:
        """V[i, o]: every utility term of user i at option o that does not depend on others.

        Includes quality, device/uplink latency and energy, and the alpha part of the edge time;
        excludes the batch interaction (beta) and the downlink (bandwidth) terms.
        """
        k = self.options[None, :].astype(float)
        adm = (k > 0).astype(float)
        lat = adm * self.uplink_s[:, None] + (self.steps - k) * self.device_step_s[:, None] + self.decode_s[:, None]
        lat = lat + adm * self.alpha_eff * k
        en = (self.steps - k) * self.device_step_j[:, None] + self.decode_j[:, None]
        en = en + adm * (self.tx_power_w * self.uplink_s)[:, None]
        q = self.quality[:, self.options]
        return (
            self.w_quality[:, None] * q
            + self.w_latency[:, None] * (1.0 - lat / self.ref_latency_s[:, None])
            + self.w_energy[:, None] * (1.0 - en / self.ref_energy_j[:, None])
        )

    def option_index(self, k: np.ndarray) -> np.ndarray:
        """Index into ``options`` of each k (raises InfeasibleDecision on a k not allowed)."""
        k = np.asarray(k)
        idx = np.searchsorted(self.options, k)
        idx_c = np.minimum(idx, len(self.options) - 1)
        bad = self.options[idx_c] != k
        if np.any(bad):
            i = int(np.flatnonzero(bad)[0])
            raise InfeasibleDecision(f"user {i}: k={k[i]} is not in the allowed options {self.options.tolist()}")
        return idx_c

    # ---- serialization (JSON, no pickle) ---------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "steps": self.steps,
            "splits": self.splits.tolist(),
            "edge_alpha_s": self.edge_alpha_s,
            "edge_beta_s": self.edge_beta_s,
            "capacity": self.capacity,
            "max_batch": self.max_batch,
            "bandwidth_hz": self.bandwidth_hz,
            "latent_bytes": self.latent_bytes,
            "quality": self.quality.tolist(),
            "device_class": list(self.device_class),
            "meta": self.meta,
        }
        out.update({name: getattr(self, name).tolist() for name in _PER_USER})
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RoundInstance":
        data = dict(data)
        data["device_class"] = tuple(data.get("device_class", ()))
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "RoundInstance":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def subset(self, users: np.ndarray) -> "RoundInstance":
        """The same round restricted to some users (for tests and decomposition)."""
        users = np.asarray(users)
        kw = {name: getattr(self, name)[users] for name in _PER_USER}
        dc = tuple(self.device_class[i] for i in users) if self.device_class else ()
        return RoundInstance(
            steps=self.steps,
            splits=self.splits,
            edge_alpha_s=self.edge_alpha_s,
            edge_beta_s=self.edge_beta_s,
            capacity=self.capacity,
            max_batch=self.max_batch,
            bandwidth_hz=self.bandwidth_hz,
            latent_bytes=self.latent_bytes,
            quality=self.quality[users],
            device_class=dc,
            meta=dict(self.meta),
            **kw,
        )


@dataclass(frozen=True)
class Decision:
    """Split point per user (0 = local) and, optionally, downlink bandwidth shares.

    ``bandwidth`` None means the optimal closed-form shares for the admitted set.
    """

    k: np.ndarray
    bandwidth: np.ndarray | None = None

    @property
    def admitted(self) -> np.ndarray:
        return np.asarray(self.k) > 0


@dataclass(frozen=True)
class Breakdown:
    """Per-user results of one decision (arrays of length N) and the round totals."""

    k: np.ndarray
    admitted: np.ndarray
    utility: np.ndarray  # u_i; sums to the objective
    quality: np.ndarray
    latency_s: np.ndarray
    energy_j: np.ndarray
    edge_s: np.ndarray
    uplink_s: np.ndarray
    downlink_s: np.ndarray
    device_s: np.ndarray
    bandwidth: np.ndarray
    batch_per_step: np.ndarray  # n_s for s = 0..T-1
    objective: float

    def summary(self) -> dict[str, float]:
        """Round-level means for logs and plots."""
        return {
            "objective": float(self.objective),
            "admitted": int(self.admitted.sum()),
            "utility_mean": float(self.utility.mean()),
            "quality_mean": float(self.quality.mean()),
            "latency_mean_s": float(self.latency_s.mean()),
            "latency_max_s": float(self.latency_s.max()),
            "energy_mean_j": float(self.energy_j.mean()),
            "max_batch_used": int(self.batch_per_step.max(initial=0)),
        }


@dataclass(frozen=True)
class Solution:
    """What every solver returns: the decision, its objective, and the decision time."""

    solver: str
    decision: Decision
    objective: float
    wall_s: float
    status: str = "ok"
    info: dict[str, Any] = field(default_factory=dict)


def optimal_bandwidth(instance: RoundInstance, admitted: np.ndarray) -> np.ndarray:
    """Closed-form shares b_i = g_i / sum_A g_j for the admitted users (0 elsewhere).

    Minimizes sum_A c_i / b_i subject to sum b_i <= 1 (see :mod:`relaydiff.system.bandwidth`).
    """
    return allocate_bandwidth(instance.bw_cost, admitted)


def batch_sizes(instance: RoundInstance, k: np.ndarray) -> np.ndarray:
    """n_s = #{j : k_j > s} for s = 0..T-1 (O(N + T))."""
    counts = np.bincount(np.asarray(k, dtype=np.int64), minlength=instance.steps + 1)
    return k.shape[0] - np.cumsum(counts)[: instance.steps]


def edge_times(instance: RoundInstance, k: np.ndarray, n_s: np.ndarray | None = None) -> np.ndarray:
    """E_i = (alpha k_i + beta sum_{s < k_i} n_s) / c (0 for local users)."""
    k = np.asarray(k, dtype=np.int64)
    n_s = batch_sizes(instance, k) if n_s is None else n_s
    cum = np.concatenate([[0.0], np.cumsum(n_s, dtype=float)])
    return instance.alpha_eff * k + instance.beta_eff * cum[k]


def objective_value(instance: RoundInstance, k: np.ndarray) -> float:
    """The objective of k with optimal bandwidth, from the decomposition (no breakdown, O(N + T))."""
    k = np.asarray(k, dtype=np.int64)
    idx = instance.option_index(k)
    adm = k > 0
    if adm.sum() > instance.max_batch:
        return -np.inf
    n_s = batch_sizes(instance, k)
    lam_cum = np.bincount(k, weights=instance.edge_weight, minlength=instance.steps + 1)
    big_lambda = lam_cum.sum() - np.cumsum(lam_cum)[: instance.steps]  # sum of lam over k_i > s
    v = instance.value_table[np.arange(k.shape[0]), idx].sum()
    return float(v - instance.beta_eff * float(big_lambda @ n_s) - instance.bw_weight[adm].sum() ** 2)


def _weighted(weight: np.ndarray, term: np.ndarray) -> np.ndarray:
    """weight x term with 0 x inf = 0: a term its user does not weigh costs nothing."""
    with np.errstate(invalid="ignore"):
        return np.where(weight > 0, weight * term, 0.0)


def evaluate(instance: RoundInstance, decision: Decision | np.ndarray) -> tuple[float, Breakdown]:
    """Objective (sum of u_i) and per-user breakdown of a decision; raises InfeasibleDecision."""
    if not isinstance(decision, Decision):
        decision = Decision(np.asarray(decision))
    k = np.asarray(decision.k)
    if k.shape != (instance.n_users,):
        raise InfeasibleDecision(f"decision.k must have shape ({instance.n_users},), got {k.shape}")
    if not np.issubdtype(k.dtype, np.integer):
        if not np.all(np.equal(np.mod(k, 1), 0)):
            raise InfeasibleDecision("decision.k must hold integers")
        k = k.astype(np.int64)
    idx = instance.option_index(k)
    adm = k > 0
    if adm.sum() > instance.max_batch:
        raise InfeasibleDecision(f"{int(adm.sum())} users admitted but the edge holds at most {instance.max_batch}")
    if decision.bandwidth is None:
        b = optimal_bandwidth(instance, adm)
    else:
        b = np.asarray(decision.bandwidth, dtype=float)
        if b.shape != (instance.n_users,) or np.any(b < 0) or not np.all(np.isfinite(b)):
            raise InfeasibleDecision(f"bandwidth must be {instance.n_users} finite shares >= 0")
        if b.sum() > 1.0 + 1e-9:
            raise InfeasibleDecision(f"bandwidth shares sum to {b.sum():.6g} > 1")
        if np.any(adm & (b <= 0) & (instance.latent_bytes > 0)):
            raise InfeasibleDecision("every admitted user needs a positive bandwidth share")
    n_s = batch_sizes(instance, k)
    edge = np.where(adm, edge_times(instance, k, n_s), 0.0)
    down = np.where(adm, channel.transfer_time_s(instance.latent_bytes, np.where(adm, b, 1.0), instance.bandwidth_hz, instance.spectral_eff), 0.0)
    up = np.where(adm, instance.uplink_s, 0.0)
    dev = (instance.steps - k) * instance.device_step_s + instance.decode_s
    lat = up + edge + down + dev
    # A user who weighs neither latency nor downlink energy gets no downlink share (it costs it
    # nothing), so its latency is inf: a term whose weight is 0 contributes 0, never 0 x inf = NaN.
    en = (instance.steps - k) * instance.device_step_j + instance.decode_j + instance.tx_power_w * up + _weighted(instance.rx_power_w, down)
    q = instance.quality[np.arange(instance.n_users), k]
    u = (
        instance.w_quality * q
        + _weighted(instance.w_latency, 1.0 - lat / instance.ref_latency_s)
        + _weighted(instance.w_energy, 1.0 - en / instance.ref_energy_j)
    )
    obj = float(u.sum())
    return obj, Breakdown(
        k=k, admitted=adm, utility=u, quality=q, latency_s=lat, energy_j=en, edge_s=edge, uplink_s=up,
        downlink_s=down, device_s=dev, bandwidth=b, batch_per_step=n_s, objective=obj,
    )


def timed(name: str, fn: Callable[[RoundInstance], tuple[np.ndarray, dict[str, Any]]], instance: RoundInstance) -> Solution:
    """Run a solver body ``fn(instance) -> (k, info)``, time it, and score k with ``evaluate``."""
    t0 = time.perf_counter()
    k, info = fn(instance)
    wall = time.perf_counter() - t0
    obj, _ = evaluate(instance, Decision(np.asarray(k, dtype=np.int64)))
    status = str(info.pop("status", "ok"))
    return Solution(name, Decision(np.asarray(k, dtype=np.int64)), obj, wall, status, info)


# ---- sampling -------------------------------------------------------------------------------
def device_numbers(profile: Profile, member: str) -> tuple[float, float, float, float, float, float]:
    """A device's (step s, step J, decode s, decode J, tx W, rx W) for ``member`` from its profile."""
    profile.require("decode_s", "decode_j", "step_power_w", "tx_power_w", "rx_power_w")
    step_s = profile.member(member).at(1)
    return step_s, step_s * profile.step_power_w, profile.decode_s, profile.decode_j, profile.tx_power_w, profile.rx_power_w  # type: ignore[operator,return-value]


def sample_instance(
    scenario: Scenario,
    n_users: int | None = None,
    seed: int | np.random.Generator = 0,
    capacity: float | None = None,
    quality_model: QualityModel | None = None,
) -> RoundInstance:
    """Draw one round from a scenario, deterministically from ``seed``.

    Users get a device class (the scenario's mix), a distance (uniform in area), Rayleigh fading
    on both links, preference weights (Dirichlet), personalization and prompt complexity; the edge
    gets a compute share c (uniform on ``edge.capacity`` unless ``capacity`` is given). The
    scenario is resolved once by the caller (:func:`relaydiff.system.scenario.load_scenario`).
    """
    if not isinstance(scenario, Scenario):
        raise TypeError(f"sample_instance takes a Scenario (load_scenario(name) first), got {type(scenario).__name__}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    n = scenario.n_users if n_users is None else int(n_users)
    if n < 1:
        raise ValueError(f"n_users must be >= 1, got {n}")
    edge = load_profile(scenario.edge.profile)
    if edge.kind != "edge":
        raise ProfileError(f"edge.profile {scenario.edge.profile!r} is a {edge.kind} profile")
    alpha, beta = edge.member(scenario.edge.member).fit_linear()
    max_batch = scenario.edge.max_batch or edge.max_batch
    if max_batch is None:
        raise ProfileError(f"edge profile {edge.name!r} has no max_batch and the scenario sets none")

    classes = list(scenario.devices)
    probs = np.array([scenario.devices[c] for c in classes], dtype=float)
    dev_numbers = {}
    for c in classes:
        prof = load_profile(c)
        if prof.kind != "device":
            raise ProfileError(f"devices.{c} is a {prof.kind} profile, expected a device profile")
        dev_numbers[c] = device_numbers(prof, scenario.device_member)
    cls_idx = rng.choice(len(classes), size=n, p=probs / probs.sum())
    table = np.array([dev_numbers[c] for c in classes])[cls_idx]

    w = scenario.wireless
    d_lo, d_hi = w.distance_m
    dist = np.sqrt(rng.uniform(d_lo**2, d_hi**2, size=n))
    snr_dl = channel.snr_linear(dist, channel.rayleigh_power(rng, n), w.bs_tx_power_dbm, w.bandwidth_hz,
                                w.bs_noise_figure_db, w.path_loss_1km_db, w.path_loss_exponent)
    snr_ul = channel.snr_linear(dist, channel.rayleigh_power(rng, n), w.ue_tx_power_dbm, w.uplink_bandwidth_hz,
                                w.ue_noise_figure_db, w.path_loss_1km_db, w.path_loss_exponent)
    # Floor at 0.01 bit/s/Hz: a deep fade makes offloading very costly but keeps numbers finite.
    r_dl = np.maximum(channel.spectral_efficiency(snr_dl), 1e-2)
    r_ul = np.maximum(channel.spectral_efficiency(snr_ul), 1e-2)
    uplink = 8.0 * scenario.payload.prompt_bytes / (w.uplink_bandwidth_hz * r_ul)

    p = scenario.preferences
    weights = rng.dirichlet(p.concentration, size=n)
    rho = rng.uniform(*p.personalization, size=n)
    cx = rng.uniform(*p.complexity, size=n)
    qm = quality_model or load_quality(scenario.quality.table)
    c = float(rng.uniform(*scenario.edge.capacity)) if capacity is None else float(capacity)

    return RoundInstance(
        steps=scenario.steps,
        splits=np.asarray(scenario.splits),
        edge_alpha_s=alpha,
        edge_beta_s=beta,
        capacity=c,
        max_batch=int(max_batch),
        bandwidth_hz=w.bandwidth_hz,
        latent_bytes=scenario.payload.latent_bytes,
        spectral_eff=r_dl,
        uplink_s=uplink,
        device_step_s=table[:, 0],
        device_step_j=table[:, 1],
        decode_s=table[:, 2],
        decode_j=table[:, 3],
        tx_power_w=table[:, 4],
        rx_power_w=table[:, 5],
        quality=qm.table(scenario.steps, cx, rho),
        w_quality=weights[:, 0],
        w_latency=weights[:, 1],
        w_energy=weights[:, 2],
        device_class=tuple(classes[i] for i in cls_idx),
        meta={"scenario": scenario.name, "distance_m": dist.tolist(), "complexity": cx.tolist(),
              "personalization": rho.tolist(), "quality_source": qm.source},
    )
