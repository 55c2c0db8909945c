import json
import shutil

import pytest
import torch

from relaydiff.engine.family import FamilyError, load_family, load_family_dir, tiny_family


def _out(fam, member, adapter=None):
    torch.manual_seed(0)
    x = torch.randn(2, *fam.latent_shape)
    ctx = fam.encode_prompt(["a red circle", ""])
    with torch.no_grad():
        return fam.unet(member, adapter)(x, torch.tensor([500, 500]), encoder_hidden_states=ctx).sample


def test_tiny_is_deterministic_by_seed(tiny):
    again = tiny_family(0)
    other = tiny_family(1)
    assert torch.equal(_out(tiny, "large"), _out(again, "large"))
    assert not torch.allclose(_out(tiny, "large"), _out(other, "large"))
    assert tiny.latent_shape == (4, 8, 8) and tiny.image_size == 32


def test_adapters_change_the_small_member(tiny):
    assert not torch.allclose(_out(tiny, "small"), _out(tiny, "small", "style_a"))
    assert not torch.allclose(_out(tiny, "small", "style_a"), _out(tiny, "small", "style_b"))
    assert torch.equal(_out(tiny, "small"), _out(tiny, "small", None))  # disabling restores the base
    with pytest.raises(FamilyError, match="unknown adapter"):
        tiny.unet("small", "nope")
    with pytest.raises(FamilyError, match="belongs to member"):
        tiny.unet("large", "style_a")
    with pytest.raises(FamilyError, match="unknown member"):
        tiny.unet("medium")


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("fam") / "tiny"
    tiny.save_pretrained(path)
    return path


def test_save_pretrained_roundtrip(tiny, saved):
    fam = load_family_dir(saved)
    assert (fam.id, fam.version) == (tiny.id, tiny.version)
    assert fam.fingerprint() == tiny.fingerprint()
    assert set(fam.adapters) == set(tiny.adapters)
    for member, adapter in [("large", None), ("small", None), ("small", "style_a"), ("small", "style_b")]:
        assert torch.equal(_out(fam, member, adapter), _out(tiny, member, adapter)), (member, adapter)
    x = torch.zeros(1, *fam.latent_shape)
    assert (fam.decode(x) == tiny.decode(x)).all()


def test_missing_files_are_clear_errors(saved, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    (broken / "vae" / "config.json").unlink()
    with pytest.raises(FamilyError, match="VAE"):
        load_family_dir(broken)
    with pytest.raises(FamilyError, match="not found"):
        load_family_dir(tmp_path / "nowhere")
    with pytest.raises(FamilyError, match="neither"):
        load_family_dir(tmp_path)


def test_member_with_another_latent_shape_is_rejected(saved, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    from diffusers import UNet2DConditionModel

    from relaydiff.engine.family import tiny_unet_config

    shutil.rmtree(bad / "unet_small")
    UNet2DConditionModel(**dict(tiny_unet_config(16, 32), in_channels=3, out_channels=3)).save_pretrained(
        bad / "unet_small")
    with pytest.raises(FamilyError, match="latent channels"):
        load_family_dir(bad)
    shutil.rmtree(bad / "unet_small")
    UNet2DConditionModel(**tiny_unet_config(16, 32, sample_size=16)).save_pretrained(bad / "unet_small")
    with pytest.raises(FamilyError, match="latent size"):
        load_family_dir(bad)


def test_unknown_adapter_file_and_member(saved, tmp_path):
    bad = tmp_path / "bad2"
    shutil.copytree(saved, bad)
    manifest = json.loads((bad / "family.json").read_text())
    manifest["adapters"]["ghost"] = {"member": "small", "path": "adapters/ghost.safetensors"}
    (bad / "family.json").write_text(json.dumps(manifest))
    with pytest.raises(FamilyError, match="adapter file not found"):
        load_family_dir(bad)
    manifest["adapters"].pop("ghost")
    manifest["adapters"]["style_a"]["member"] = "nobody"
    (bad / "family.json").write_text(json.dumps(manifest))
    with pytest.raises(FamilyError, match="unknown member"):
        load_family_dir(bad)


def test_plain_diffusers_directory_loads_as_one_member(saved, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for sub in ("text_encoder", "tokenizer", "vae", "scheduler"):
        shutil.copytree(saved / sub, plain / sub)
    shutil.copytree(saved / "unet_large", plain / "unet")
    (plain / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    fam = load_family_dir(plain)
    assert list(fam.members) == ["default"]


def test_adapter_on_convolutions_roundtrips(tmp_path):
    """An adapter file records its target layers, so LoRAs beyond attention load as saved."""
    from peft import LoraConfig

    fam = tiny_family(3, adapters=())
    unet = fam.members["small"]
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "conv1", "conv2"],
                                init_lora_weights=False), adapter_name="conv_style")
    from relaydiff.engine.family import AdapterSpec

    fam.adapters["conv_style"] = AdapterSpec("conv_style", "small", rank=2)
    fam._active["small"] = "__stale__"
    fam.save_adapter_file("conv_style", tmp_path / "a.safetensors", dtype=torch.float32)
    other = tiny_family(3, adapters=())
    other.load_adapter_file("conv_style", tmp_path / "a.safetensors")
    assert torch.equal(_out(fam, "small", "conv_style"), _out(other, "small", "conv_style"))
    assert not torch.allclose(_out(other, "small", "conv_style"), _out(other, "small"))


def test_guidance_distilled_members_are_saved_checked_and_rejected_when_wrong(saved, tmp_path):
    import json

    fam_dir = tmp_path / "gd"
    shutil.copytree(saved, fam_dir)
    manifest = json.loads((fam_dir / "family.json").read_text())
    assert "guidance_distilled" not in manifest  # families without it read as before
    manifest["guidance_distilled"] = {"small": 4}
    (fam_dir / "family.json").write_text(json.dumps(manifest))
    fam = load_family_dir(fam_dir)
    assert fam.guidance_distilled == {"small": 4.0}
    again = tmp_path / "again"
    fam.save_pretrained(again)
    assert json.loads((again / "family.json").read_text())["guidance_distilled"] == {"small": 4.0}
    for bad, match in (({"tiny": 4.0}, "not a member"), ({"small": 1.0}, r"\(1, 50\]"),
                       ({"small": "4"}, "guidance scales"), (["small"], "guidance scales")):
        manifest["guidance_distilled"] = bad
        (fam_dir / "family.json").write_text(json.dumps(manifest))
        with pytest.raises(FamilyError, match=match):
            load_family_dir(fam_dir)
