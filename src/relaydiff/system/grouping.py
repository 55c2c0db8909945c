"""Shared-prefix groups from prompt embeddings, and what sharing s steps costs a follower.

Grouping rule (documented, deterministic): complete-linkage agglomerative clustering on cosine
similarity, cut at ``threshold`` — every two prompts in a group are at least ``threshold``
similar — with groups of at most ``max_group`` members (a larger cluster is split in index
order). A group's *leader* is its medoid (highest mean similarity to the others): the edge runs
the first s steps once, conditioned on the leader's prompt, then every member continues with its
own prompt. A follower's similarity is its cosine with the leader. Embeddings come in as numpy
arrays (MiniLM runs at the edge, in ``bench``/``serve``, or comes from a precomputed pool).

*A prompt runs once per group* (when the prompts are given, as the QoE env gives them): the
clustering is over the round's distinct prompts (``max_group`` of them at most), and every user
joins the group of its prompt. After the group's prefix, each distinct prompt's continuation runs
once, and every user who sent that prompt receives its image (:func:`chain_owners`): the same
prompt continued from the same latent is the same chain. Copies of a prompt therefore cost no
U-Net evaluation of their own at any s, and still share the prefix with the group's other
prompts. In the QoE env about a quarter of the users sent a prompt that another user of the round
also sent (its rounds draw 5-20 users from a few topics of four prompts each). Before, each copy
ran its own continuation, so a copy in a group with another prompt got only that group's cap of
2-8 steps. Measured in the bench of record (docs/qoe.md): 16.8% of U-Net evaluations saved
before, 29.2% now (G-DDPG's shares; 30.9% with equal shares). The service's rounds run every
job's own continuation and call this without prompts.

Sharing cost: the family's measured shared-prefix curves (``relaydiff bench quality``,
``shared_prefix`` in ``quality.json``): per similarity bin, a follower's prompt fidelity after s
shared steps, measured on followers like the ones grouped here (rounds drawn as the QoE env draws
them, other scenes' prompts among them, and a leader's own scene's variants). The measured points
are noisy (tens of followers a bin), so each bin's curve is made non-increasing in s by isotonic regression (pool adjacent violators:
sharing more of another prompt's steps cannot help) and read as the retention
F_bin(s) / F_bin(0), interpolated linearly in s. The leader keeps its own fidelity.

How far a group shares (one rule, for the service's rounds and the QoE env): a group's s is at
most the largest s that keeps its least similar follower at >= ``SHARE_RETENTION`` of its prompt
fidelity on these curves (:meth:`SharingCost.longest_sharing`, :func:`shared_steps_caps`): a
bin's mean hides its worst followers, and at s = T a follower gets the leader's image (the live
rounds of docs/qoe.md: followers of another scene read 0.22-0.62 at s = T; curves measured on the
leader's own scene's variants only had predicted 0.79-0.93, which is why the bench now measures
followers of env-drawn rounds too). A
follower whose prompt *is* its leader's does not bind the cap and keeps its fidelity at any s:
it is conditioned on the same prompt throughout.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from relaydiff.system.quality import QualityTableError, REFERENCE_TABLE


# A follower keeps at least this share of its prompt fidelity on the measured curves: the largest
# shared prefix a group may run (see the module docstring; serve.rounds and sim.qoe_env apply it)
SHARE_RETENTION = 0.95
# Two prompts may share a prefix when their MiniLM cosine is at least this (group_prompts' cut: the
# service's rounds and the QoE env group at it; bench quality measures its followers from here up)
GROUP_THRESHOLD = 0.75
# A group holds at most this many (distinct) prompts: the service's rounds, the QoE env and the demo
# group with it (a larger cluster is split; see the module docstring)
SHARE_MAX_GROUP = 8


@dataclass(frozen=True)
class Groups:
    """A partition of K prompts: ``label[i]`` its group, ``leader[g]`` the group's leader index,
    ``similarity[i]`` the cosine of prompt i with its leader (1 for a leader)."""

    label: np.ndarray
    leader: np.ndarray
    similarity: np.ndarray

    @property
    def n_groups(self) -> int:
        return int(self.leader.size)

    def members(self, g: int) -> np.ndarray:
        return np.flatnonzero(self.label == g)

    def sizes(self) -> np.ndarray:
        return np.bincount(self.label, minlength=self.n_groups)


def group_prompts(embeddings: np.ndarray, threshold: float = GROUP_THRESHOLD, max_group: int = SHARE_MAX_GROUP,
                  prompts: Sequence[str] | None = None) -> Groups:
    """Complete-linkage groups at cosine ``threshold``; with ``prompts``, of the distinct prompts,
    every user in its prompt's group (see the module docstring)."""
    e = np.asarray(embeddings, dtype=float)
    if e.ndim != 2 or e.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty [K, d] array, got shape {e.shape}")
    if max_group < 1:
        raise ValueError(f"max_group must be >= 1, got {max_group}")
    k = e.shape[0]
    if prompts is None:
        first, of = np.arange(k), np.arange(k)
    else:
        if len(prompts) != k:
            raise ValueError(f"{len(prompts)} prompts for {k} embeddings")
        index: dict[str, int] = {}
        of = np.array([index.setdefault(p, len(index)) for p in prompts])  # each user's distinct prompt
        first = np.array([prompts.index(p) for p in index])  # each distinct prompt's first user
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    sim = np.clip(e @ e.T, -1.0, 1.0)
    u = sim[np.ix_(first, first)]
    n = first.size
    if n == 1:
        raw = np.zeros(1, dtype=int)
    else:
        dist = np.clip(1.0 - u, 0.0, 2.0)
        np.fill_diagonal(dist, 0.0)
        z = linkage(squareform(dist, checks=False), method="complete")
        raw = fcluster(z, t=1.0 - threshold, criterion="distance") - 1
    label_u = np.empty(n, dtype=int)
    leaders: list[int] = []
    for c in np.unique(raw):  # clusters in order of their label
        idx = np.flatnonzero(raw == c)
        for start in range(0, idx.size, max_group):
            part = idx[start : start + max_group]
            label_u[part] = len(leaders)
            leaders.append(int(first[part[np.argmax(u[np.ix_(part, part)].mean(axis=1))]]))
    leader, label = np.asarray(leaders, dtype=int), label_u[of]
    similarity = sim[np.arange(k), leader[label]]
    similarity[of == of[leader[label]]] = 1.0  # the leader's own prompt: 1 exactly (not the fp16 embeddings' rounding)
    return Groups(label, leader, similarity)


