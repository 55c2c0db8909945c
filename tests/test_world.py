"""The procedural world: determinism, exact labels, grammar, held-out split, styles."""

from __future__ import annotations

import re

import numpy as np
import pytest

from relaydiff.models.world import (
    BACKGROUND_RGB,
    COLOR_WORDS,
    COLORS,
    HELDOUT_COMBOS,
    RGB,
    SHAPE_WORDS,
    SHAPES,
    STYLES,
    Obj,
    Scene,
    World,
    is_heldout_scene,
    relation_holds,
)

# what only held-out templates say: their frames, "<B> with <A> left of it", "a circle, small and red,"
HELDOUT_PATTERNS = (r"backdrop", r"canvas", r"\bit\b", r", (small|little|tiny|large|big|huge) and ")


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def test_batch_is_deterministic_and_well_formed(world: World) -> None:
    a = world.batch(64, seed=3, styles=STYLES)
    b = world.batch(64, seed=3, styles=STYLES)
    c = world.batch(64, seed=4, styles=STYLES)
    assert a.images.shape == (64, 32, 32, 3) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images) and a.prompts == b.prompts and a.scenes == b.scenes
    assert not np.array_equal(a.images, c.images)
    assert len(a.prompts) == len(a.scenes) == len(a.styles) == 64
    assert set(a.styles) <= set(STYLES) and len(set(a.styles)) > 1


def test_scenes_are_valid(world: World) -> None:
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(300):
        scene = world.sample_scene(rng)
        n = len(scene.objects)
        counts.add(n)
        assert 1 <= n <= 3
        assert len({(o.shape, o.color) for o in scene.objects}) == n  # unique definite references
        for i, a in enumerate(scene.objects):
            ha = world.half[a.size]
            assert ha <= a.x < 32 - ha and ha <= a.y < 32 - ha
            for b in scene.objects[i + 1 :]:
                hb = world.half[b.size]
                assert max(abs(a.x - b.x), abs(a.y - b.y)) >= ha + hb + 2  # boxes never overlap
        for i, rel, j in scene.relations:
            assert relation_holds(scene.objects[i], rel, scene.objects[j], world.margin)
        assert not is_heldout_scene(scene)
    assert counts == {1, 2, 3}


def test_facts_and_prompt_agree(world: World) -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = world.sample_scene(rng)
        prompt = world.describe(scene, rng)
        facts = world.facts(scene)
        assert ("count", len(scene.objects)) in facts and ("background", scene.background) in facts
        assert sum(f[0] == "relation" for f in facts) == len(scene.relations)
        for o in scene.objects:
            assert any(w in prompt for w in COLOR_WORDS[o.color])
            assert any(w in prompt for w in SHAPE_WORDS[o.shape])
        assert not any(re.search(p, prompt) for p in HELDOUT_PATTERNS), prompt


def test_prompts_vary_in_wording(world: World) -> None:
    rng = np.random.default_rng(2)
    scene = world.sample_scene(rng, n_objects=3)
    prompts = {world.describe(scene, rng) for _ in range(50)}
    assert len(prompts) > 20


def test_heldout_split_is_always_held_out(world: World) -> None:
    batch = world.batch(300, seed=5, split="heldout")
    kinds = {"combo": 0, "template": 0}
    for scene, prompt in zip(batch.scenes, batch.prompts):
        combo = is_heldout_scene(scene)
        template = "backdrop" in prompt or "canvas" in prompt
        assert combo or template, prompt
        assert any(re.search(p, prompt) for p in HELDOUT_PATTERNS) or combo
        kinds["combo"] += combo
        kinds["template"] += template
    assert min(kinds.values()) > 100
    train = world.batch(300, seed=5, split="train")
    assert not any(is_heldout_scene(s) for s in train.scenes)
    assert all((o.shape, o.color) not in HELDOUT_COMBOS for s in train.scenes for o in s.objects)


def test_render_colours_exact_pixels(world: World) -> None:
    objs = (Obj("square", "red", "large", 8, 8), Obj("circle", "blue", "small", 24, 24))
    scene = Scene(objects=objs, relations=((0, "above", 1),), background="gray")
    img = world.render(scene, "plain")
    assert tuple(img[8, 8]) == RGB["red"] and tuple(img[24, 24]) == RGB["blue"]
    assert tuple(img[0, 31]) == BACKGROUND_RGB["gray"]
    outline = world.render(scene, "outline")
    assert tuple(outline[8, 8]) == BACKGROUND_RGB["gray"] and tuple(outline[8, 2]) == RGB["red"]
    dark = world.render(scene, "dark")
    assert dark[0, 31].mean() < 80 and tuple(dark[8, 8]) == RGB["red"]
    pastel = world.render(scene, "pastel")
    assert pastel[8, 8].min() > 100
    stripes = world.render(scene, "stripes")
    assert len({tuple(p) for p in stripes[4:13, 4:13].reshape(-1, 3)}) == 2
    renders = [world.render(scene, s) for s in STYLES]
    for i in range(len(STYLES)):
        for j in range(i + 1, len(STYLES)):
            assert not np.array_equal(renders[i], renders[j])


def test_every_shape_and_colour_renders_distinctly(world: World) -> None:
    seen = set()
    for shape in SHAPES:
        for size in ("small", "large"):
            img = world.render(Scene((Obj(shape, "green", size, 16, 16),), (), "white"))
            seen.add(img.tobytes())
            assert (img != BACKGROUND_RGB["white"]).any(axis=-1).sum() > 20
    assert len(seen) == 2 * len(SHAPES)
    colours = {tuple(world.render(Scene((Obj("square", c, "large", 16, 16),), (), "white"))[16, 16]) for c in COLORS}
    assert len(colours) == len(COLORS)


def test_bad_input_raises(world: World) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="style"):
        world.batch(2, seed=0, styles=("neon",))
    with pytest.raises(ValueError, match="split"):
        world.sample_scene(rng, split="test")
    with pytest.raises(ValueError, match="n_objects"):
        world.sample_scene(rng, n_objects=4)
    with pytest.raises(ValueError, match="image_size"):
        World(image_size=30)
    with pytest.raises(ValueError, match="relation"):
        relation_holds(Obj("square", "red", "large", 8, 8), "near", Obj("square", "red", "large", 8, 8))
