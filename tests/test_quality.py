"""The shipped judge and the quality metrics: renders score ~1, noise ~0, FD separates them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from relaydiff.models.world import STYLES, Obj, Scene, World
from relaydiff.quality.judge import Detection, Judge, JudgeConfig, JudgeTrainConfig, Reading, load_judge, train_judge
from relaydiff.quality.metrics import (
    check_facts,
    frechet_distance,
    handoff_shift,
    judge_accuracy,
    judge_fd,
    latent_stats,
    prompt_fidelity,
    style_fidelity,
)


@pytest.fixture(scope="module")
def judge() -> Judge:
    return load_judge()


@pytest.fixture(scope="module")
def tiny_family():
    from relaydiff.engine.family import load_family

    return load_family("tiny")


@pytest.fixture(scope="module")
def heldout():
    return World().batch(300, seed=777, split="heldout", styles=STYLES)


def _noise(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def test_judge_reads_heldout_renders(judge: Judge, heldout) -> None:
    acc = judge_accuracy(judge, heldout.images, heldout.scenes, heldout.styles)
    assert acc["per_fact"] >= 0.98, acc
    assert acc["per_image"] >= 0.9, acc
    assert set(acc["by_kind"]) == {"count", "shape", "color", "size", "relation", "background", "style"}


def test_renders_score_one_noise_scores_zero(judge: Judge, heldout) -> None:
    fid = prompt_fidelity(heldout.images, heldout.scenes, judge)
    assert fid.fidelity >= 0.97 and fid.per_fact >= 0.97, fid
    assert style_fidelity(heldout.images, heldout.styles, judge) >= 0.97
    noise = _noise(100, 1)
    scenes = heldout.scenes[:100]
    assert prompt_fidelity(noise, scenes, judge).fidelity <= 0.1
    assert style_fidelity(noise, heldout.styles[:100], judge) <= 0.1
    # the same images judged against the wrong prompts score far lower
    shuffled = heldout.scenes[1:] + heldout.scenes[:1]
    assert prompt_fidelity(heldout.images, shuffled, judge).fidelity < 0.7


def test_frechet_distance_separates_renders_from_noise(judge: Judge, heldout) -> None:
    other = World().batch(300, seed=778, split="heldout", styles=STYLES)
    same = judge_fd(heldout.images, other.images, judge)
    noise = judge_fd(heldout.images, _noise(300, 2), judge)
    assert same >= 0 and noise > 10 * same, (same, noise)


def test_frechet_distance_math() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = rng.normal(size=(4000, 3)) + np.array([2.0, 0.0, 0.0])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.1)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(a, a[:, :2])


def test_check_facts_matching_and_relations() -> None:
    scene = Scene(
        objects=(Obj("circle", "red", "small", 6, 6), Obj("square", "blue", "large", 24, 20)),
        relations=((0, "left of", 1),),
        background="white",
    )
    facts = World.facts(scene)
    # detections reported in the other order, right attributes
    good = Reading(
        (Detection("square", "blue", "large", 24, 20, 0.9), Detection("circle", "red", "small", 6, 6, 0.9)), "white", "plain"
    )
    assert all(check_facts(facts, good))
    # swapped positions break only the relation
    swapped = Reading(
        (Detection("square", "blue", "large", 6, 20, 0.9), Detection("circle", "red", "small", 24, 6, 0.9)), "white", "plain"
    )
    result = dict(zip(facts, check_facts(facts, swapped)))
    assert not result[("relation", 0, "left of", 1)] and sum(result.values()) == len(facts) - 1
    # a missing object fails its attributes, the count and the relation
    missing = Reading((Detection("circle", "red", "small", 6, 6, 0.9),), "gray", "plain")
    assert sum(check_facts(facts, missing)) == 3  # circle's shape, colour, size
    with pytest.raises(ValueError, match="fact kind"):
        check_facts([("mood", "happy")], good)


def test_latent_stats_and_handoff_shift() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, 4, 8, 8, generator=gen)
    chain = [z * (1 - 0.1 * t) for t in range(9)]
    stats = latent_stats(chain)
    assert len(stats["std"]) == 9 and stats["std"][0] > stats["std"][-1]
    smooth = handoff_shift(stats, 4)
    assert smooth["std_ratio"] == pytest.approx(1.0, rel=1e-6)
    chain[5] = chain[5] * 2.5  # a jump produced by the first step of the new member
    assert handoff_shift(latent_stats(chain), 4)["std_ratio"] > 3
    with pytest.raises(ValueError, match="handoff step"):
        handoff_shift(stats, 8)
    with pytest.raises(ValueError, match="B, C, H, W"):
        latent_stats([torch.zeros(3, 8, 8)])


def test_shipped_weights_are_checked(tmp_path, judge: Judge) -> None:
    from relaydiff.quality.judge import JUDGE_DIR

    meta = json.loads((JUDGE_DIR / "config.json").read_text())
    assert meta["dtype"] == "float16" and meta["heldout_accuracy"]["per_fact"] >= 0.98
    copy = tmp_path / "judge"
    shutil.copytree(JUDGE_DIR, copy)
    meta["sha256"] = "0" * 64
    (copy / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="sha256"):
        Judge.from_pretrained(copy)
    with pytest.raises(FileNotFoundError):
        Judge.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="images"):
        prompt_fidelity(np.zeros((2, 32, 32)), [], judge)


def test_training_is_deterministic_and_resumes(tmp_path) -> None:
    cfg = JudgeTrainConfig(
        steps=4, batch_size=8, warmup=2, checkpoint_every=100, model=JudgeConfig(widths=(8, 8, 8), feature_dim=16)
    )
    straight = train_judge(cfg)
    ckpt = tmp_path / "ckpt"
    train_judge(cfg, ckpt, until=2)
    assert json.loads((ckpt / "checkpoint.json").read_text())["step"] == 2
    resumed = train_judge(cfg, ckpt)
    assert json.loads((ckpt / "checkpoint.json").read_text())["step"] == 4
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k
    with pytest.raises(ValueError, match="different training config"):
        train_judge(JudgeTrainConfig(**{**cfg.__dict__, "lr": 1e-4}), ckpt)


def test_logistic_fit_recovers_a_known_curve() -> None:
    from relaydiff.bench.quality import logistic_fit

    x = np.repeat(np.arange(0, 21, 2), 3).astype(float)
    y = 0.6 / (1 + np.exp(0.8 * (x - 9.0))) + 0.3 + np.random.default_rng(0).normal(0, 0.005, len(x))
    fit = logistic_fit(x, y)
    assert fit["ok"] and fit["r2"] > 0.99
    assert fit["L"] == pytest.approx(0.6, abs=0.05) and fit["x0"] == pytest.approx(9.0, abs=0.5)
    assert not logistic_fit([1, 1, 1, 1], [0.1, 0.2, 0.3, 0.4])["ok"]


def test_shared_prefix_variants_stay_valid_scenes() -> None:
    from relaydiff.bench.quality import SHARED_VARIANTS, fidelity_by_objects

    world, rng = World(), np.random.default_rng(0)
    with pytest.raises(ValueError, match="variant kind"):
        world.variant(world.sample_scene(rng), "three_attributes", rng)
    for _ in range(30):
        scene = world.sample_scene(rng, split="heldout")
        for kind in SHARED_VARIANTS:
            v = world.variant(scene, kind, rng)
            assert len({(o.shape, o.color) for o in v.objects}) == len(v.objects)
            if kind == "one_attribute":
                diff = sum((a.shape, a.color) != (b.shape, b.color) for a, b in zip(scene.objects, v.objects))
                assert diff == 1
            world.describe(v, rng)
    scenes = [world.sample_scene(rng, n_objects=n) for n in (1, 2, 3, 3)]
    assert fidelity_by_objects([1.0, 0.5, 0.0, 1.0], scenes) == {"1": 1.0, "2": 0.5, "3": 0.5, "2-3": 0.5}


def test_shared_prefix_measures_followers_of_other_scenes_as_the_env_groups_them(tiny_family, judge: Judge) -> None:
    """The curves hold followers like the QoE env's groups: rounds drawn from a pool as the env
    draws them, grouped at the service's threshold, other scenes' prompts among the followers (the
    own-scene variants alone overrated the env's groups); the bins above the threshold are theirs."""
    from relaydiff.bench.quality import QualityBenchConfig, SHARED_VARIANTS, _default_similarity_bins, _shared_prefix, finite
    from relaydiff.bench.qoe_pool import prompt_pool
    from relaydiff.engine.runner import generate_shared_prefix
    from relaydiff.quality.similarity import prompt_similarity
    from relaydiff.system.grouping import GROUP_THRESHOLD

    cfg = QualityBenchConfig(family="tiny", steps=4, shared_groups=1, shared_pool_rounds=4, shared_x=(0, 4))
    pool, scenes = prompt_pool(cfg.shared_pool_topics, seed=cfg.seed + 305)
    topic = dict(zip(pool.prompts, pool.topics.tolist()))
    calls = []

    def spy(family, reqs, plans, x, leader, max_batch):
        calls.append((x, [r.prompt for r in reqs]))
        return generate_shared_prefix(family, reqs, plans, x, leader=leader, max_batch=max_batch)

    out = _shared_prefix(cfg, tiny_family, World(32), judge, spy, prompt_similarity, lambda _m: None)
    pool_calls = [ps for x, ps in calls if x == 0 and ps[0] in topic]
    assert len(pool_calls) == out["pool"]["groups"] > 0 and len(calls) == 2 * (1 + out["pool"]["groups"])
    other = [(lead, q) for lead, *fs in pool_calls for q in fs if topic[q] != topic[lead]]
    assert len(other) == out["pool"]["followers"]["other_topic"] > 0
    assert all(q != lead for lead, *fs in pool_calls for q in fs)  # a leader's own prompt is not measured
    assert all(len(set(ps)) == len(ps) for ps in pool_calls)  # a prompt runs once per group (chain_owners)
    sims = prompt_similarity([lead for lead, _ in other], [q for _, q in other])
    assert sims.min() >= GROUP_THRESHOLD - 0.01  # grouped: at the threshold or above (fp16 embeddings)
    bins = out["bins"]
    assert bins[1]["similarity"][0] == GROUP_THRESHOLD and bins[-1]["similarity"][1] <= 1.0
    assert sum(b["followers"].get("other_topic", 0) for b in bins[1:]) == len(other)
    assert sum(b["n_requests"] for b in bins) == len(SHARED_VARIANTS) + sum(out["pool"]["followers"].values())
    assert all(len(b["fidelity"]) == 2 and all(0.0 <= f <= 1.0 for f in b["fidelity"]) for b in bins)
    assert set(out["similarity_by_variant"]) == set(SHARED_VARIANTS)
    json.dumps(finite(out), allow_nan=False)
    # no follower above the threshold: terciles of all, as before
    assert _default_similarity_bins(np.array([0.3, 0.5, 0.6, 0.7])) == pytest.approx((0.3, 0.5, 0.6, 0.7))
    assert _default_similarity_bins(np.array([0.5, 0.76, 0.8, 0.9]))[:2] == (0.5, GROUP_THRESHOLD)


def test_recorded_run_matches_the_engine(tiny_family) -> None:
    from relaydiff.engine.plan import Plan, Request
    from relaydiff.engine.runner import generate
    from relaydiff.bench.quality import run_recorded

    family = tiny_family
    reqs = [Request(prompt=p, steps=3, seed=i) for i, p in enumerate(("a red circle", "a blue cross"))]
    plans = [Plan.relay("large", "small", 1, 3)] * 2
    images, latents, wall = run_recorded(family, reqs, plans, max_batch=2)
    expected = generate(family, reqs, plans, max_batch=2)
    assert latents.shape == (4, 2, *family.latent_shape) and wall > 0
    for i, res in enumerate(expected):
        assert torch.allclose(latents[-1, i], res.latents[0], atol=1e-5)
        assert np.abs(images[i].astype(int) - res.image.astype(int)).max() <= 1


def test_relay_curve_with_device_guidance(tiny_family, judge: Judge) -> None:
    """The second relay curve: the device segment without CFG runs one U-Net row a step; k = T has
    no device segment, so both curves agree there."""
    from relaydiff.engine.plan import Plan
    from relaydiff.bench.quality import QualityBenchConfig, _relay_curve, _requests

    cfg = QualityBenchConfig(family="tiny", steps=4, guidance=3.0, repeats=1, timing_batch=2)
    held = World(32).batch(2, seed=3, split="heldout", styles=("plain",))
    reqs = _requests(held.prompts, cfg, seed0=0)
    feats = judge.features(held.images)
    plain, _ = _relay_curve(cfg, tiny_family, judge, held, reqs, feats, (0, 2, 4), None, lambda _m: None)
    off, _ = _relay_curve(cfg, tiny_family, judge, held, reqs, feats, (0, 2, 4), 1.0, lambda _m: None)
    assert off[4]["fidelity"] == plain[4]["fidelity"] and off[4]["fd"] == pytest.approx(plain[4]["fd"])
    assert off[4]["speedup"] == 1.0 and all(e["speedup"] > 0 for e in off.values())
    assert off[0]["fd"] != pytest.approx(plain[0]["fd"])  # a different chain on the device
    assert Plan.relay("large", "small", 2, 4, device_guidance=1.0).segments[1].guidance == 1.0


def test_bench_output_is_strict_json() -> None:
    from relaydiff.bench.quality import finite

    out = finite({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": (2, float("-inf"))}, "e": "x"})
    assert out == {"a": None, "b": [1.0, None], "c": {"d": [2, None]}, "e": "x"}
    json.dumps(out, allow_nan=False)


def test_reconstruct_round_trips_through_the_family_vae(tiny_family) -> None:
    from relaydiff.bench.quality import reconstruct

    family = tiny_family
    images = World().batch(3, seed=0).images
    rec = reconstruct(family, images)
    assert rec.shape == images.shape and rec.dtype == np.uint8
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        direct = family.vae.decode(family.vae.encode(x).latent_dist.mode()).sample
    expected = ((direct.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(rec.astype(int) - expected.astype(int)).max() <= 1


def test_paired_relay_decision_picks_the_smallest_k_within_the_margin() -> None:
    """Pairing: k=4 equals full large up to per-prompt noise that cancels only when paired; k=2 is
    2% worse on every prompt (outside the 1% margin); the pick is the smallest passing k."""
    from relaydiff.bench.quality import paired_relay_decision

    rng = np.random.default_rng(0)
    full = rng.uniform(0.3, 1.0, 256)
    per_image = {8: full, 6: full + rng.normal(0, 0.002, 256), 4: full - 0.002, 2: full - 0.02, 0: full - 0.2}
    d = paired_relay_decision(per_image, 8)
    passes = {e["k"]: e["passes"] for e in d["curve"]}
    assert passes == {0: False, 2: False, 4: True, 6: True, 8: True} and d["k"] == 4
    assert d["curve"][-1]["lower_bound"] == 0.0  # full large against itself
    assert paired_relay_decision({8: full, 0: full - 0.2}, 8)["k"] == 8
    with pytest.raises(ValueError, match="full large"):
        paired_relay_decision({0: full}, 8)
    with pytest.raises(ValueError, match="same ones"):
        paired_relay_decision({8: full, 0: full[:10]}, 8)


def test_step_cost_speedups_are_measured_per_round(tiny_family) -> None:
    from relaydiff.bench.quality import step_cost_speedups

    out = step_cost_speedups(tiny_family, "large", "small", 8, 2, 3.0, 2, (0, 4, 8))
    assert out["repeats"] == 2 and set(out["step_ms"]) == {"large", "small"}
    assert out["speedup"]["8"] == {"median": 1.0, "min": 1.0, "max": 1.0}
    assert out["speedup"]["0"]["min"] <= out["speedup"]["0"]["median"] <= out["speedup"]["0"]["max"]


def test_personalization_measures_the_device_segment_without_guidance(tiny_family, judge: Judge) -> None:
    """Each style's curves at the request's guidance and at the bench's device guidance (the `_g1`
    arms' style curve); k = T has no device segment and is not run twice; the adapter's step cost."""
    from relaydiff.bench.quality import QualityBenchConfig, _personalization
    from relaydiff.engine.runner import generate

    cfg = QualityBenchConfig(family="tiny", steps=4, guidance=3.0, repeats=1, personal_prompts=2,
                             personal_ks=(0, 2, 4), style_adapters={"outline": "style_a"}, device_guidance=1.0)
    calls = []

    def spy(family, reqs, plans, max_batch):
        calls.append(plans[0])
        return generate(family, reqs, plans, max_batch=max_batch)

    out = _personalization(cfg, tiny_family, World(32), judge, spy, lambda _m: None)
    style = out["styles"]["outline"]
    assert out["device_guidance"] == 1.0 and out["split_points"] == [0, 2, 4] and out["prompts_per_style"] == 2
    p0 = style["style_fidelity"][0]
    assert style["device_only_style_fidelity_se"] == pytest.approx((p0 * (1 - p0) / 2) ** 0.5)
    for key in ("style_fidelity", "prompt_fidelity", "style_fidelity_device_guidance",
                "prompt_fidelity_device_guidance"):
        assert len(style[key]) == 3 and all(0.0 <= v <= 1.0 for v in style[key]), key
    assert style["style_fidelity_device_guidance"][2] == style["style_fidelity"][2]  # k = T: the same chain
    device = [p.segments[-1] for p in calls if p.segments[-1].node == "device"]
    assert [(s.start, s.guidance) for s in device] == [(0, None), (0, 1.0), (2, None), (2, 1.0)]
    assert all(s.adapter == "style_a" for s in device) and len(calls) == 5  # k = T run once
    cost = out["adapter_step_cost"]
    assert cost["adapter"] == "style_a" and cost["member"] == "small" and set(cost["by_guidance"]) == {"3", "1"}
    assert set(cost["by_guidance"]["1"]) == {"batch1", "batch8"}
    json.dumps(out, allow_nan=False)

    cfg_off = QualityBenchConfig(family="tiny", steps=4, repeats=1, personal_prompts=2, personal_ks=(0, 4),
                                 style_adapters={"outline": "style_a"}, device_guidance=None)
    off = _personalization(cfg_off, tiny_family, World(32), judge, generate, lambda _m: None)
    assert "device_guidance" not in off and "style_fidelity_device_guidance" not in off["styles"]["outline"]
    assert set(off["adapter_step_cost"]["by_guidance"]) == {"3"}

    # a guidance-distilled small member runs at guidance 1 either way: each k runs once, and the
    # device-guidance curve is the guided one
    calls.clear()
    saved = tiny_family.guidance_distilled
    tiny_family.guidance_distilled = {"small": 3.0}
    try:
        dist = _personalization(cfg, tiny_family, World(32), judge, spy, lambda _m: None)
    finally:
        tiny_family.guidance_distilled = saved
    style = dist["styles"]["outline"]
    assert len(calls) == 3 and [p.segments[-1].guidance for p in calls[:2]] == [None, None]
    assert style["style_fidelity_device_guidance"] == style["style_fidelity"]
    assert style["prompt_fidelity_device_guidance"] == style["prompt_fidelity"]


def test_adapter_step_cost_is_paired_per_round(tiny_family) -> None:
    """Adapter and plain steps alternate in each round; the factor is each round's ratio, so a clock
    that charges the adapter's U-Net calls twice reads about x2."""
    from relaydiff.bench.quality import adapter_step_cost

    family = tiny_family
    now = [0.0]
    real = family.denoise

    def charged(member, adapter, *args, **kwargs):
        now[0] += 2.0 if adapter else 1.0
        return real(member, adapter, *args, **kwargs)

    family.denoise = charged
    try:
        out = adapter_step_cost(family, "small", "style_b", (1, 2), (3.0, 1.0), repeats=3, clock=lambda: now[0])
    finally:
        del family.denoise
    assert out["repeats"] == 3 and out["clock"] == "<lambda>" and set(out["by_guidance"]) == {"3", "1"}
    for g in ("3", "1"):
        for b in ("batch1", "batch2"):
            row = out["by_guidance"][g][b]
            assert row["factor"] == {"median": 2.0, "min": 2.0, "max": 2.0}, (g, b, row)
            assert row["plain_ms"]["median"] == 1000.0 and row["adapter_ms"]["median"] == 2000.0
    with pytest.raises(ValueError, match="unknown adapter"):
        adapter_step_cost(family, "small", "nope")


def test_one_section_is_measured_and_merged_into_a_table(tiny_family) -> None:
    """`--only` runs the named sections alone; `--update` replaces just those in a table, records the
    merge, recomputes the targets, and refuses a table of another family or chain."""
    from relaydiff.bench.quality import QualityBenchConfig, bench_quality, parse_sections, update_table

    assert parse_sections("shared_prefix, judge") == ("judge", "shared_prefix") and parse_sections("") is None
    with pytest.raises(ValueError, match=r"unknown bench quality section\(s\) \['nope'\]"):
        parse_sections("relay,nope")
    cfg = QualityBenchConfig(family="tiny", steps=4, n_judge=20, sections=("judge",))
    part = bench_quality(cfg, family=tiny_family)
    assert part["sections"] == ["judge"] and "judge_accuracy" in part
    assert not {"relay", "members", "vae_ceiling", "shared_prefix", "personalization"} & set(part)
    assert set(part["targets"]) == {"judge_accuracy>=0.98"}

    table = {"family": dict(part["family"]), "config": dict(part["config"], sections=None),
             "judge_accuracy": {"per_fact": 0.5}, "relay": ["kept"], "targets": {"judge_accuracy>=0.98": False}}
    merged = update_table(table, part)
    assert merged["judge_accuracy"] == part["judge_accuracy"] and merged["relay"] == ["kept"]
    assert merged["targets"]["judge_accuracy>=0.98"] == (part["judge_accuracy"]["per_fact"] >= 0.98)
    assert [u["sections"] for u in merged["updates"]] == [["judge"]] and table["judge_accuracy"] == {"per_fact": 0.5}
    assert [u["sections"] for u in update_table(merged, part)["updates"]] == [["judge"], ["judge"]]
    with pytest.raises(ValueError, match="family"):
        update_table(dict(table, family={"id": "other"}), part)
    with pytest.raises(ValueError, match="differ in steps"):
        update_table(dict(table, config=dict(table["config"], steps=20)), part)


def test_device_guidance_curve_of_a_distilled_small_member_is_the_guided_one(tiny_family, judge: Judge,
                                                                             monkeypatch) -> None:
    """A guidance-distilled small member runs at guidance 1 either way: the second relay curve is the
    guided one, read from it rather than generated and timed again; a plain member gets its own run."""
    import relaydiff.bench.quality as bq

    calls = []
    real = bq._relay_curve

    def spy(cfg, family, judge, held, reqs, ref_feats, ks, device_guidance, say):
        calls.append(device_guidance)
        return real(cfg, family, judge, held, reqs, ref_feats, ks, device_guidance, say)

    monkeypatch.setattr(bq, "_relay_curve", spy)
    cfg = bq.QualityBenchConfig(family="tiny", steps=4, n_prompts=3, repeats=1, timing_batch=2,
                                device_guidance=1.0, device_guidance_ks=(0, 2, 4))
    saved = tiny_family.guidance_distilled
    tiny_family.guidance_distilled = {"small": 3.0}
    try:
        out: dict = {}
        bq._relay_section(cfg, tiny_family, World(32), judge, out, lambda _m: None)
    finally:
        tiny_family.guidance_distilled = saved
    dev = out["relay_device_guidance"]
    assert calls == [None] and dev["same_chains_as_relay"] is True
    relay = {e["k"]: e for e in out["relay"]}
    assert [e["k"] for e in dev["relay"]] == [0, 2, 4] and all(e == relay[e["k"]] for e in dev["relay"])

    calls.clear()
    plain: dict = {}
    bq._relay_section(cfg, tiny_family, World(32), judge, plain, lambda _m: None)
    assert calls == [None, 1.0] and plain["relay_device_guidance"]["same_chains_as_relay"] is False
