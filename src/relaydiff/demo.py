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
from relaydiff.serve.demo_round import ServedJob, serve_one_round


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
    (and the shared-prefix group's shared steps), ``k`` when not given."""
    members = list(family.members)
    large, small = ("large", "small") if {"large", "small"} <= set(members) else (members[0], members[-1])
    styles = sorted(family.adapters) or [None]
    scenes: list[Any] = [None] * 8
    if reference:
        world = World()
        rng = np.random.default_rng(seed)
        scenes = [world.sample_scene(rng, n_objects=1 + i % 3, split="heldout") for i in range(6)]
        prompts = [world.describe(s, rng, split="heldout") for s in scenes]
        # a shared-prefix group: three users asking for the same scene in different words
        group_scene = scenes[5]
        prompts = prompts[:5] + [world.describe(group_scene, rng, split="heldout") for _ in range(3)]
        scenes = scenes[:5] + [group_scene] * 3
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


def run_demo(out: Path, seed: int = 0, steps: int | None = None, log=print) -> dict[str, Any]:
    torch.manual_seed(seed)
    family, reference = _family()
    steps = steps or int(family.metadata.get("default_steps", 20 if reference else 8))
    quality = _shipped_quality()
    k = int((quality or {}).get("best_relay", {}).get("k", steps // 2))
    k = min(max(k, 1), steps - 1)
    kp = personal_split(quality, steps) if reference else None
    kp = k if kp is None else kp
    users, group = _users(family, reference, steps, k, seed, kp)
    log(f"family {family.id}@{family.version}: members {list(family.members)}, adapters {sorted(family.adapters)}; "
        f"T={steps}, relay handoff at k={k}, personal split and shared prefix at k={kp}")

    # The guidance the shipped quality table was measured at (chosen as the family's best on held-out
    # prompts); random tiny models do not care.
    guidance = float((quality or {}).get("config", {}).get("guidance", 3.0)) if reference else 3.0
    requests = {u.name: Request(u.prompt, steps=steps, guidance=guidance, seed=seed + i)
                for i, u in enumerate(users)}
    t0 = time.perf_counter()
    # 1. the edge batches every edge segment of every user (shared-prefix users are served as a group below)
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
    # 3. the shared-prefix group: k steps once on the edge, then one continuation per device
    shared = generate_shared_prefix(family, [requests[users[i].name] for i in group],
                                    [users[i].plan for i in group], kp)
    for i, res in zip(group, shared.results):
        users[i].image, users[i].accounting = res.image, res.accounting
        users[i].handoff_bytes = len(encode_handoff(res.handoff, dtype="fp16", compress=True)) if res.handoff else 0
    serve_s = time.perf_counter() - t0
    # 4. what each user would have got from the large member alone (the quality reference)
    base = generate(family, [requests[u.name] for u in users], [Plan.single(users[0].plan.segments[0].member, steps)
                                                               for _ in users])
    for u, b in zip(users, base):
        u.baseline = b.image
    if reference:
        _score(users)
    report = _report(out, family, users, shared, serve_s, steps, k, kp, quality)
    # 5. the same family as a real service: an edge on 127.0.0.1 and a few devices, one round
    report["service"] = _service_part(out, family, "reference" if reference else "tiny", steps, seed, log)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    log(f"report -> {out / 'report.md'}")
    return report


def _shipped_quality() -> dict[str, Any] | None:
    path = Path(__file__).resolve().parent / "assets" / "reference" / "quality.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _score(users: list[User]) -> None:
    images = np.stack([u.image for u in users])
    baselines = np.stack([u.baseline for u in users])
    scenes = [u.scene for u in users]
    fid = prompt_fidelity(images, scenes).per_image
    fid_base = prompt_fidelity(baselines, scenes).per_image
    for u, f, fb in zip(users, fid, fid_base):
        u.scores = {"prompt_fidelity": float(f), "prompt_fidelity_full_large": float(fb)}
        if u.style:
            u.scores["style_fidelity"] = float(style_fidelity(u.image[None], [u.style]))


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

    fig, ax = plt.subplots(figsize=(8, 3.2))
    names = [u.name for u in users]
    edge = [sum(s["compute_s"] for s in u.accounting.get("segments", []) if s["node"] == "edge") for u in users]
    dev = [sum(s["compute_s"] for s in u.accounting.get("segments", []) if s["node"] != "edge") for u in users]
    ax.bar(names, edge, label="edge compute (batched share)")
    ax.bar(names, dev, bottom=edge, label="device compute")
    ax.set_ylabel("seconds")
    ax.set_title("where each user's denoising ran")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _report(out: Path, family: Family, users: list[User], shared, serve_s: float, steps: int, k: int,
            k_personal: int, quality: dict[str, Any] | None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    _grid(users, out / "grid.png")
    _plot(users, out / "compute.png")
    rows = []
    for u in users:
        rows.append({"user": u.name, "plan": str(u.plan), "kind": u.plan_kind, "prompt": u.prompt,
                     "unet_evals": u.accounting.get("unet_evals", {}), "handoff_bytes": u.handoff_bytes,
                     "shared_steps": u.accounting.get("shared_steps", 0), **u.scores})
    report = {"family": f"{family.id}@{family.version}", "steps": steps, "handoff_k": k,
              "personal_split_k": k_personal, "serve_s": serve_s,
              "users": rows, "shared_prefix": {"unet_evals": shared.unet_evals,
                                               "unet_evals_unshared": shared.unet_evals_unshared,
                                               "saved_fraction": shared.saved_fraction}}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = [f"# relaydiff demo ({family.id}@{family.version}, T={steps}, relay handoff at step {k}, "
             f"personal split and shared prefix at step {k_personal})", "",
             "The relay handoff is the measured best relay (highest speedup at >= 0.99 x full-large fidelity); "
             "the personal split best balances style and prompt fidelity in the measured personalization "
             "curves.", "",
             "![images](grid.png)", "", "Top row: what each user got; bottom row: the full large member on "
             "the edge for the same prompt and seed.", "",
             "| user | plan kind | plan | U-Net evals | handoff bytes | prompt fidelity | style fidelity | prompt |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fid = f"{r['prompt_fidelity']:.2f} (large {r['prompt_fidelity_full_large']:.2f})" \
            if "prompt_fidelity" in r else "n/a"
        sty = f"{r['style_fidelity']:.0f}" if "style_fidelity" in r else "-"
        lines.append(f"| {r['user']} | {r['kind']} | `{r['plan']}` | {r['unet_evals']} | {r['handoff_bytes']} | "
                     f"{fid} | {sty} | {r['prompt']} |")
    lines += ["", f"Shared prefix: the group ran {sum(shared.unet_evals.values())} U-Net evaluations instead of "
                  f"{sum(shared.unet_evals_unshared.values())} ({100 * shared.saved_fraction:.0f}% saved).", "",
              "![compute](compute.png)", ""]
    if quality:
        lines += ["## Measured quality and speed of the family (`relaydiff bench quality --json`)", "",
                  "| k | fidelity | FD | speedup |", "|---|---|---|---|"]
        for r in quality.get("relay", []):
            lines.append(f"| {r.get('k')} | {r.get('fidelity', float('nan')):.3f} | {r.get('fd', float('nan')):.2f} | "
                         f"{r.get('speedup', float('nan')):.2f} |")
        lines += ["", f"Best relay: `{json.dumps(quality.get('best_relay'))}`", ""]
    else:
        lines += ["Quality numbers appear here once the reference family and its measured quality table ship.", ""]
    (out / "report.md").write_text("\n".join(lines))
    return report


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