def chain_owners(groups: Groups, prompts: Sequence[str]) -> np.ndarray:
    """[K] the user whose continuation each user receives when a prompt runs once per group (the
    module docstring): the first member of its group who sent its prompt (itself for that one)."""
    if len(prompts) != groups.label.size:
        raise ValueError(f"{len(prompts)} prompts for {groups.label.size} grouped users")
    first: dict[tuple[int, str], int] = {}
    return np.array([first.setdefault((int(g), p), i) for i, (g, p) in enumerate(zip(groups.label.tolist(), prompts))])


def _non_increasing(y: np.ndarray) -> np.ndarray:
    """Least-squares non-increasing fit (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v in np.asarray(y, dtype=float):
        blocks.append([float(v), 1.0, 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            b, a = blocks.pop(), blocks.pop()
            w = a[1] + b[1]
            blocks.append([(a[0] * a[1] + b[0] * b[1]) / w, w, a[2] + b[2]])
    return np.concatenate([np.full(c, m) for m, _, c in blocks])


@dataclass(frozen=True)
class SharingCost:
    """Retention of a follower's prompt fidelity after s shared steps, per similarity bin."""

    bin_edges: np.ndarray  # [n_bins + 1] similarity edges (the measured bins)
    shared_steps: np.ndarray  # [n_points] the measured s
    retention: np.ndarray  # [n_bins, n_points] F_bin(s) / F_bin(0), non-increasing in s
    steps: int  # T, the chain length the curves were measured at
    source: str = ""
    guidance: float | None = None  # the guidance the curves were measured at (the table's config)

    def retain(self, similarity: np.ndarray, shared: np.ndarray) -> np.ndarray:
        """F(s) / F(0) for followers at ``similarity`` sharing ``shared`` steps (broadcasts)."""
        sim, s = np.broadcast_arrays(np.asarray(similarity, dtype=float), np.asarray(shared, dtype=float))
        b = np.clip(np.searchsorted(self.bin_edges, sim, side="right") - 1, 0, len(self.retention) - 1)
        out = np.empty(sim.shape)
        for j in range(len(self.retention)):
            m = b == j
            out[m] = np.interp(s[m], self.shared_steps, self.retention[j])
        return out

    def longest_sharing(self, similarity: float, steps: int, retention: float = SHARE_RETENTION) -> int:
        """The largest s (of ``steps``) that keeps a follower at ``similarity`` at >= ``retention`` of
        its prompt fidelity on these curves, read as a share of the measured T (0 if none does)."""
        keeps = self.retain(np.full(self.shared_steps.shape, similarity), self.shared_steps) >= retention
        share = float(self.shared_steps[keeps].max() / self.steps) if keeps.any() else 0.0
        return int(np.floor(share * steps + 1e-9))


