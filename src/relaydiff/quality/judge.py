"""The judge: a small CNN that reads a world image back into objects, relations, background and style.

It is a centre-point detector (one cell of an 8x8 grid per object centre, as in CenterNet) built so
that shape and colour are read by separate paths that cannot see each other's attribute, because
some shape/colour combinations are held out of its training data and must still be read:

- a pixel path (1x1 convolutions: it sees one pixel at a time, hence no shapes) gives every pixel
  a colour embedding and a foreground probability;
- the shape path is a CNN on the foreground map only (hence no colours): per cell it predicts
  "an object is centred here", a sub-cell offset, the shape and the size;
- the colour of an object is read from the pixel embeddings in a window around its centre
  (a learned spatial weighting, linear in the pixels), then a small MLP;
- pooled features of both paths predict the background and the style, and are the features of
  the Fréchet distance.

Relations are derived from the read centres. Extra "none" classes for background and style,
trained on noise images, let the judge say that an image is not a world image (noise scores ~0).
Training samples fresh renders every step (train split, every style) with mild blur/noise so that
the judge also reads the slightly soft images a diffusion model produces; it is deterministic by
seed, checkpoints to safetensors + JSON and resumes. The shipped weights live in
``relaydiff/assets/judge`` (fp16 safetensors + config JSON): tests and benches never retrain.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from relaydiff.models.world import BACKGROUNDS, COLORS, SHAPES, SIZES, STYLES, Obj, Scene, World
from relaydiff.shipped import read_json

NONE = "none"  # background/style class of images that are not world images
JUDGE_DIR = Path(__file__).resolve().parent.parent / "assets" / "judge"
WEIGHTS_NAME = "judge.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class JudgeConfig:
    """Architecture of the judge (saved next to its weights)."""

    image_size: int = 32
    stride: int = 4
    widths: tuple[int, int, int] = (16, 32, 64)
    pixel_dim: int = 32
    color_window: int = 11  # pixels; < the smallest gap between a centre and another object's pixels
    feature_dim: int = 128
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = COLORS
    sizes: tuple[str, ...] = SIZES
    backgrounds: tuple[str, ...] = BACKGROUNDS + (NONE,)
    styles: tuple[str, ...] = STYLES + (NONE,)

    @classmethod
    def from_dict(cls, d: dict) -> JudgeConfig:
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    size: str
    x: float  # centre, pixels
    y: float
    score: float

    def as_obj(self) -> Obj:
        return Obj(self.shape, self.color, self.size, round(self.x), round(self.y))


@dataclass(frozen=True)
class Reading:
    """What the judge sees in one image."""

    objects: tuple[Detection, ...]
    background: str
    style: str


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())


class Judge(nn.Module):
    def __init__(self, config: JudgeConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or JudgeConfig()
        if config.image_size // config.stride < 2 or config.stride != 4 or config.color_window % 2 == 0:
            raise ValueError(f"the judge needs stride 4, image_size >= 8 and an odd color_window, got {config}")
        w1, w2, w3 = config.widths
        pd, win = config.pixel_dim, config.color_window
        self.pixel = nn.Sequential(nn.Conv2d(3, pd, 1), nn.SiLU(), nn.Conv2d(pd, pd, 1), nn.SiLU())
        self.foreground_head = nn.Conv2d(pd, 1, 1)
        self.color_kernel = nn.Parameter(torch.full((win, win, pd), 1.0 / win**2))
        self.n_shape, self.n_color, self.n_size = len(config.shapes), len(config.colors), len(config.sizes)
        self.color_head = nn.Sequential(nn.Linear(pd, 64), nn.SiLU(), nn.Linear(64, self.n_color))
        self.backbone = nn.Sequential(  # on the foreground map; receptive field 29 px at the 8x8 grid
            _block(1, w1),
            _block(w1, w2, stride=2),
            _block(w2, w2),
            _block(w2, w3, stride=2),
            _block(w3, w3),
            _block(w3, w3),
        )
        self.cell_head = nn.Conv2d(w3, 3 + self.n_shape + self.n_size, 1)
        self.feature = nn.Sequential(nn.Linear(2 * pd + 2 * w3, config.feature_dim), nn.SiLU())
        self.background_head = nn.Linear(config.feature_dim, len(config.backgrounds))
        self.style_head = nn.Linear(config.feature_dim, len(config.styles))

    @staticmethod
    def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, 3] (numpy or torch) -> float [N, 3, H, W] in [-1, 1]."""
        x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected images [N, H, W, 3], got shape {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pix = self.pixel(x)
        fg = self.foreground_head(pix)[:, 0]
        # detached: the shape path must not be able to ask the pixel path for colour information
        h = self.backbone(torch.sigmoid(fg).detach()[:, None] * 2 - 1)
        cells = self.cell_head(h)
        s = self.n_shape
        pooled = torch.cat([pix.mean(dim=(2, 3)), pix.amax(dim=(2, 3)), h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], 1)
        feat = self.feature(pooled)
        return {
            "pixel": pix,
            "foreground": fg,
            "objectness": cells[:, 0],
            "offset": cells[:, 1:3],
            "shape": cells[:, 3 : 3 + s],
            "size": cells[:, 3 + s :],
            "features": feat,
            "background": self.background_head(feat),
            "style": self.style_head(feat),
        }

    def color_logits(self, pixel: torch.Tensor, b: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Colour logits [n, colours] of objects centred at pixels (y, x) of images b."""
        r = self.config.color_window // 2
        padded = F.pad(pixel, (r, r, r, r))  # zero outside the image
        d = torch.arange(2 * r + 1)
        ys = (y.long()[:, None, None] + d[None, :, None]).expand(-1, 2 * r + 1, 2 * r + 1)
        xs = (x.long()[:, None, None] + d[None, None, :]).expand(-1, 2 * r + 1, 2 * r + 1)
        patches = padded.permute(0, 2, 3, 1)[b.long()[:, None, None], ys, xs]  # [n, win, win, pd]
        return self.color_head((patches * self.color_kernel).sum(dim=(1, 2)))

    @torch.no_grad()
    def read(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> list[Reading]:
        """Read objects (objectness > 0.5 and a local maximum), background and style of each image."""
        self.eval()
        cfg = self.config
        size_px = cfg.image_size
        out: list[Reading] = []
        x_all = self.to_input(images)
        for start in range(0, len(x_all), batch_size):
            o = self(x_all[start : start + batch_size])
            prob = torch.sigmoid(o["objectness"])
            peak = prob == F.max_pool2d(prob[:, None], 3, stride=1, padding=1)[:, 0]
            b_idx, gy, gx = ((prob > 0.5) & peak).nonzero(as_tuple=True)
            cx = cfg.stride * (gx + o["offset"][b_idx, 0, gy, gx])
            cy = cfg.stride * (gy + o["offset"][b_idx, 1, gy, gx])
            px = cx.round().clamp(0, size_px - 1)
            py = cy.round().clamp(0, size_px - 1)
            color = self.color_logits(o["pixel"], b_idx, py, px).argmax(1) if len(b_idx) else b_idx
            shape = o["shape"][b_idx, :, gy, gx].argmax(1)
            size = o["size"][b_idx, :, gy, gx].argmax(1)
            score = prob[b_idx, gy, gx]
            bg, style = o["background"].argmax(1), o["style"].argmax(1)
            dets: list[list[Detection]] = [[] for _ in range(len(prob))]
            for i, b in enumerate(b_idx.tolist()):
                dets[b].append(
                    Detection(cfg.shapes[shape[i]], cfg.colors[color[i]], cfg.sizes[size[i]],
                              float(cx[i]), float(cy[i]), float(score[i]))  # fmt: skip
                )
            for b in range(len(prob)):
                dets[b].sort(key=lambda d: -d.score)
                out.append(Reading(tuple(dets[b]), cfg.backgrounds[bg[b]], cfg.styles[style[b]]))
        return out

    @torch.no_grad()
    def features(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Pooled penultimate features [N, feature_dim] (float64), for Fréchet distances."""
        self.eval()
        x_all = self.to_input(images)
        chunks = [self(x_all[i : i + batch_size])["features"] for i in range(0, len(x_all), batch_size)]
        return torch.cat(chunks).double().numpy() if chunks else np.zeros((0, self.config.feature_dim))

    # ---- save / load -----------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, extra: dict | None = None, dtype: torch.dtype = torch.float16) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))
        digest = hashlib.sha256((directory / WEIGHTS_NAME).read_bytes()).hexdigest()
        meta = {"config": asdict(self.config), "sha256": digest, "dtype": str(dtype).removeprefix("torch."), **(extra or {})}
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path | None = None) -> Judge:
        """Load a judge (the shipped one by default); checks the weights' hash against the config."""
        directory = Path(directory) if directory is not None else JUDGE_DIR
        cfg_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not cfg_path.is_file() or not weights.is_file():
            raise FileNotFoundError(f"no judge in {directory} (need {CONFIG_NAME} and {WEIGHTS_NAME})")
        meta = read_json(cfg_path, "judge config", ValueError)
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        if meta.get("sha256") not in (None, digest):
            raise ValueError(f"judge weights in {directory} do not match the sha256 in {CONFIG_NAME}")
        judge = cls(JudgeConfig.from_dict(meta["config"]))
        state = {k: v.float() for k, v in load_file(str(weights)).items()}
        judge.load_state_dict(state)
        judge.eval()
        return judge


_SHIPPED: Judge | None = None


def load_judge(directory: str | Path | None = None) -> Judge:
    """The shipped judge (cached), or a judge from `directory`."""
    global _SHIPPED
    if directory is not None:
        return Judge.from_pretrained(directory)
    if _SHIPPED is None:
        _SHIPPED = Judge.from_pretrained()
    return _SHIPPED


# ---- training ------------------------------------------------------------------------------
@dataclass
class JudgeTrainConfig:
    """All hyperparameters of judge training, in one place."""

    seed: int = 0
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    negative_fraction: float = 0.08  # noise images labelled "none"
    augment_fraction: float = 0.5  # share of images blurred and/or noised
    max_noise: float = 0.08  # std of added Gaussian noise, in [-1, 1] units
    objectness_pos_weight: float = 4.0
    checkpoint_every: int = 250
    eval_size: int = 2000
    threads: int = 1
    model: JudgeConfig = field(default_factory=JudgeConfig)


def _background_colors(world: World) -> dict[tuple[str, str], np.ndarray]:
    """The rendered background colour of every (background, style): a render with no objects."""
    empty = [Scene((), (), bg) for bg in BACKGROUNDS for _ in STYLES]
    styles = [st for _ in BACKGROUNDS for st in STYLES]
    images = world.render_many(empty, styles)
    return {(sc.background, st): img[0, 0] for sc, st, img in zip(empty, styles, images)}


def _targets(world: World, images: np.ndarray, scenes, styles, cfg: JudgeConfig) -> dict[str, torch.Tensor]:
    n, g = len(scenes), cfg.image_size // cfg.stride
    obj = torch.zeros(n, g, g)
    offset = torch.zeros(n, 2, g, g)
    shape = torch.full((n, g, g), -100, dtype=torch.long)  # -100: ignored by cross_entropy
    size = shape.clone()
    centres = []  # (image, y, x, colour) of every object
    for b, scene in enumerate(scenes):
        for o in scene.objects:
            gx, gy = o.x // cfg.stride, o.y // cfg.stride
            obj[b, gy, gx] = 1.0
            offset[b, 0, gy, gx] = o.x / cfg.stride - gx
            offset[b, 1, gy, gx] = o.y / cfg.stride - gy
            shape[b, gy, gx] = cfg.shapes.index(o.shape)
            size[b, gy, gx] = cfg.sizes.index(o.size)
            centres.append((b, o.y, o.x, cfg.colors.index(o.color)))
    bg_rgb = _background_colors(world)
    bgs = np.stack([bg_rgb[(s.background, st)] for s, st in zip(scenes, styles)])
    foreground = torch.from_numpy((images != bgs[:, None, None, :]).any(-1).astype(np.float32))
    c = torch.tensor(centres, dtype=torch.long).reshape(-1, 4)
    return {"objectness": obj, "offset": offset, "shape": shape, "size": size, "foreground": foreground,
            "foreground_valid": torch.ones(n), "centre_b": c[:, 0], "centre_y": c[:, 1], "centre_x": c[:, 2],
            "color": c[:, 3],
            "background": torch.tensor([cfg.backgrounds.index(s.background) for s in scenes]),
            "style": torch.tensor([cfg.styles.index(s) for s in styles])}  # fmt: skip


def noise_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Non-world images in [-1, 1]: white noise, smooth noise and blobs of colour."""
    raw = torch.rand(n, 3, size, size, generator=generator) * 2 - 1
    kind = torch.randint(0, 3, (n,), generator=generator)
    smooth = F.interpolate(torch.rand(n, 3, size // 4, size // 4, generator=generator) * 2 - 1, size=size, mode="bilinear")
    coarse = F.interpolate(torch.rand(n, 3, size // 8, size // 8, generator=generator) * 2 - 1, size=size, mode="nearest")
    out = torch.where((kind == 0)[:, None, None, None], raw, smooth)
    return torch.where((kind == 2)[:, None, None, None], coarse, out)


def _augment(x: torch.Tensor, cfg: JudgeTrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Mild blur and noise, as in decoded diffusion samples, on a random share of the batch."""
    n = len(x)
    chosen = torch.rand(n, generator=generator) < cfg.augment_fraction
    kernel = torch.tensor([0.25, 0.5, 0.25])
    k2 = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=3)
    amount = torch.rand(n, 1, 1, 1, generator=generator)
    soft = x + amount * (blurred - x)
    noisy = soft + torch.randn(x.shape, generator=generator) * cfg.max_noise * torch.rand(n, 1, 1, 1, generator=generator)
    return torch.where(chosen[:, None, None, None], noisy.clamp(-1, 1), x)


