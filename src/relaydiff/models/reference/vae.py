"""The VAE stages (autoencoder, then decoder fine-tune), the latents they produce, seeding from a family."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from relaydiff.models.reference.builders import build_vae
from relaydiff.models.reference.checkpoint import (
    _optimizer_tensors,
    _resume,
    _rng,
    _should_stop,
    _stage_seed,
    Checkpoint,
)
from relaydiff.models.reference.config import ReferenceConfig, RunOptions, StageStopped, TrainingError, TrainSpec
from relaydiff.models.reference.data import _to_tensor, stage_data, training_set
from relaydiff.models.reference.progress import Progress
from relaydiff.models.reference.schedule import lr_at
from relaydiff.models.world import STYLES, World


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
            g["lr"] = lr_at(step, spec)
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
    # lazy: diffusers takes seconds to import; only building or loading a U-Net/VAE needs it
    from diffusers import AutoencoderKL

    if not (out / "vae" / "config.json").is_file():
        raise TrainingError(f"{out / 'vae'} is missing: run the 'vae' stage first")
    return AutoencoderKL.from_pretrained(str(out / "vae"), local_files_only=True).eval()


def _load_latents(out: Path) -> dict[str, torch.Tensor]:
    path = out / "data" / "latents.safetensors"
    if not path.is_file():
        raise TrainingError(f"{path} is missing: run the 'vae' stage first")
    return load_file(str(path))


def seed_from_family(cfg: ReferenceConfig, out: Path, family_dir: Path, progress: Progress,
                     with_small: bool = False, retrain_styles: Sequence[str] = ()) -> None:
    """Start a run from a trained family's VAE and large member instead of training them again.

    The family's ``vae/`` and ``unet_large/`` directories are copied into the run (the engine's
    family layout is the run's), the prompts are encoded as the 'data' stage does, and the
    latents are the copied VAE's posterior means at its own scaling factor, so that the latent
    space of the copied large member is kept. Later stages (e.g. a new small member, styles) then
    run as usual on top. ``with_small`` (a run that does not train the small member) copies its
    ``unet_small/`` too, and its adapters of the run's styles except ``retrain_styles``, which the
    styles stage then trains alone.
    """
    family_dir = Path(family_dir)
    names = ("vae", "unet_large", "unet_small") if with_small else ("vae", "unet_large")
    for name in names:
        if not (family_dir / name / "config.json").is_file():
            raise TrainingError(f"{family_dir / name} is not a trained {name} (no config.json)")
    if with_small:
        kept = [s for s in cfg.styles if s not in retrain_styles]
        absent = [s for s in kept if not (family_dir / "adapters" / f"{s}.safetensors").is_file()]
        if absent:
            raise TrainingError(f"{family_dir} has no adapters for styles {absent}: name them with --styles")
        for style in kept:
            dest = out / "adapters" / f"{style}.safetensors"
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(family_dir / "adapters" / f"{style}.safetensors", dest)
                progress.note(f"seed: adapter {style} from {family_dir}")
    _seed_parts(cfg, out, family_dir, names, progress)


def _seed_parts(cfg: ReferenceConfig, out: Path, src: Path, names: Sequence[str], progress: Progress,
                skip_decoder: bool = True) -> None:
    """Copy trained parts into the run, then encode its prompts and (with the copied VAE) latents.
    ``skip_decoder``: the copied VAE is final (a family's); otherwise its decoder stage runs when the
    copy has no decoder record (a staged VAE whose decoder fine-tune is still to come)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (out / name).exists():
            progress.note(f"seed: {name} already in {out}")
            continue
        shutil.copytree(src / name, out / name)
        progress.note(f"seed: {name} from {src}")
    stage_data(cfg, out, progress)
    if not (out / "data" / "latents.safetensors").is_file():
        vae = _load_vae(out)
        progress.note("seed: encoding the training latents")
        tensors = _scaled_latents(cfg, vae, training_set(cfg), World(cfg.image_size), float(vae.config.scaling_factor))
        save_file(tensors, str(out / "data" / "latents.safetensors"))
    record = out / "vae" / "decoder_record.json"
    if skip_decoder and not record.is_file():
        record.write_text(json.dumps({"seeded_from": str(src)}, indent=1))
