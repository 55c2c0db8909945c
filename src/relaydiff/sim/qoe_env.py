"""RLLI's round as a Gymnasium env: shared denoising for similar prompts, QoE agents as the reward.

Each episode is one round (a fresh draw; one step). The default scenario is ``congested`` (a
narrow 2 MHz downlink carrying SDXL-size handoff latents, an H100 edge with 20-60% of its compute
free): in the ``default`` cell the downlink is so wide that bandwidth shares barely matter. K users (``k_min``..``k_max``) each bring a
prompt from the prompt pool, Big-Five traits (uniform in [0, 1]^5), a device and a Rayleigh-faded
link, drawn by :func:`relaydiff.system.problem.sample_instance` from the scenario's profiles. The
round's distinct prompts are grouped by similarity, each user in its prompt's group
(:func:`relaydiff.system.grouping.group_prompts`). The action,
a Box in [-1, 1]^(2 k_max) (user slots beyond K are ignored), sets per slot:

- ``a[0:k]``   downlink bandwidth shares b = softmax(3 a) over the K users;
- ``a[k:2k]``  edge compute shares f = softmax(3 a);

and each group's shared steps s are then decided by the edge with ``shared_steps_rule``:
``"exact"`` (the default) for those shares (:meth:`QoEEnv.best_shared_steps`: the per-group
optimum of the edge's surrogate QoE model, tried over s = 0..cap at once), or ``"cap"``, the
service's own rule (``serve/rounds.py``): every group shares its cap, whatever the shares (the
exact choice maximizes the agents' QoE and ignores the edge's energy; the cap spends a little of that QoE
on U-Net evaluations, docs/qoe.md). The cap is the service's rule
(:func:`relaydiff.system.grouping.shared_steps_caps`): the largest s that keeps the group's least
similar follower at >= ``share_retention`` (0.95) of its prompt fidelity on the measured curves;
``share_retention=None`` lets s run to T on the curves alone (before the live round showed the
curves overrate sharing there, docs/qoe.md). With ``learned_shared_steps=True`` the Box is [-1, 1]^(3 k_max) and the
policy sets s too (the decoding before issue 15's second attempt):

- ``a[2k:3k]`` shared steps: a group's s = round(T mean_{i in g} (a_i + 1) / 2) (singletons 0),
  at most the cap.

Why exact is the default (measured, docs/qoe.md): trained with learned s, the actors' step choices
saved 24.7% of U-Net evaluations; the exact choice for the very same shares saved 42.3% at +5% QoE,
and an actor that only allocates has a third fewer action dimensions to learn.

System model (all on the edge's large model, as the shared-prefix curves were measured; the
device decodes): the edge's chain-step time at the round's batch is tau = t(B) / B (the edge
profile's batched step latency, B = min(K, max_batch)), its throughput c / tau at compute share c.
A group's prefix runs once with the members' pooled share, then each of its distinct prompts
continues once, on the pooled share of the users who sent it, and all of them receive that image
(:func:`relaydiff.system.grouping.chain_owners`: the same prompt continued from the same latent is
the same chain): E_i = s_g tau / (c F_g) + (T - s_g) tau / (c F_p(i)), F_g = sum of the group's f,
F_p(i) = sum of f over the users of i's prompt in the group (a fluid processor-sharing model;
shares of finished users are not redistributed). The edge runs sum_g s_g + P_g (T - s_g)
chain-steps, P_g the group's distinct prompts; with ``allow_sharing=False`` every user runs its
own T steps. Then the handoff latent
goes down at b_i B r_i, and the device decodes. Latency L_i = uplink_i + E_i + down_i + decode_i;
battery J_i = p_tx uplink_i + p_rx down_i + decode_j_i; edge energy = ``edge_power_w`` tau
(chain-steps run). Prompt fidelity: the family's full-large fidelity (the quality table), times a
follower's retention after s shared steps at its similarity to the leader (the measured
shared-prefix curves; 1 for a follower whose prompt is its leader's: it is conditioned on the same
prompt throughout). The reward is the sum of the agents' scores (1-10 each).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from safetensors.numpy import load_file

from relaydiff.sim.agents import Perception, QoEAgent, SurrogateAgent
from relaydiff.system.bandwidth import inverse_cost_shares
from relaydiff.system.grouping import (chain_owners, GROUP_THRESHOLD, group_prompts, Groups, load_sharing_cost,
                                       same_prompt_followers, SHARE_MAX_GROUP, SHARE_RETENTION, shared_steps_caps,
                                       SharingCost)
from relaydiff.system.problem import sample_instance
from relaydiff.system.profiles import load_profile
from relaydiff.system.quality import load_quality
from relaydiff.system.scenario import load_scenario, Scenario

PROMPT_POOL = Path(__file__).resolve().parent.parent / "assets" / "qoe" / "prompt_pool.json"
SHARE_SCALE = 3.0  # softmax temperature of the share actions: shares span e^6 ~ 400x
# The edge's power while it runs chain-steps: the board power (TDP) of the shipped edge profiles'
# GPUs, an upper bound (the profiles carry no power measurement). NVIDIA A100 datasheet: SXM4 400 W;
# NVIDIA H100 datasheet: PCIe 350 W (the h100-sd15 profile is an H100 PCIe).
EDGE_POWER_W = {"a100-sd15": 400.0, "h100-sd15": 350.0}
N_FEATURES = 12  # per user slot; see QoEEnv._observe
HEURISTICS = ("equal", "proportional", "sqrt")
SHARED_STEPS_RULES = ("exact", "cap")  # how the edge picks each group's shared steps (QoEEnv.edge_shared_steps)
SATURATED = 0.99  # |a| above this counts as at the box's edge (info["action_saturation"])
# a round's users and how many topics they draw their prompts from (QoEEnv's defaults; bench quality
# draws its shared-prefix followers' rounds the same way)
K_MIN, K_MAX = 5, 20
TOPICS_PER_USER = 0.35


class PromptPoolError(ValueError):
    """The prompt pool files are missing or malformed."""


@dataclass(frozen=True)
class PromptPool:
    """Prompts in topic clusters with unit embeddings (built by ``relaydiff.bench.qoe_pool``)."""

    prompts: tuple[str, ...]
    topics: np.ndarray
    embeddings: np.ndarray

    @classmethod
    def load(cls, path: str | Path = PROMPT_POOL) -> "PromptPool":
        path = Path(path)
        try:
            meta = json.loads(path.read_text())
            emb = load_file(str(path.with_suffix(".safetensors")))["embeddings"].astype(np.float64)
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise PromptPoolError(f"prompt pool {path}: cannot read ({exc})") from None
        if len(meta.get("prompts", ())) != emb.shape[0] or len(meta.get("topics", ())) != emb.shape[0]:
            raise PromptPoolError(f"prompt pool {path}: prompts, topics and embeddings differ in length")
        return cls(tuple(meta["prompts"]), np.asarray(meta["topics"], dtype=int), emb)

    def draw(self, rng: np.random.Generator, k: int, topics_per_user: float = TOPICS_PER_USER) -> np.ndarray:
        """[k] indices of a round's prompts: round(topics_per_user k) topics (at least one) drawn
        without replacement, then each user a topic of those and one of its prompts, uniformly."""
        n_topics = max(1, int(round(topics_per_user * k)))
        all_topics = np.unique(self.topics)
        chosen = rng.choice(all_topics, size=min(n_topics, all_topics.size), replace=False)
        return np.array([rng.choice(np.flatnonzero(self.topics == rng.choice(chosen))) for _ in range(k)])


@dataclass
class Round:
    """Everything drawn for one round (the env's hidden state)."""

    prompts: list[str]
    embeddings: np.ndarray
    traits: np.ndarray
    groups: Groups
    capacity: float
    spectral_eff: np.ndarray
    uplink_s: np.ndarray
    decode_s: np.ndarray
    decode_j: np.ndarray
    tx_power_w: np.ndarray
    rx_power_w: np.ndarray
    base_fidelity: np.ndarray
    tau_s: float
    same_prompt: np.ndarray  # [K] a follower whose prompt is its leader's (keeps its fidelity at any s)
    caps: np.ndarray  # [G] the most steps each group may share (shared_steps_caps)
    # [K] the user whose continuation each user receives (chain_owners: a prompt runs once per
    # group; with sharing off every user runs its own chain)
    owner: np.ndarray

    @property
    def k(self) -> int:
        return len(self.prompts)


@dataclass
class Outcome:
    """What one decision did to one round."""

    scores: np.ndarray
    fidelity: np.ndarray
    latency_s: np.ndarray
    battery_j: np.ndarray
    shared_steps: np.ndarray  # per group
    unet_chain_steps: int
    unet_chain_steps_unshared: int
    edge_energy_j: float

    def summary(self) -> dict[str, float]:
        return {"qoe": float(self.scores.sum()), "qoe_mean": float(self.scores.mean()),
                "latency_s": float(self.latency_s.mean()), "fidelity": float(self.fidelity.mean()),
                "battery_j": float(self.battery_j.sum()), "edge_energy_j": self.edge_energy_j,
                "energy_j": self.edge_energy_j + float(self.battery_j.sum()),
                "unet_evals_saved": 1.0 - self.unet_chain_steps / self.unet_chain_steps_unshared}


def check_shared_steps_rule(rule: str, learned_shared_steps: bool) -> str:
    """``rule`` if the env can take it with that decoding (ValueError with the reason otherwise)."""
    if rule not in SHARED_STEPS_RULES:
        raise ValueError(f"unknown shared_steps_rule {rule!r} ({', '.join(SHARED_STEPS_RULES)})")
    if learned_shared_steps and rule != "exact":
        raise ValueError("learned_shared_steps: the policy sets the shared steps, so no shared_steps_rule applies")
    return rule


def softmax_shares(a: np.ndarray) -> np.ndarray:
    z = SHARE_SCALE * np.clip(np.asarray(a, dtype=float), -1.0, 1.0)
    z = np.exp(z - z.max())
    return z / z.sum()


def share_action(shares: np.ndarray) -> np.ndarray:
    """The action entries whose softmax gives ``shares`` (clipped where a ratio exceeds e^6)."""
    s = np.maximum(np.asarray(shares, dtype=float), 1e-300)
    return np.clip(1.0 + np.log(s / s.max()) / SHARE_SCALE, -1.0, 1.0)


class QoEEnv(gym.Env):
    """One round per episode; reward = sum of the agents' QoE scores (see the module docstring)."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, k_min: int = K_MIN, k_max: int = K_MAX, scenario: str | Scenario = "congested",
                 agent: QoEAgent | None = None, pool: PromptPool | None = None,
                 sharing_cost: SharingCost | None = None, topics_per_user: float = TOPICS_PER_USER,
                 group_threshold: float = GROUP_THRESHOLD, max_group: int = SHARE_MAX_GROUP, allow_sharing: bool = True,
                 edge_power_w: float | None = None, learned_shared_steps: bool = False,
                 share_retention: float | None = SHARE_RETENTION, shared_steps_rule: str = "exact") -> None:
        if not 1 <= k_min <= k_max:
            raise ValueError(f"need 1 <= k_min <= k_max, got {k_min}, {k_max}")
        self.k_min, self.k_max = int(k_min), int(k_max)
        self.scenario = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
        self.agent = agent or SurrogateAgent()
        self.pool = pool or PromptPool.load()
        self.sharing_cost = sharing_cost or load_sharing_cost()
        self.topics_per_user, self.group_threshold, self.max_group = topics_per_user, group_threshold, max_group
        self.allow_sharing = allow_sharing
        if share_retention is not None and not 0.0 < share_retention <= 1.0:
            raise ValueError(f"share_retention must be in (0, 1] or None, got {share_retention}")
        self.share_retention = share_retention
        self.learned_shared_steps = bool(learned_shared_steps)
        self.shared_steps_rule = check_shared_steps_rule(shared_steps_rule, self.learned_shared_steps)
        # the edge's own QoE model for the exact step choice: the reward's agent when it is the
        # surrogate, else a default surrogate (an LLM agent is asked once per round, not T + 1 times)
        self.planner = self.agent if isinstance(self.agent, SurrogateAgent) else SurrogateAgent()
        self._weights: dict[str, np.ndarray] = {}
        if edge_power_w is None and self.scenario.edge.profile not in EDGE_POWER_W:
            raise ValueError(f"no board power known for edge profile {self.scenario.edge.profile!r}: pass edge_power_w")
        self.edge_power_w = float(edge_power_w or EDGE_POWER_W[self.scenario.edge.profile])
        self.steps = self.scenario.steps
        edge = load_profile(self.scenario.edge.profile)
        self._edge_member = edge.member(self.scenario.edge.member)
        self._max_batch = self.scenario.edge.max_batch or edge.max_batch or self.k_max
        self._quality = load_quality(self.scenario.quality.table)
        self._full_fidelity = float(self._quality.large_fidelity)
        self.observation_space = gym.spaces.Box(-10.0, 10.0, shape=(self.k_max * N_FEATURES + 2,), dtype=np.float32)
        self.blocks = 3 if self.learned_shared_steps else 2  # action blocks of k_max entries
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(self.blocks * self.k_max,), dtype=np.float32)
        self.round: Round | None = None

    # ---- drawing a round ------------------------------------------------------------------
    def draw_round(self, rng: np.random.Generator) -> Round:
        """K users: prompts from a few topics of the pool, traits, devices and links."""
        k = int(rng.integers(self.k_min, self.k_max + 1))
        idx = self.pool.draw(rng, k, self.topics_per_user)
        emb = self.pool.embeddings[idx]
        inst = sample_instance(self.scenario, n_users=k, seed=rng, quality_model=self._quality)
        batch = min(k, self._max_batch)
        prompts = [self.pool.prompts[i] for i in idx]
        groups = group_prompts(emb, self.group_threshold, self.max_group, prompts)
        same = same_prompt_followers(groups, prompts)
        caps = shared_steps_caps(groups, self.sharing_cost, self.steps, self.share_retention, same)
        owner = chain_owners(groups, prompts) if self.allow_sharing else np.arange(k)
        return Round(
            prompts=prompts, embeddings=emb, traits=rng.uniform(0.0, 1.0, (k, 5)),
            groups=groups, capacity=inst.capacity,
            spectral_eff=inst.spectral_eff, uplink_s=inst.uplink_s, decode_s=inst.decode_s, decode_j=inst.decode_j,
            tx_power_w=inst.tx_power_w, rx_power_w=inst.rx_power_w,
            base_fidelity=np.full(k, self._full_fidelity), tau_s=self._edge_member.at(batch) / batch,
            same_prompt=same, caps=caps if self.allow_sharing else np.zeros_like(caps), owner=owner)

    def _observe(self) -> np.ndarray:
        r = self.round
        assert r is not None
        g = r.groups
        sizes = g.sizes()[g.label]
        is_leader = np.zeros(r.k)
        is_leader[g.leader] = 1.0
        feats = np.column_stack([
            np.ones(r.k),  # slot in use
            np.log2(r.spectral_eff) / 4.0,  # link quality
            r.decode_s,  # device speed (seconds per decode)
            r.traits,  # O, C, E, A, N
            (sizes - 1) / max(self.max_group - 1, 1),  # group size
            (r.groups.similarity - 0.75) * 4.0,  # similarity to the group's leader
            is_leader,
            r.uplink_s * 10.0,
        ])
        obs = np.zeros((self.k_max, N_FEATURES))
        obs[: r.k] = feats
        return np.clip(np.concatenate([obs.ravel(), [r.capacity, r.k / self.k_max]]), -10, 10).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.round = self.draw_round(self.np_random)
        self._weights = {}
        return self._observe(), {"k": self.round.k, "groups": self.round.groups.n_groups}

    # ---- the system model -----------------------------------------------------------------
    def decode_action(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bandwidth shares [K], compute shares [K], shared steps per group [G])."""
        r = self.round
        assert r is not None
        a = np.asarray(action, dtype=float).reshape(self.blocks, self.k_max)[:, : r.k]
        bandwidth, compute = softmax_shares(a[0]), softmax_shares(a[1])
        if not self.learned_shared_steps:
            return bandwidth, compute, self.edge_shared_steps(bandwidth, compute)
        frac = (np.clip(a[2], -1, 1) + 1.0) / 2.0
        g = r.groups
        s = np.array([round(self.steps * frac[g.members(j)].mean()) for j in range(g.n_groups)], dtype=int)
        return bandwidth, compute, np.minimum(s, r.caps)  # singletons and no sharing: caps 0

    def _user_terms(self, bandwidth: np.ndarray, compute: np.ndarray,
                    s_user: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fidelity, latency, battery) per user for each user's shared steps ``s_user`` ([K], or
        [N, K] for N choices at once: the shares' terms broadcast)."""
        r = self.round
        assert r is not None
        g, t_steps, sc = r.groups, self.steps, self.scenario
        pooled = np.bincount(g.label, weights=compute, minlength=g.n_groups)[g.label]
        own = np.bincount(r.owner, weights=compute, minlength=r.k)[r.owner]  # a prompt's chain: its senders' shares
        rate = r.tau_s / r.capacity
        edge_s = s_user * rate / pooled + (t_steps - s_user) * rate / own
        down_s = 8.0 * sc.payload.latent_bytes / (bandwidth * sc.wireless.bandwidth_hz * r.spectral_eff)
        latency = r.uplink_s + edge_s + down_s + r.decode_s
        battery = r.tx_power_w * r.uplink_s + r.rx_power_w * down_s + r.decode_j
        follower = np.ones(r.k, dtype=bool)
        follower[g.leader] = False
        retain = np.where(follower & ~r.same_prompt, self.sharing_cost.retain(g.similarity, s_user * self.sharing_cost.steps / t_steps), 1.0)
        return r.base_fidelity * retain, latency, battery

    def _surrogate_scores(self, agent: SurrogateAgent, fidelity: np.ndarray, latency: np.ndarray,
                          battery: np.ndarray) -> np.ndarray:
        """``agent``'s scores of the round's users ([K] or [N, K] arrays), its weights computed once a round."""
        r = self.round
        assert r is not None
        key = f"{id(agent)}"
        if key not in self._weights:
            self._weights[key] = agent.weights(r.traits)
        shape = np.broadcast_shapes(np.shape(fidelity), np.shape(latency), np.shape(battery))
        n = int(np.prod(shape[:-1], dtype=int))
        flat = [np.broadcast_to(x, shape).reshape(-1) for x in (fidelity, latency, battery)]
        scores = agent.score_arrays(np.tile(r.traits, (n, 1)), *flat, weights=np.tile(self._weights[key], (n, 1)))
        return scores.reshape(shape)

    def outcome(self, bandwidth: np.ndarray, compute: np.ndarray, shared: np.ndarray) -> Outcome:
        """Latency, battery, fidelity and scores of a decision on the current round."""
        r = self.round
        assert r is not None
        g, t_steps = r.groups, self.steps
        fidelity, latency, battery = self._user_terms(bandwidth, compute, shared[g.label])
        scores = self._surrogate_scores(self.agent, fidelity, latency, battery) if isinstance(self.agent, SurrogateAgent) \
            else self.agent.score(r.traits, self.perceptions(fidelity, latency, battery))
        chains = np.bincount(g.label[np.unique(r.owner)], minlength=g.n_groups)  # continuations run per group
        chain_steps = int(np.sum(shared + chains * (t_steps - shared)))
        return Outcome(np.asarray(scores, dtype=float), fidelity, latency, battery, shared, chain_steps,
                       r.k * t_steps, self.edge_power_w * r.tau_s * chain_steps)

    def best_shared_steps(self, bandwidth: np.ndarray, compute: np.ndarray) -> np.ndarray:
        """Each group's shared steps (at most its cap, ``Round.caps``) that maximize its members'
        summed score, given the shares.

        Exact: a user's latency, fidelity and score depend on its own group's s only (the prefix
        runs on the group's pooled share), so trying every s in 0..T for all groups at once (one
        [T + 1, K] evaluation) and taking each group's best within its cap is the optimum. It scores with the
        planner (the env's agent when that is the surrogate, a model the edge can evaluate; a
        default surrogate otherwise); ties go to the larger s (fewer U-Net evaluations).
        """
        r = self.round
        assert r is not None
        g = r.groups
        multi = r.caps >= 1  # groups that may share (singletons and no sharing: cap 0)
        if not multi.any():
            return np.zeros(g.n_groups, dtype=int)
        s_user = np.where(multi[g.label], np.arange(self.steps + 1)[:, None], 0)  # [T + 1, K]
        scores = self._surrogate_scores(self.planner, *self._user_terms(bandwidth, compute, s_user))
        totals = np.stack([np.bincount(g.label, weights=row, minlength=g.n_groups) for row in scores])  # [T + 1, G]
        totals[np.arange(self.steps + 1)[:, None] > r.caps[None, :]] = -np.inf  # past the cap: not a candidate
        best = self.steps - np.argmax(totals[::-1] >= totals.max(axis=0) - 1e-9, axis=0)
        return np.where(multi, best, 0).astype(int)

    def edge_shared_steps(self, bandwidth: np.ndarray, compute: np.ndarray) -> np.ndarray:
        """Each group's shared steps by the env's ``shared_steps_rule`` (exact for the shares, or the cap)."""
        r = self.round
        assert r is not None
        if self.shared_steps_rule == "cap":
            return r.caps.astype(int)  # singletons and no sharing: 0
        return self.best_shared_steps(bandwidth, compute)

    def best_allocation(self, max_passes: int = 6, maxiter: int = 200) -> dict[str, Any]:
        """The best action found for the current round, knowing all of it: ``{"action", "qoe",
        "start", "passes"}``. A bound on any policy up to the optimizer's accuracy (a numerical
        optimum, not a proven one), and not a scheduler: no policy sees the whole round.

        The round is a known model, so the best shares are a 2K-dimensional optimization over the
        actions an actor could output (the used entries, in [-1, 1]). For fixed shared steps the
        total is smooth in them: L-BFGS-B (finite differences) climbs it, the edge re-chooses the
        steps for the new shares (``shared_steps_rule``), and the two alternate until the steps stop
        changing. It starts from each heuristic's action and keeps the best, so it is never below
        the best heuristic. Checked against random-start Powell searches (docs/qoe.md).
        """
        from scipy.optimize import minimize  # lazy: only the bound needs it

        r = self.round
        if r is None:
            raise ValueError("reset the env first: best_allocation optimizes its current round")
        if self.learned_shared_steps:
            raise ValueError("best_allocation needs the edge to choose the shared steps (learned_shared_steps=False)")
        k = r.k

        def full(x: np.ndarray) -> np.ndarray:
            a = -np.ones((2, self.k_max))
            a[:, :k] = np.asarray(x).reshape(2, k)
            return a.ravel().astype(np.float32)

        def shares(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # decode_action's, for the used entries
            return softmax_shares(x[:k]), softmax_shares(x[k:])

        def total(x: np.ndarray, shared: np.ndarray) -> float:
            return float(self.outcome(*shares(x), shared).scores.sum())

        best: dict[str, Any] | None = None
        for start in HEURISTICS:
            x = self.heuristic_action(start).reshape(2, self.k_max)[:, :k].ravel().astype(float)
            shared = self.edge_shared_steps(*shares(x))
            passes = 0
            for passes in range(1, max_passes + 1):
                res = minimize(lambda z: -total(z, shared), x, method="L-BFGS-B", bounds=[(-1.0, 1.0)] * (2 * k),
                               options={"maxiter": maxiter})
                if -res.fun > total(x, shared):
                    x = res.x
                steps = self.edge_shared_steps(*shares(x))
                if np.array_equal(steps, shared):
                    break
                shared = steps
            q = total(x, shared)
            if best is None or q > best["qoe"]:
                best = {"action": full(x), "qoe": q, "start": start, "passes": passes}
        assert best is not None
        return best

    def shared_steps_action(self, action: np.ndarray, shared: np.ndarray) -> np.ndarray:
        """``action`` with its shared-steps block set so that :meth:`decode_action` gives ``shared``
        (``learned_shared_steps`` only: the default decoding has no such block)."""
        r = self.round
        assert r is not None
        if not self.learned_shared_steps:
            raise ValueError("this env decides the shared steps itself (learned_shared_steps=False): no block to set")
        a = np.array(action, dtype=np.float32).reshape(3, self.k_max)
        a[2, : r.k] = 2.0 * np.asarray(shared, dtype=float)[r.groups.label] / self.steps - 1.0
        return a.ravel()

    def perceptions(self, fidelity: np.ndarray, latency: np.ndarray, battery: np.ndarray) -> list:
        r = self.round
        assert r is not None
        return [Perception(p, float(f), float(l), float(b)) for p, f, l, b in zip(r.prompts, fidelity, latency, battery)]

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        out = self.outcome(*self.decode_action(action))
        r = self.round
        assert r is not None
        used = np.asarray(action, dtype=float).reshape(self.blocks, self.k_max)[:, : r.k]
        # the share of the used action entries at the box's edge (a saturated actor's gradient is ~0)
        info = {**out.summary(), "action_saturation": float(np.mean(np.abs(used) > SATURATED))}
        return self._observe(), float(out.scores.sum()), True, False, info

    # ---- heuristics (as actions, so they run through the same decoding) -------------------
    def heuristic_action(self, name: str) -> np.ndarray:
        """'equal': equal shares; 'proportional': bandwidth inversely proportional to the link's
        spectral efficiency (equal download times), equal compute; 'sqrt': the closed-form split
        b_i ∝ sqrt(cost_i) (:func:`relaydiff.system.bandwidth.inverse_cost_shares`) for both, with
        each user's cost its waiting weight times its time at a unit share. With learned shared
        steps they share nothing; with the default decoding the env picks their shared steps
        exactly, as for any policy (pass ``allow_sharing=False`` for no sharing)."""
        r = self.round
        assert r is not None
        if name == "equal":
            bw, cp = np.full(r.k, 1.0 / r.k), np.full(r.k, 1.0 / r.k)
        elif name == "proportional":
            bw, cp = (1.0 / r.spectral_eff) / np.sum(1.0 / r.spectral_eff), np.full(r.k, 1.0 / r.k)
        elif name == "sqrt":
            w_wait = 0.5 + 2.0 * r.traits[:, 4]
            bw = inverse_cost_shares(w_wait * 8.0 * self.scenario.payload.latent_bytes /
                                     (self.scenario.wireless.bandwidth_hz * r.spectral_eff))
            cp = inverse_cost_shares(w_wait * self.steps * r.tau_s / r.capacity)
        else:
            raise ValueError(f"unknown heuristic {name!r} (equal, proportional, sqrt)")
        a = -np.ones((self.blocks, self.k_max))
        a[0, : r.k], a[1, : r.k] = share_action(bw), share_action(cp)
        return a.ravel().astype(np.float32)



__all__ = ["HEURISTICS", "K_MAX", "K_MIN", "PROMPT_POOL", "SATURATED", "SHARED_STEPS_RULES", "TOPICS_PER_USER", "Outcome", "PromptPool",
           "PromptPoolError", "QoEEnv", "Round", "check_shared_steps_rule", "share_action", "softmax_shares"]