def judge_loss(judge: Judge, out: dict[str, torch.Tensor], t: dict[str, torch.Tensor], pos_weight: float) -> torch.Tensor:
    obj = F.binary_cross_entropy_with_logits(out["objectness"], t["objectness"], pos_weight=torch.tensor(pos_weight))
    pos = t["objectness"].bool()
    n_pos = pos.sum().clamp(min=1)
    offset = (F.smooth_l1_loss(out["offset"], t["offset"], reduction="none", beta=0.1).sum(1) * pos).sum() / n_pos
    attrs = sum(F.cross_entropy(out[k], t[k], ignore_index=-100) for k in ("shape", "size"))
    fg = F.binary_cross_entropy_with_logits(out["foreground"], t["foreground"], reduction="none").mean(dim=(1, 2))
    fg = (fg * t["foreground_valid"]).sum() / t["foreground_valid"].sum().clamp(min=1)
    color = out["pixel"].sum() * 0.0
    if len(t["color"]):
        logits = judge.color_logits(out["pixel"], t["centre_b"], t["centre_y"], t["centre_x"])
        color = F.cross_entropy(logits, t["color"])
    glob = F.cross_entropy(out["background"], t["background"]) + F.cross_entropy(out["style"], t["style"])
    return obj + offset + attrs + fg + color + glob


