"""The denoiser stages: the large and small members (epsilon prediction, CFG dropout) and the style LoRAs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relaydiff.engine.family import read_adapter_config, write_adapter_file
from relaydiff.models.reference.config import MEMBER_STAGES, ReferenceConfig, RunOptions, STYLE_GUIDANCE_DIRECTIONS, StageStopped, TrainSpec, TrainingError
from relaydiff.models.reference.builders import build_unet, scheduler_config, unet_flops
from relaydiff.models.reference.progress import Progress
from relaydiff.models.reference.checkpoint import Checkpoint, _optimizer_tensors, _resume, _rng, _should_stop, _stage_seed
from relaydiff.models.reference.data import _load_text, training_set
from relaydiff.models.reference.schedule import _ema_update, ddpm_alphas_cumprod, lr_at
from relaydiff.models.reference.vae import _load_latents


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
    ``target_shift(noisy, t, context)`` is added to the target (see `base_guidance_shift`).
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
    member_stage = stage in MEMBER_STAGES or stage.startswith("large-continue-")  # later phases too
    start = _resume(ckpt, run.resume, {"model" if member_stage else "lora": unet}, opt,
                    ema if ema else None)
    if not member_stage and start:
        missing = set(state_fn()) - set(ckpt.load("lora"))
        if missing:
            raise TrainingError(f"checkpoint {ckpt.dir} lacks adapter weights {sorted(missing)[:3]}")
    device = next(unet.parameters()).device
    acp = ddpm_alphas_cumprod(scheduler_config()).to(device)
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
            g["lr"] = lr_at(step, spec)
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
        # lazy: diffusers takes seconds to import; only building or loading a U-Net/VAE needs it
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
                          row_weights=row_weights(cfg, spec, len(latents)), **loss)
    unet.load_state_dict(ema, strict=False)
    return unet.to("cpu")


def row_weights(cfg: ReferenceConfig, spec: TrainSpec, n_rows: int) -> torch.Tensor | None:
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
    """A further phase of the trained large member (``cfg.large_continue``): from its saved weights, with a
    fresh optimizer and schedule and draws of its own stage; the result replaces ``unet_large``.

    Phases add up across runs: a run seeded (e.g. from a staging folder) with a member that earlier
    runs continued trains the next phase, with draws of its own (stage ``large-continue-K``), so a
    large member can be trained over several working blocks. Within one run the phase runs once."""
    # lazy: diffusers takes seconds to import; only building or loading a U-Net/VAE needs it
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
    phases = record.get("continued", [])
    phases = [phases] if isinstance(phases, dict) else list(phases)  # one phase was recorded as a dict
    if phases and Checkpoint(out, phases[-1].get("stage", "large-continue")).exists():  # this run's phase
        if phases[-1].get("steps") == spec.steps:
            progress.note("large-continue: done")
            return
        raise TrainingError(f"{final} was continued for {phases[-1].get('steps')} steps, not "
                            f"{spec.steps}: start from the first phase's weights in a new --out")
    stage = "large-continue" if not phases else f"large-continue-{len(phases) + 1}"
    unet = UNet2DConditionModel.from_pretrained(str(final), local_files_only=True).float().to(run.device)
    unet = _fit_member(cfg, out, progress, run, stage, unet, spec)
    unet.save_pretrained(str(final), safe_serialization=True)
    phases.append({"stage": stage, "steps": spec.steps, "loss": Checkpoint(out, stage).state().get("loss")})
    record["continued"] = phases
    record.setdefault("flops_per_step", unet_flops(unet, cfg.max_length))
    record.setdefault("params", sum(p.numel() for p in unet.parameters()))
    record_path.write_text(json.dumps(record, indent=1))


def base_guidance_shift(unet: Any, uncond: torch.Tensor, guidance: float,
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
    # lazy: diffusers takes seconds to import; only building or loading a U-Net/VAE needs it
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
        spec, rank = cfg.style_spec(style), cfg.style_rank(style)
        if path.is_file() and (had := read_adapter_config(path)["rank"]) != rank:
            raise TrainingError(f"{path} has rank {had}, the config asks for {rank}: use a new --out "
                                f"(--from-family with --styles {style} trains that style alone)")
        if run.styles is not None and style not in run.styles:
            progress.note(f"style {style}: not requested (--styles), left as it is")
            continue
        ckpt = Checkpoint(out, f"style-{style}")
        trained = int(ckpt.state()["step"]) if ckpt.exists() else None
        if path.is_file() and trained is not None and trained > spec.steps:
            raise TrainingError(f"{path} was trained {trained} steps, not {spec.steps}: use a new --out")
        if path.is_file() and (trained is None or trained == spec.steps):
            progress.note(f"style {style}: done")
            continue
        # no adapter yet, or one trained for fewer steps than now planned: continued from its
        # checkpoint (with --resume), which under a constant LR equals the longer run
        if style not in all_latents:
            raise TrainingError(f"no latents for style {style!r}: the 'vae' stage ran with other styles")
        unet = UNet2DConditionModel.from_pretrained(str(small_dir), local_files_only=True)
        unet.requires_grad_(False)
        torch.manual_seed(_stage_seed(cfg.seed, f"lora-{style}-init", 0))
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(cfg.lora_targets),
                                    init_lora_weights=True), adapter_name=style)
        unet.to(run.device)
        params = [p for n, p in unet.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        names = [n for n, p in unet.named_parameters() if "lora_" in n]
        state_fn = lambda u=unet, ns=tuple(names): {n: p.detach() for n, p in u.named_parameters() if n in ns}  # noqa: E731
        latents = all_latents[style]
        shift = (base_guidance_shift(unet, uncond[0].float().to(run.device), cfg.small_guidance,
                                      cfg.style_guidance_direction) if cfg.small_guidance else None)
        _train_denoiser(cfg, out, progress, run, f"style-{style}", unet, spec, latents,
                        torch.arange(len(latents)), text, uncond[0], params, names, state_fn, target_shift=shift,
                        row_weights=row_weights(cfg, spec, len(latents)))
        write_adapter_file(path, {k: v.cpu() for k, v in get_peft_model_state_dict(unet, adapter_name=style).items()}, member="small",
                           rank=rank, alpha=float(rank), targets=cfg.lora_targets, style=style)
