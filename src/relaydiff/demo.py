"""`relaydiff demo`: a handful of users served across one edge server and their devices.

Every user's request gets a plan (edge only, relay, split with a personal adapter, a shared
prefix group, device only). The edge executor batches all edge segments of all users; each chain
that leaves the edge crosses the real wire format (bytes counted) to its device executor, which
finishes it. The report shows the images, the cost of each plan and, with the reference family,
what the judge measures.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relaydiff.engine.chain import new_chain
from relaydiff.engine.executor import Executor
from relaydiff.engine.family import Family, load_family, reference_dir
from relaydiff.engine.handoff import decode_handoff, encode_handoff
from relaydiff.engine.plan import Plan, Request
from relaydiff.engine.runner import from_handoff, generate, generate_shared_prefix, to_handoff
from relaydiff.models.world import World
from relaydiff.quality.metrics import prompt_fidelity, style_fidelity
from relaydiff.quality.similarity import prompt_embeddings
from relaydiff.serve.demo_round import ServedJob, serve_one_round
from relaydiff.system.grouping import (GROUP_THRESHOLD, group_prompts, load_sharing_cost, QualityTableError,
                                       SHARE_MAX_GROUP, SHARE_RETENTION)

# what run_demo does, in order (a progress callback hears each name as it starts)
PHASES = ("warm up the traced members", "edge batch and devices", "shared-prefix group",
          "full large references", "judge", "report", "service round")


@dataclass
class User:
    name: str
    prompt: str
    style: str | None          # adapter name (personal style) or None
    plan_kind: str
    plan: Plan
    scene: Any = None          # world scene (reference family): what the judge checks
    image: np.ndarray | None = None
    baseline: np.ndarray | None = None   # the same request, full large member on the edge
    accounting: dict[str, Any] = field(default_factory=dict)
    handoff_bytes: int = 0
    scores: dict[str, float] = field(default_factory=dict)


def _family() -> tuple[Family, bool]:
    """The shipped reference family when this installation has it, else the tiny random family."""
    if (reference_dir() / "family.json").is_file():
        return load_family("reference", trace=True), True
    return load_family("tiny", trace=True), False


def personal_split(quality: dict[str, Any] | None, steps: int) -> int | None:
    """The split point (0 < k < T) that best balances style and prompt fidelity in the measured
    personalization curves (mean over styles of (style + prompt) / 2); None without a table."""
    pers = (quality or {}).get("personalization") or {}
    ks, styles = pers.get("split_points"), pers.get("styles")
    if not ks or not isinstance(styles, dict) or not styles:
        return None
    try:
        score = np.mean([(np.asarray(v["style_fidelity"], float) + np.asarray(v["prompt_fidelity"], float)) / 2
                         for v in styles.values()], axis=0)
    except (KeyError, TypeError, ValueError):
        return None
    inner = [i for i, k in enumerate(ks) if 0 < k < steps]
    return int(ks[max(inner, key=lambda i: score[i])]) if inner and len(score) == len(ks) else None


def _users(family: Family, reference: bool, steps: int, k: int, seed: int,
           k_personal: int | None = None) -> tuple[list[User], list[int]]:
    """``k``: the relay's handoff step; ``k_personal``: the split of users with a personal adapter
    (and of the shared-prefix group), ``k`` when not given."""
    members = list(family.members)
    large, small = ("large", "small") if {"large", "small"} <= set(members) else (members[0], members[-1])
    styles = sorted(family.adapters) or [None]
    scenes: list[Any] = [None] * 8
    if reference:
        world = World()
        rng = np.random.default_rng(seed)
        scenes = [world.sample_scene(rng, n_objects=1 + i % 3, split="heldout") for i in range(5)]
        prompts = [world.describe(s, rng, split="heldout") for s in scenes]
        group_prompts_, group_scene = _similar_group(world, rng)
        prompts += group_prompts_
        scenes += [group_scene] * len(group_prompts_)
    else:
        prompts = ["a red circle left of a blue square", "a green star", "two yellow triangles",
                   "a purple square above a circle", "a small blue star", "a big red circle",
                   "a large red circle", "one big red circle"]

    def style(i: int) -> str | None:
        return styles[i % len(styles)]

    spec = [
        ("ana", "edge only", Plan.single(large, steps, node="edge"), None),
        ("ben", "relay", Plan.relay(large, small, k, steps), None),
        ("chloe", "split + adapter", None, style(0)),
        ("dev", "split + adapter", None, style(1)),
        ("eli", "device only", Plan.single(small, steps, style(2), node="device"), style(2)),
        ("fay", "shared prefix", None, style(3)),
        ("gus", "shared prefix", None, style(0)),
        ("hana", "shared prefix", None, None),
    ]
    kp = k if k_personal is None else k_personal
    users = []
    for i, (name, kind, plan, st) in enumerate(spec):
        plan = plan or Plan.relay(large, small, kp, steps, st)
        users.append(User(name=name, prompt=prompts[i], style=st, plan_kind=kind, plan=plan, scene=scenes[i]))
    return users, [5, 6, 7]


def _similar_group(world: World, rng: np.random.Generator, candidates: int = 8, size: int = 3) -> tuple[list[str], Any]:
    """Three users asking for one scene in their own words: of ``candidates`` scenes, the one whose
    descriptions are the most alike (MiniLM), the case shared prefixes are for (seed 002)."""
    options = []
    for _ in range(candidates):
        scene = world.sample_scene(rng, n_objects=2, split="heldout")
        options.append(([world.describe(scene, rng, split="heldout") for _ in range(size)], scene))
    emb = prompt_embeddings([p for texts, _ in options for p in texts]).reshape(candidates, size, -1)
    worst = [float(np.min(e @ e.T)) for e in emb]   # the least similar pair of each candidate group
    return options[int(np.argmax(worst))]


def group_sharing(prompts: list[str], steps: int, k_edge: int) -> dict[str, Any]:
    """The group's leader and shared steps by the service's rule (`serve.rounds`): MiniLM groups
    at ``GROUP_THRESHOLD``; the largest s that keeps the least similar follower at >=
    ``SHARE_RETENTION`` of its prompt fidelity on the shipped family's measured shared-prefix
    curves, never past the members' edge part ``k_edge``."""
    groups = group_prompts(prompt_embeddings(prompts), GROUP_THRESHOLD, SHARE_MAX_GROUP)
    sizes = groups.sizes()
    g = int(np.argmax(sizes))
    members = groups.members(g)
    similarity = float(groups.similarity[members].min())
    out = {"leader": int(groups.leader[g]), "similarity": similarity, "grouped": bool(sizes[g] == len(prompts)),
           "retention": SHARE_RETENTION, "k_edge": k_edge}
    try:
        cost = load_sharing_cost()
    except QualityTableError as exc:   # no measured curves (e.g. the tiny family): half the edge part
        out.update(steps=k_edge // 2, rule=f"no measured shared-prefix curves ({exc}); half the edge part")
        return out
    s = min(cost.longest_sharing(similarity, steps, SHARE_RETENTION) if out["grouped"] else 0, k_edge)
    out.update(steps=s, predicted_retention=float(cost.retain(np.array(similarity), np.array(s * cost.steps / steps))),
               rule=f"largest s keeping >= {SHARE_RETENTION:.0%} of a follower's prompt fidelity at similarity "
                    f"{similarity:.2f} on the measured curves, capped at the edge part k={k_edge}")
    return out


def run_demo(out: Path, seed: int = 0, steps: int | None = None, log=print,
             phase: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Serve the demo's users and write the report to ``out``; ``phase`` hears each of ``PHASES``
    as it starts (the CLI draws a progress bar with it)."""
    phase = phase or (lambda name: None)
    torch.manual_seed(seed)
    family, reference = _family()
    steps = steps or int(family.metadata.get("default_steps", 20 if reference else 8))
    quality = _shipped_quality()
    k = int((quality or {}).get("best_relay", {}).get("k", steps // 2))
    k = min(max(k, 1), steps - 1)
    kp = personal_split(quality, steps) if reference else None
    kp = k if kp is None else kp
    users, group = _users(family, reference, steps, k, seed, kp)
    sharing = group_sharing([users[i].prompt for i in group], steps, kp)
    log(f"family {family.id}@{family.version}: members {list(family.members)}, adapters {sorted(family.adapters)}; "
        f"T={steps}, relay handoff at k={k}, personal split at k={kp}, shared prefix of {sharing['steps']} steps")

    # The guidance the shipped quality table was measured at (chosen as the family's best on held-out
    # prompts); random tiny models do not care.
    guidance = float((quality or {}).get("config", {}).get("guidance", 3.0)) if reference else 3.0
    requests = {u.name: Request(u.prompt, steps=steps, guidance=guidance, seed=seed + i)
                for i, u in enumerate(users)}
    # 0. each member and adapter once, untimed: a traced member's first call builds its trace (seconds),
    # which is not what serving costs
    phase(PHASES[0])
    warm_up(family, [u.plan for u in users], guidance)
    t0 = time.perf_counter()
    # 1. the edge batches every edge segment of every user (shared-prefix users are served as a group below)
    phase(PHASES[1])
    solo = [u for i, u in enumerate(users) if i not in group]
    edge, chains = Executor(family, node="edge", max_batch=16), {}
    for u in solo:
        c = new_chain(family, requests[u.name], u.plan)
        chains[u.name] = c
        if c.segment.node == "edge":
            edge.submit(c)
    edge.run()
    # 2. every chain that leaves the edge crosses the wire to its device, which finishes it
    for u in solo:
        c = chains[u.name]
        if not c.done and c.step > 0:
            wire = encode_handoff(to_handoff(family, c), dtype="fp16", compress=True)
            u.handoff_bytes = len(wire)
            c = from_handoff(family, decode_handoff(wire, expect_latent_shape=(1, *family.latent_shape)))
            c.accounting.handoff_bytes = len(wire)
        if not c.done:
            device = Executor(family, node="device", max_batch=1)
            device.submit(c)
            device.run()
        u.image = family.decode(c.latents)[0]
        u.accounting = c.accounting.to_dict()
    # 3. the shared-prefix group: s steps once on the edge (the leader's prompt and seed), then each
    # member its own way
    phase(PHASES[2])
    group_requests, group_plans = [requests[users[i].name] for i in group], [users[i].plan for i in group]
    shared = generate_shared_prefix(family, group_requests, group_plans, sharing["steps"], leader=sharing["leader"])
    for i, res in zip(group, shared.results):
        users[i].image, users[i].accounting = res.image, res.accounting
        users[i].handoff_bytes = len(encode_handoff(res.handoff, dtype="fp16", compress=True)) if res.handoff else 0
        users[i].accounting["prefix_compute_s"] = _edge_compute(shared.prefix_accounting) / len(group)
    serve_s = time.perf_counter() - t0
    # 4. what each user would have got from the large member alone (the quality reference)
    phase(PHASES[3])
    base = generate(family, [requests[u.name] for u in users], [Plan.single(users[0].plan.segments[0].member, steps)
                                                               for _ in users])
    for u, b in zip(users, base):
        u.baseline = b.image
    phase(PHASES[4])
    sharing_quality: dict[str, Any] = {}
    if reference:   # what sharing cost: the same plans, seeds and prompts unshared (paired; the judge reads it)
        unshared = generate(family, group_requests, group_plans)
        sharing_quality = _score(users, [users[i] for i in group], [r.image for r in unshared])
    phase(PHASES[5])
    report = _report(out, family, users, shared, sharing, sharing_quality, serve_s, steps, k, kp, quality)
    # 5. the same family as a real service: an edge on 127.0.0.1 and a few devices, one round
    phase(PHASES[6])
    report["service"] = _service_part(out, family, "reference" if reference else "tiny", steps, seed, log)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    log(f"report -> {out / 'report.md'}")
    return report


def warm_up(family: Family, plans: list[Plan], guidance: float, steps: int = 3) -> None:
    """Run each (member, adapter) of ``plans`` for a few steps: builds the traces and lets
    TorchScript's profiling runs pass, so that the timed run measures serving, not compiling."""
    seen = sorted({(s.member, s.adapter) for p in plans for s in p.segments}, key=str)
    for member, adapter in seen:
        generate(family, [Request("warm up", steps=steps, guidance=guidance, seed=0)],
                 [Plan.single(member, steps, adapter)])


def _edge_compute(accounting: dict[str, Any]) -> float:
    return sum(s["compute_s"] for s in accounting.get("segments", []) if s["node"] == "edge")


def _shipped_quality() -> dict[str, Any] | None:
    path = Path(__file__).resolve().parent / "assets" / "reference" / "quality.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _score(users: list[User], group: list[User], unshared: list[np.ndarray]) -> dict[str, Any]:
    """The judge's reading of every user's image (and of full large's), and of the group's images
    against the same plans run unshared: what sharing cost, paired."""
    images = np.stack([u.image for u in users])
    baselines = np.stack([u.baseline for u in users])
    scenes = [u.scene for u in users]
    fid = prompt_fidelity(images, scenes).per_image
    fid_base = prompt_fidelity(baselines, scenes).per_image
    for u, f, fb in zip(users, fid, fid_base):
        u.scores = {"prompt_fidelity": float(f), "prompt_fidelity_full_large": float(fb)}
        if u.style:
            u.scores["style_fidelity"] = float(style_fidelity(u.image[None], [u.style]))
    alone = prompt_fidelity(np.stack(unshared), [u.scene for u in group]).per_image
    for u, f in zip(group, alone):
        u.scores["prompt_fidelity_unshared"] = float(f)
    shared_mean = float(np.mean([u.scores["prompt_fidelity"] for u in group]))
    unshared_mean = float(np.mean(alone))
    return {"prompt_fidelity_shared": shared_mean, "prompt_fidelity_unshared": unshared_mean,
            "retention": shared_mean / unshared_mean if unshared_mean > 0 else None}


def _grid(users: list[User], path: Path, scale: int = 4) -> None:
    from PIL import Image, ImageDraw  # lazy: only the report's grid needs it

    size = users[0].image.shape[0] * scale
    pad, label = 4, 14
    grid = Image.new("RGB", (len(users) * (size + pad) + pad, 2 * (size + label + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for col, u in enumerate(users):
        x = pad + col * (size + pad)
        for row, (img, text) in enumerate([(u.image, f"{u.name}: {u.plan_kind}"), (u.baseline, "full large")]):
            y = pad + row * (size + label + pad)
            draw.text((x, y), text[:22], fill="black")
            grid.paste(Image.fromarray(img).resize((size, size), Image.NEAREST), (x, y + label))
    grid.save(path)


def _plot(users: list[User], path: Path) -> None:
    import matplotlib  # lazy: plotting is the slowest import and only the report's plot needs it

    matplotlib.use("Agg")
    # lazy: matplotlib is slow to import; only the plots need it
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.4))
    names = [u.name for u in users]
    edge = np.array([_edge_compute(u.accounting) for u in users])
    prefix = np.array([u.accounting.get("prefix_compute_s", 0.0) for u in users])
    dev = np.array([sum(s["compute_s"] for s in u.accounting.get("segments", []) if s["node"] != "edge")
                    for u in users])
    ax.bar(names, edge, label="edge compute (its share of each batched step)", color="#3b6fb6")
    ax.bar(names, prefix, bottom=edge, label="edge, shared prefix (the group's time / members)", color="#3b6fb6",
           hatch="//", edgecolor="white")
    ax.bar(names, dev, bottom=edge + prefix, label="device compute", color="#e08a2c")
    ax.set_ylabel("seconds (this CPU, traces warm)")
    ax.set_title("where each user's denoising ran")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _report(out: Path, family: Family, users: list[User], shared, sharing: dict[str, Any],
            sharing_quality: dict[str, Any], serve_s: float, steps: int, k: int, k_personal: int,
            quality: dict[str, Any] | None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    _grid(users, out / "grid.png")
    _plot(users, out / "compute.png")
    rows = []
    for u in users:
        rows.append({"user": u.name, "plan": str(u.plan), "kind": u.plan_kind, "prompt": u.prompt,
                     "unet_evals": u.accounting.get("unet_evals", {}), "handoff_bytes": u.handoff_bytes,
                     "shared_steps": u.accounting.get("shared_steps", 0), **u.scores})
    large = users[0].plan.segments[0].member
    edge_evals = shared.unet_evals.get(large, 0), shared.unet_evals_unshared.get(large, 0)
    sharing_report = {**sharing, **sharing_quality, "unet_evals": shared.unet_evals,
                      "unet_evals_unshared": shared.unet_evals_unshared, "saved_fraction": shared.saved_fraction,
                      "edge_evals_saved_fraction": 1 - edge_evals[0] / edge_evals[1] if edge_evals[1] else 0.0}
    report = {"family": f"{family.id}@{family.version}", "steps": steps, "handoff_k": k,
              "personal_split_k": k_personal, "serve_s": serve_s, "users": rows, "shared_prefix": sharing_report}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = [f"# relaydiff demo ({family.id}@{family.version}, T={steps} denoising steps)", "",
             f"Eight users, one edge server, their devices. The **relay** user gets the large member on the edge "
             f"for steps 0-{k} and the small member on the device for the rest (k={k}: {_best_relay_prose(quality)}). "
             f"Users with a personal style split at k={k_personal}, the split that best balances style and prompt "
             "fidelity in the family's measured personalization curves; their device finishes with the small "
             "member and their style adapter. The last three users ask for one scene in their own words: a "
             "**shared-prefix group**.", "",
             "![images](grid.png)", "", "Top row: what each user got; bottom row: the full large member on "
             "the edge for the same prompt and seed (the quality reference).", "",
             "Columns: *plan* is the engine's plan (`member[+adapter]@node:first-last step`); *U-Net evals* counts "
             "the member evaluations the user's chain ran (two per step with classifier-free guidance, one on a "
             "guidance-distilled member; a shared-prefix member counts only its own continuation); *handoff bytes* "
             "is the size of the intermediate latent that crossed the wire (fp16, compressed); *prompt fidelity* is "
             "the judge's share of the prompt's attributes (objects, colours, sizes, shapes, count, relation, "
             "background) found in the image, with full large's score for the same prompt and seed beside it; "
             "*style fidelity* is 1 when the judge sees the user's style, 0 when it does not.", "",
             "| user | plan kind | plan | U-Net evals | handoff bytes | prompt fidelity | style fidelity | prompt |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fid = f"{r['prompt_fidelity']:.2f} (large {r['prompt_fidelity_full_large']:.2f})" \
            if "prompt_fidelity" in r else "n/a"
        sty = f"{r['style_fidelity']:.0f}" if "style_fidelity" in r else "-"
        evals = ", ".join(f"{m} {n}" for m, n in r["unet_evals"].items())
        lines.append(f"| {r['user']} | {r['kind']} | `{r['plan']}` | {evals} | {r['handoff_bytes'] or '-'} | "
                     f"{fid} | {sty} | {r['prompt']} |")
    lines += ["", "### The shared prefix", "", _sharing_prose(sharing_report, large), "",
              "![compute](compute.png)", "",
              "Compute per user, on this CPU, after every member and adapter ran once untimed (a traced member's "
              "first call builds its trace). An edge step serves a batch; each user is charged its rows' share. "
              "The shared prefix ran once for the group; each member is charged a third of it (hatched).", ""]
    if quality:
        lines += _quality_table(quality)
    else:
        lines += ["Quality numbers appear here once the reference family and its measured quality table ship.", ""]
    (out / "report.md").write_text("\n".join(lines))
    return report


def _best_relay_prose(quality: dict[str, Any] | None) -> str:
    best = (quality or {}).get("best_relay")
    if not best:
        return "half the chain, as no measured quality table ships with this family"
    rule = best.get("rule", "unpaired")
    how = ("the smallest k whose paired-bootstrap lower bound of fidelity keeps within 1% of full large"
           if rule == "paired" else "the fastest k whose mean fidelity is >= 0.99 x full large")
    return (f"the family's measured best relay, {how}: fidelity {best.get('fidelity', float('nan')):.3f} "
            f"({best.get('fidelity_ratio', float('nan')):.2f} x full large) at {best.get('speedup', float('nan')):.2f}x "
            "the speed of full large")


def _sharing_prose(sp: dict[str, Any], large: str) -> str:
    saved = f"{100 * sp['edge_evals_saved_fraction']:.0f}%"
    text = (f"The group's prompts are {sp['similarity']:.2f} alike (MiniLM cosine of the least similar member with "
            f"the leader). The service's rule ({sp['rule']}) gives s={sp['steps']} shared steps. The edge ran "
            f"{sp['unet_evals'].get(large, 0)} {large} evaluations for the group instead of "
            f"{sp['unet_evals_unshared'].get(large, 0)} ({saved} of the group's edge work saved; "
            f"{100 * sp['saved_fraction']:.0f}% of all its U-Net evaluations, device steps included).")
    if sp.get("predicted_retention") is not None:
        text += f" The measured curves predict the followers keep {sp['predicted_retention']:.0%} of their prompt fidelity."
    if sp.get("prompt_fidelity_unshared") is not None:
        text += (f" Measured here, paired (the same plans, prompts and seeds, unshared): prompt fidelity "
                 f"{sp['prompt_fidelity_shared']:.2f} shared against {sp['prompt_fidelity_unshared']:.2f} unshared "
                 "(three images: an illustration, not a measurement of record; `relaydiff bench quality` measures "
                 "the curves).")
    return text


def _quality_table(quality: dict[str, Any]) -> list[str]:
    lines = ["## Measured quality and speed of the family (`relaydiff bench quality --json`)", "",
             "Each row relays at handoff step k: the large member for steps 0-k, the small one for the rest "
             "(k=0: small alone; k=T: large alone). *fidelity* is the judge's mean prompt fidelity on the bench's "
             "held-out prompts; *FD* the Fréchet distance of the judge's features to real renders of the same "
             "prompts (lower is better); *speedup* full large's measured time over the relay's for a batch of "
             "requests (the bench's timing batch).", "", "| k | fidelity | FD | speedup |", "|---|---|---|---|"]
    for r in quality.get("relay", []):
        lines.append(f"| {r.get('k')} | {r.get('fidelity', float('nan')):.3f} | {r.get('fd', float('nan')):.2f} | "
                     f"{r.get('speedup', float('nan')):.2f} |")
    return lines + ["", f"Best relay: k={quality.get('best_relay', {}).get('k')}, "
                        f"{_best_relay_prose(quality)}.", ""]


# a job's phases, from the device's clock: (phase, from mark, to mark, colour); edge blue, device orange
_PHASES = (("round decision", None, "planned", "#9a9a9a"), ("edge", "planned", "handoff", "#3b6fb6"),
           ("edge", "planned", "image", "#3b6fb6"), ("device", "handoff", "finished", "#e08a2c"),
           ("report", "finished", "reported", "#4a9a5a"))


def _service_part(out: Path, family: Family, family_name: str, steps: int, seed: int, log) -> dict[str, Any]:
    """Serve a few devices through the real edge server on loopback; report each job's timeline."""
    log("service: an edge on 127.0.0.1 and a few devices submitting together (one round)")
    t0 = time.perf_counter()
    jobs = serve_one_round(family, load_family(family_name), steps, seed)
    wall_s = time.perf_counter() - t0
    _timeline(jobs, out / "service.png")
    rows = [{"device": j.device, "device_class": j.device_class, "kind": j.job["kind"], "plan": j.job["plan_text"],
             "round": j.job["round_id"], "finished_by": j.finished_by, "latency_ms": j.latency_ms,
             "marks_ms": j.marks_ms} for j in jobs]
    lines = ["## The service: an edge server and devices over HTTP (`relaydiff serve edge`, `relaydiff device run`)",
             "", f"{len(jobs)} devices submitted at the same moment to an edge on 127.0.0.1 (greedy scheduler); "
             f"the scheduler decided them as round(s) {sorted({r['round'] for r in rows})}, the edge batched their "
             "edge segments, each relay or device-only device fetched its handoff (`.rdh` bytes), finished its chain "
             f"and reported. Wall clock of the round: {wall_s:.1f} s.", "",
             "![service timelines](service.png)", "",
             "| device | class | plan kind | plan | finished by | latency ms | timeline (ms after submitting) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        marks = ", ".join(f"{name} {ms:.0f}" for name, ms in r["marks_ms"].items())
        lines.append(f"| {r['device']} | {r['device_class']} | {r['kind']} | `{r['plan']}` | {r['finished_by']} | "
                     f"{r['latency_ms']:.0f} | {marks} |")
    with open(out / "report.md", "a") as md:
        md.write("\n" + "\n".join(lines) + "\n")
    return {"wall_s": wall_s, "jobs": rows}


def _timeline(jobs: list[ServedJob], path: Path) -> None:
    import matplotlib  # lazy: plotting is the slowest import and only the report's plot needs it

    matplotlib.use("Agg")
    # lazy: matplotlib is slow to import; only the plots need it
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.5 * len(jobs)))
    seen: set[str] = set()
    for row, job in enumerate(jobs):
        for phase, start, end, colour in _PHASES:
            if end not in job.marks_ms or (start is not None and start not in job.marks_ms):
                continue
            a = job.marks_ms[start] if start else 0.0
            ax.barh(row, (job.marks_ms[end] - a) / 1e3, left=a / 1e3, color=colour,
                    label=None if phase in seen else phase)
            seen.add(phase)
        ax.text(0.02, row + 0.32, job.job["plan_text"], fontsize=7, va="center")
    ax.set_yticks(range(len(jobs)), [f"{j.device} ({j.job['kind']})" for j in jobs])
    ax.invert_yaxis()
    ax.set_xlabel("seconds after submitting (the device's clock)")
    ax.set_title("each job's life through the edge server")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
