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

The package's files say what they hold: ``config`` (ReferenceConfig and its specs), ``builders``,
``checkpoint`` (seeded draws, checkpoints), ``data``, ``schedule``, ``progress``, ``vae``,
``staging``, ``denoisers``, ``export`` and ``run`` (``train_reference``). The names below are the
public surface; evaluation on the judge is :func:`relaydiff.bench.quality.evaluate_fidelity`.
"""

from __future__ import annotations

from relaydiff.models.reference.config import (  # noqa: F401
    MEMBER_STAGES,
    ReferenceConfig,
    RunOptions,
    SHIPPED_DIR,
    STAGES,
    STYLE_GUIDANCE_DIRECTIONS,
    StageStopped,
    TEXT_PACKAGE,
    TrainSpec,
    TrainingError,
    UNetSpec,
    USER_STYLES,
)
from relaydiff.models.reference.builders import (  # noqa: F401
    build_unet,
    build_vae,
    load_text_encoder,
    scheduler_config,
    unet_config,
    unet_flops,
    vae_config,
)
from relaydiff.models.reference.progress import (  # noqa: F401
    Progress,
)
from relaydiff.models.reference.checkpoint import (  # noqa: F401
    Checkpoint,
)
from relaydiff.models.reference.data import (  # noqa: F401
    stage_data,
    training_set,
)
from relaydiff.models.reference.schedule import (  # noqa: F401
    ddpm_alphas_cumprod,
    lr_at,
)
from relaydiff.models.reference.vae import (  # noqa: F401
    reconstruction_loss,
    seed_from_family,
    stage_decoder,
    stage_vae,
)
from relaydiff.models.reference.staging import (  # noqa: F401
    STAGED_PARTS,
    seed_from_staging,
    staged_parts,
    write_staging,
)
from relaydiff.models.reference.denoisers import (  # noqa: F401
    base_guidance_shift,
    denoising_loss,
    row_weights,
    stage_large_continue,
    stage_member,
    stage_styles,
)
from relaydiff.models.reference.export import (  # noqa: F401
    assemble_family,
    checkpoint_family,
    export_family,
    verify_manifest,
)
from relaydiff.models.reference.run import (  # noqa: F401
    train_reference,
)