def _training_batch(world: World, cfg: JudgeTrainConfig, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch of `step`: a pure function of (seed, step), so that a resumed run sees the same data."""
    seed = cfg.seed * 1_000_003 + step
    batch = world.batch(cfg.batch_size, seed=seed, split="train", styles=STYLES)
    gen = torch.Generator().manual_seed(seed)
    x = _augment(Judge.to_input(batch.images), cfg, gen)
    t = _targets(world, batch.images, batch.scenes, batch.styles, cfg.model)
    # read colours around slightly wrong centres too, as at inference (centres come from the detector)
    size = cfg.model.image_size
    jitter = torch.randint(-1, 2, (2, len(t["color"])), generator=gen)
    t["centre_y"] = (t["centre_y"] + jitter[0]).clamp(0, size - 1)
    t["centre_x"] = (t["centre_x"] + jitter[1]).clamp(0, size - 1)
    neg = torch.rand(len(x), generator=gen) < cfg.negative_fraction
    if neg.any():
        x[neg] = noise_images(int(neg.sum()), size, gen)
        t["objectness"][neg] = 0.0
        for k in ("shape", "size"):
            t[k][neg] = -100
        t["foreground_valid"][neg] = 0.0
        keep = ~neg[t["centre_b"]]
        for k in ("centre_b", "centre_y", "centre_x", "color"):
            t[k] = t[k][keep]
        t["background"][neg] = cfg.model.backgrounds.index(NONE)
        t["style"][neg] = cfg.model.styles.index(NONE)
    return x, t


def _save_checkpoint(path: Path, judge: Judge, opt: torch.optim.Optimizer, step: int, cfg: JudgeTrainConfig) -> None:
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in judge.state_dict().items()}
    for i, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            tensors[f"optim.{i}.{k}"] = torch.as_tensor(v).contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "checkpoint.safetensors"))
    (path / "checkpoint.json").write_text(json.dumps({"step": step, "train_config": _jsonable(cfg)}, indent=2))


def _load_checkpoint(path: Path, judge: Judge, opt: torch.optim.Optimizer, cfg: JudgeTrainConfig) -> int:
    meta = json.loads((path / "checkpoint.json").read_text())
    if meta["train_config"] != _jsonable(cfg):
        raise ValueError(f"checkpoint in {path} was made with a different training config; use another directory")
    tensors = load_file(str(path / "checkpoint.safetensors"))
    judge.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state = opt.state_dict()
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(state)
    return int(meta["step"])


def _jsonable(cfg: JudgeTrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))


def train_judge(
    cfg: JudgeTrainConfig,
    checkpoint_dir: str | Path | None = None,
    log: Callable[[dict], None] | None = None,
    until: int | None = None,
) -> Judge:
    """Train a judge from scratch or resume from `checkpoint_dir`; returns it in eval mode.

    `until` stops this call after that many total steps (checkpointed), so a long run can be
    done in slices; the result is the same as one uninterrupted run.
    """
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    world = World(cfg.model.image_size)
    judge = Judge(cfg.model)
    opt = torch.optim.AdamW(judge.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start = 0
    if ckpt is not None and (ckpt / "checkpoint.json").is_file():
        start = _load_checkpoint(ckpt, judge, opt, cfg)
    end = cfg.steps if until is None else min(cfg.steps, until)
    t0 = time.time()
    for step in range(start, end):
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        judge.train()
        x, t = _training_batch(world, cfg, step)
        loss = judge_loss(judge, judge(x), t, cfg.objectness_pos_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if log is not None and (done % 50 == 0 or done == cfg.steps):
            log({"step": done, "steps": cfg.steps, "loss": loss.item(), "lr": lr, "elapsed_s": time.time() - t0})
        if ckpt is not None and (done % cfg.checkpoint_every == 0 or done == end):
            _save_checkpoint(ckpt, judge, opt, done, cfg)
    judge.eval()
    return judge