def same_prompt_followers(groups: Groups, prompts: list[str]) -> np.ndarray:
    """[K] bool: True for a follower whose prompt is exactly its leader's (leaders: False)."""
    if len(prompts) != groups.label.size:
        raise ValueError(f"{len(prompts)} prompts for {groups.label.size} grouped users")
    lead = groups.leader[groups.label]
    return np.array([i != j and prompts[i] == prompts[j] for i, j in enumerate(lead.tolist())], dtype=bool)


def shared_steps_caps(groups: Groups, cost: SharingCost, steps: int, retention: float | None = SHARE_RETENTION,
                      same_prompt: np.ndarray | None = None) -> np.ndarray:
    """[G] the most steps each group may share (see the module docstring): 0 for a singleton;
    :meth:`SharingCost.longest_sharing` at the least similar follower whose prompt differs from the
    leader's (``same_prompt``: :func:`same_prompt_followers`; None: every follower binds); ``steps``
    when no follower binds or ``retention`` is None (the curves alone, up to T)."""
    caps = np.where(groups.sizes() >= 2, steps, 0).astype(int)
    if retention is None:
        return caps
    binds = np.ones(groups.label.size, dtype=bool) if same_prompt is None else ~np.asarray(same_prompt, dtype=bool)
    binds[groups.leader] = False
    for g in range(groups.n_groups):
        m = groups.members(g)
        m = m[binds[m]]
        if caps[g] and m.size:
            caps[g] = min(caps[g], cost.longest_sharing(float(groups.similarity[m].min()), steps, retention))
    return caps


def load_sharing_cost(path: str | Path = REFERENCE_TABLE) -> SharingCost:
    """The shared-prefix curves of a ``relaydiff bench quality --json`` file (the shipped family's
    by default), smoothed and normalized as the module docstring says."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QualityTableError(f"quality table {path}: cannot read ({exc})") from None
    sp = data.get("shared_prefix") if isinstance(data, dict) else None
    bins = sp.get("bins") if isinstance(sp, dict) else None
    if not bins:
        raise QualityTableError(f"{path}: no measured shared_prefix bins (run relaydiff bench quality)")
    xs = [tuple(b.get("shared_steps", ())) for b in bins]
    if any(x != xs[0] for x in xs) or len(xs[0]) < 2 or xs[0][0] != 0:
        raise QualityTableError(f"{path}: shared_prefix bins need one common shared_steps grid starting at 0")
    ret = []
    for b in bins:
        f = _non_increasing(np.asarray(b["fidelity"], dtype=float))
        ret.append(f / max(f[0], 1e-12))
    edges = [float(bins[0]["similarity"][0])] + [float(b["similarity"][1]) for b in bins]
    config = data.get("config") or {}
    steps = int(config.get("steps", xs[0][-1]))
    guidance = float(config["guidance"]) if config.get("guidance") is not None else None
    return SharingCost(np.asarray(edges), np.asarray(xs[0], dtype=float), np.asarray(ret), steps,
                       f"measured shared_prefix bins of {path} (isotonic in s)", guidance)


__all__ = ["GROUP_THRESHOLD", "SHARE_RETENTION", "Groups", "SharingCost", "chain_owners", "group_prompts", "load_sharing_cost", "same_prompt_followers",
           "shared_steps_caps"]
