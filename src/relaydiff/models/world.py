"""A procedural image world with exact labels, on which the reference family and its judge are trained.

Images are small RGB renders of 1 to 3 non-overlapping objects (shape, colour, size, position) on a
coloured background, drawn in one of several user styles. Prompts come from a grammar with
synonyms and paraphrase templates, so that wording and complexity (objects, relations) vary.
Some shape/colour combinations and some templates are held out of the "train" split so that
fidelity can be measured on prompts no model has seen.

Everything is a pure function of a seed: `World.batch(n, seed)` always returns the same images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "cyan")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
STYLES: tuple[str, ...] = ("plain", "outline", "stripes", "pastel", "dark")
BACKGROUNDS: tuple[str, ...] = ("white", "gray", "beige")
SPLITS: tuple[str, ...] = ("train", "heldout")
# how another user's scene relates to a given one (World.variant)
VARIANT_KINDS: tuple[str, ...] = ("paraphrase", "one_attribute", "two_attributes", "unrelated")

# One held-out colour per shape (and each colour at most once): never seen in the train split.
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {("circle", "green"), ("square", "purple"), ("triangle", "cyan"), ("cross", "red")}
)

RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
    "cyan": (30, 190, 200),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (150, 150, 150),
    "beige": (225, 205, 165),
}
# "dark mode" keeps a trace of the background's hue so that the background stays readable.
DARK_BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (22, 22, 26),
    "gray": (62, 62, 66),
    "beige": (58, 44, 26),
}
PASTEL_MIX = 0.5  # fraction of white mixed into every colour in the pastel style
STRIPE_MIX = 0.65  # fraction of white in the light stripes
OUTLINE_FRACTION = 1 / 3  # outline stroke / half-extent (1 px small, 2 px large at 32x32)
SIZE_HALF: dict[str, float] = {"small": 0.125, "large": 0.1875}  # half-extent / image size
RELATION_MARGIN = 0.15  # a stated relation needs this separation (fraction of image size)
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# ---- grammar -------------------------------------------------------------------------------
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
COLOR_WORDS = {
    "red": ("red", "crimson"),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow", "golden"),
    "purple": ("purple", "violet"),
    "cyan": ("cyan", "turquoise"),
}
SHAPE_WORDS = {
    "circle": ("circle", "disk"),
    "square": ("square", "block"),
    "triangle": ("triangle",),
    "cross": ("cross", "plus sign"),
}
BACKGROUND_WORDS = {"white": ("white",), "gray": ("gray", "grey"), "beige": ("beige", "sand-colored")}
RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
# Templates: {a} article, {size} {color} {shape} words. The definite mention ("the red circle")
# is always colour + shape, which is unique in a scene.
OBJECT_TEMPLATES = {
    "train": ("{a} {size} {color} {shape}", "{a} {color} {shape} that is {size}"),
    "heldout": ("{a} {shape}, {size} and {color},",),
}
RELATION_TEMPLATES = {
    "train": ("{A} {rel} {B}", "{A} placed {rel} {B}", "{A} positioned {rel} {B}"),
    "heldout": ("{B} with {A} {rel} it",),
}
FRAME_TEMPLATES = {
    "train": (
        "{body} on a {bg} background",
        "a picture of {body} on a {bg} background",
        "{bg} background with {body}",
        "an image of {body}, {bg} background",
    ),
    "heldout": ("a drawing of {body} against a {bg} backdrop", "on a {bg} canvas: {body}"),
}


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    x: int  # centre, pixels
    y: int


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    relations: tuple[tuple[int, str, int], ...]  # (i, relation, j): object i is <relation> object j
    background: str


@dataclass
class WorldBatch:
    images: np.ndarray  # uint8 [N, H, W, 3]
    prompts: list[str]
    scenes: list[Scene]
    styles: list[str]


def _check(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {tuple(allowed)}")


def relation_holds(a: Obj, rel: str, b: Obj, margin: float = 0.0) -> bool:
    """Whether `a <rel> b` holds between two object centres with at least `margin` pixels."""
    _check(rel, RELATIONS, "relation")
    if rel == "left of":
        return b.x - a.x > margin
    if rel == "right of":
        return a.x - b.x > margin
    if rel == "above":
        return b.y - a.y > margin
    return a.y - b.y > margin


def is_heldout_scene(scene: Scene) -> bool:
    return any((o.shape, o.color) in HELDOUT_COMBOS for o in scene.objects)


class World:
    """Samples scenes, renders them in a style and describes them in words."""

    def __init__(self, image_size: int = 32) -> None:
        if image_size < 16 or image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 and >= 16, got {image_size}")
        self.image_size = image_size
        self.half = {s: max(2, round(f * image_size)) for s, f in SIZE_HALF.items()}
        self.margin = RELATION_MARGIN * image_size
        self._train_combos = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in HELDOUT_COMBOS]
        self._all_combos = [(s, c) for s in SHAPES for c in COLORS]
        self._heldout_combos = sorted(HELDOUT_COMBOS)

    # ---- scenes ----------------------------------------------------------------------------
    def sample_scene(self, rng: np.random.Generator, n_objects: int | None = None, split: str = "train") -> Scene:
        """A random scene; split "heldout" puts at least one held-out shape/colour combination in it."""
        _check(split, SPLITS, "split")
        n = int(rng.integers(1, 4)) if n_objects is None else n_objects
        if not 1 <= n <= 3:
            raise ValueError(f"n_objects must be 1, 2 or 3, got {n}")
        combos = self._pick_combos(rng, n, split)
        sizes = [SIZES[int(rng.integers(len(SIZES)))] for _ in range(n)]
        positions = self._place(rng, sizes)
        objects = tuple(Obj(s, c, z, x, y) for (s, c), z, (x, y) in zip(combos, sizes, positions))
        relations = self._pick_relations(rng, objects)
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        return Scene(objects=objects, relations=relations, background=background)

    def variant(self, scene: Scene, kind: str, rng: np.random.Generator) -> Scene:
        """A scene like ``scene`` for another user: ``kind`` in ``VARIANT_KINDS`` ("paraphrase": the
        same scene, to be described anew; "one_attribute"/"two_attributes": that many objects' colour
        or shape changed, combinations kept distinct; "unrelated": a fresh held-out scene)."""
        _check(kind, VARIANT_KINDS, "variant kind")
        if kind == "paraphrase":
            return scene
        if kind == "unrelated":
            return self.sample_scene(rng, split="heldout")
        objs = list(scene.objects)
        for _ in range(1 if kind == "one_attribute" else 2):
            i = int(rng.integers(len(objs)))
            taken = {(o.shape, o.color) for o in objs}
            if rng.random() < 0.5:
                options = [c for c in COLORS if (objs[i].shape, c) not in taken]
                objs[i] = replace(objs[i], color=options[int(rng.integers(len(options)))])
            else:
                options = [s for s in SHAPES if (s, objs[i].color) not in taken]
                objs[i] = replace(objs[i], shape=options[int(rng.integers(len(options)))])
        return replace(scene, objects=tuple(objs))

    def _pick_combos(self, rng: np.random.Generator, n: int, split: str) -> list[tuple[str, str]]:
        if split == "train":
            idx = rng.choice(len(self._train_combos), size=n, replace=False)
            return [self._train_combos[i] for i in idx]
        first = self._heldout_combos[int(rng.integers(len(self._heldout_combos)))]
        rest = [c for c in self._all_combos if c != first]
        idx = rng.choice(len(rest), size=n - 1, replace=False)
        combos = [first] + [rest[i] for i in idx]
        order = rng.permutation(n)
        return [combos[i] for i in order]

    def _place(self, rng: np.random.Generator, sizes: list[str]) -> list[tuple[int, int]]:
        """Rejection-sample centres so that bounding boxes keep at least one pixel apart."""
        size = self.image_size
        for _ in range(1000):
            placed: list[tuple[int, int, int]] = []
            for z in sizes:
                h = self.half[z]
                candidates = rng.integers(h, size - h, size=(64, 2))
                ok = np.ones(len(candidates), dtype=bool)
                for px, py, ph in placed:
                    ok &= np.abs(candidates - (px, py)).max(axis=1) >= h + ph + 2
                hits = np.flatnonzero(ok)
                if not len(hits):
                    break
                x, y = candidates[hits[0]]
                placed.append((int(x), int(y), h))
            if len(placed) == len(sizes):
                return [(x, y) for x, y, _ in placed]
        raise RuntimeError("could not place objects without overlap")  # pragma: no cover

    def _pick_relations(self, rng: np.random.Generator, objects: tuple[Obj, ...]) -> tuple[tuple[int, str, int], ...]:
        n = len(objects)
        if n == 1:
            return ()
        pairs = [(0, 1)] if n == 2 else [(0, 1), (1, 2), (0, 2)]
        count = int(rng.integers(0, n))  # 0..n-1 stated relations
        chosen = [pairs[i] for i in sorted(rng.choice(len(pairs), size=count, replace=False))]
        relations = []
        for i, j in chosen:
            valid = [r for r in RELATIONS if relation_holds(objects[i], r, objects[j], self.margin)]
            relations.append((i, valid[int(rng.integers(len(valid)))], j))
        return tuple(relations)

    # ---- rendering -------------------------------------------------------------------------
    def render(self, scene: Scene, style: str = "plain") -> np.ndarray:
        return self.render_many([scene], [style])[0]

    def render_many(self, scenes: Sequence[Scene], styles: Sequence[str]) -> np.ndarray:
        """Vectorized renderer: uint8 [N, H, W, 3] (tens of thousands of images per second)."""
        if len(scenes) != len(styles):
            raise ValueError(f"got {len(scenes)} scenes but {len(styles)} styles")
        for st in styles:
            _check(st, STYLES, "style")
        out = np.empty((len(scenes), self.image_size, self.image_size, 3), dtype=np.uint8)
        chunk = 2048
        for start in range(0, len(scenes), chunk):
            out[start : start + chunk] = self._render_chunk(scenes[start : start + chunk], styles[start : start + chunk])
        return out

    def _render_chunk(self, scenes: Sequence[Scene], styles: Sequence[str]) -> np.ndarray:
        n, size, k = len(scenes), self.image_size, 3
        shape_id = np.full((n, k), -1, dtype=np.int64)
        rgb = np.zeros((n, k, 3), dtype=np.float32)
        half = np.zeros((n, k), dtype=np.float32)
        cx = np.zeros((n, k), dtype=np.float32)
        cy = np.zeros((n, k), dtype=np.float32)
        bg = np.zeros((n, 3), dtype=np.float32)
        style_arr = np.array([STYLES.index(s) for s in styles])
        for i, (scene, style) in enumerate(zip(scenes, styles)):
            table = DARK_BACKGROUND_RGB if style == "dark" else BACKGROUND_RGB
            bg[i] = table[scene.background]
            for j, o in enumerate(scene.objects):
                shape_id[i, j] = SHAPES.index(o.shape)
                rgb[i, j] = RGB[o.color]
                half[i, j] = self.half[o.size]
                cx[i, j], cy[i, j] = o.x, o.y
        pastel = (style_arr == STYLES.index("pastel"))[:, None]
        bg = np.where(pastel, bg * (1 - PASTEL_MIX) + 255 * PASTEL_MIX, bg)
        rgb = np.where(pastel[:, :, None], rgb * (1 - PASTEL_MIX) + 255 * PASTEL_MIX, rgb)

        grid = np.arange(size, dtype=np.float32)
        dx = grid[None, None, None, :] - cx[:, :, None, None]  # [n, k, 1, W]
        dy = grid[None, None, :, None] - cy[:, :, None, None]  # [n, k, H, 1]
        mask = self._shape_mask(shape_id, half, dx, dy, inset=0.0)
        outline = (style_arr == STYLES.index("outline"))[:, None, None, None]
        stroke = np.maximum(1.0, np.round(half * OUTLINE_FRACTION))
        inner = self._shape_mask(shape_id, half, dx, dy, inset=stroke)
        mask = mask & ~(outline & inner)

        img = np.broadcast_to(bg[:, None, None, :], (n, size, size, 3)).copy()
        colour = np.broadcast_to(rgb[:, :, None, None, :], (n, k, size, size, 3))
        stripes = (style_arr == STYLES.index("stripes"))[:, None, None, None]
        light = ((grid[:, None] + grid[None, :]) // 2 % 2 == 1)[None, None, :, :]
        striped = stripes & light  # [n, 1, H, W]
        for j in range(k):
            c = colour[:, j]
            c = np.where(striped[:, 0, :, :, None], c * (1 - STRIPE_MIX) + 255 * STRIPE_MIX, c)
            img = np.where(mask[:, j, :, :, None], c, img)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)

    @staticmethod
    def _shape_mask(
        shape_id: np.ndarray, half: np.ndarray, dx: np.ndarray, dy: np.ndarray, inset: float | np.ndarray
    ) -> np.ndarray:
        """Boolean [n, k, H, W] masks; `inset` shrinks each shape by that many pixels (for outlines)."""
        inset = np.broadcast_to(np.asarray(inset, dtype=np.float32), half.shape)
        h = (half - inset)[:, :, None, None]
        h0 = half[:, :, None, None]
        ax, ay = np.abs(dx), np.abs(dy)
        circle = dx**2 + dy**2 <= (h + 0.5) ** 2
        square = (ax <= h) & (ay <= h)
        # upward triangle inscribed in the full box, shrunk by `inset` along its edges
        slope = np.sqrt(5.0) / 2.0  # distance scale of the 2:1 slanted edges
        d = inset[:, :, None, None]
        triangle = (dy <= h0 - d) & (2 * ax - (dy + h0) <= -d * 2 * slope)
        arm = np.round(half * 0.34)[:, :, None, None] - d
        cross = ((ax <= arm) & (ay <= h)) | ((ay <= arm) & (ax <= h))
        sid = shape_id[:, :, None, None]
        out = np.zeros(np.broadcast_shapes(dx.shape, dy.shape), dtype=bool)
        for index, m in enumerate((circle, square, triangle, cross)):
            out |= (sid == index) & m
        return out

    # ---- language --------------------------------------------------------------------------
    def describe(self, scene: Scene, rng: np.random.Generator, split: str = "train") -> str:
        """A paraphrased prompt that asserts exactly `facts(scene)`; split "heldout" uses held-out frames."""
        _check(split, SPLITS, "split")
        pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
        heldout = split == "heldout"
        obj_templates = OBJECT_TEMPLATES["train"] + (OBJECT_TEMPLATES["heldout"] if heldout else ())
        rel_templates = RELATION_TEMPLATES["train"] + (RELATION_TEMPLATES["heldout"] if heldout else ())
        mentioned: set[int] = set()

        def mention(i: int) -> str:
            o = scene.objects[i]
            color, shape = pick(COLOR_WORDS[o.color]), pick(SHAPE_WORDS[o.shape])
            if i in mentioned:
                return f"the {color} {shape}"
            mentioned.add(i)
            phrase = pick(obj_templates).format(a="{a}", size=pick(SIZE_WORDS[o.size]), color=color, shape=shape)
            return phrase.replace("{a}", "an" if phrase[4:5] in "aeiou" else "a", 1)

        clauses = []
        for i, rel, j in scene.relations:
            if rng.random() < 0.5:  # say it the other way round
                i, rel, j = j, INVERSE_RELATION[rel], i
            template = pick(rel_templates)
            if template.index("{A}") < template.index("{B}"):
                a_text = mention(i)
                b_text = mention(j)
            else:
                b_text = mention(j)
                a_text = mention(i)
            clauses.append(template.format(A=a_text, B=b_text, rel=pick(RELATION_WORDS[rel])))
        for i in range(len(scene.objects)):
            if i not in mentioned:
                clauses.append(mention(i))
        if len(clauses) == 1:
            body = clauses[0]
        else:
            joiner = pick((", ", " and ", "; "))
            body = joiner.join(clauses[:-1]) + pick((" and ", ", and ", "; ")) + clauses[-1]
        frame = pick(FRAME_TEMPLATES["heldout"] if heldout else FRAME_TEMPLATES["train"])
        text = frame.format(body=body, bg=pick(BACKGROUND_WORDS[scene.background]))
        return " ".join(text.replace(",,", ",").replace(",:", ":").split())

    @staticmethod
    def facts(scene: Scene) -> list[tuple]:
        """What the prompt of a scene asserts: object count, each object's attributes, stated relations, background."""
        out: list[tuple] = [("count", len(scene.objects))]
        for i, o in enumerate(scene.objects):
            out += [("shape", i, o.shape), ("color", i, o.color), ("size", i, o.size)]
        out += [("relation", i, rel, j) for i, rel, j in scene.relations]
        out.append(("background", scene.background))
        return out

    # ---- datasets --------------------------------------------------------------------------
    def batch(self, n: int, seed: int, split: str = "train", styles: Sequence[str] = ("plain",)) -> WorldBatch:
        """`n` (image, prompt) pairs, a pure function of the arguments.

        In the "heldout" split every item is held out in at least one way: a held-out shape/colour
        combination, a held-out paraphrase template, or both (one third each).
        """
        _check(split, SPLITS, "split")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if not styles:
            raise ValueError("styles must not be empty")
        for st in styles:
            _check(st, STYLES, "style")
        rng = np.random.default_rng(seed)
        scenes, prompts, chosen = [], [], []
        for _ in range(n):
            if split == "train":
                scene_split = text_split = "train"
            else:
                kind = int(rng.integers(3))  # 0: combination, 1: template, 2: both
                scene_split = "heldout" if kind in (0, 2) else "train"
                text_split = "heldout" if kind in (1, 2) else "train"
            scene = self.sample_scene(rng, split=scene_split)
            scenes.append(scene)
            prompts.append(self.describe(scene, rng, split=text_split))
            chosen.append(styles[int(rng.integers(len(styles)))])
        return WorldBatch(images=self.render_many(scenes, chosen), prompts=prompts, scenes=scenes, styles=chosen)
