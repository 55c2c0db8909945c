"""The user's surface: one `error: ...` line and exit 2 for every mistake (checked before models
load), plain help that keeps the plan grammar's brackets, the truncation warning, handoffs from
directory families, the public Python API, and a plain diffusers `save_pretrained` folder relayed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

import relaydiff
from relaydiff.cli import app

runner = CliRunner()


def _no_model_loads(*args, **kwargs):
    raise AssertionError("a model was loaded before the arguments were checked")


@pytest.mark.parametrize("args, says", [
    (["bench", "engine", "--requests", "0"], "--requests must be >= 1"),
    (["bench", "engine", "--dtype", "int8"], "--dtype must be one of"),
    (["demo", "--steps", "-5"], "--steps must be >= 2"),
    (["demo", "--steps", "0"], "--steps must be >= 2"),
    (["generate", "--prompt", "x", "--plan", "large:0-4;small", "--out", "x.png"], "member[+adapter][@node]:start-end"),
    (["generate", "--prompt", "x", "--plan", "large:0-3,small:4-8", "--out", "x.png"], "gap in the plan"),
    (["generate", "--prompt", "x", "--steps", "0", "--out", "x.png"], "request['steps']: input should be greater than or equal to 1"),
    (["generate", "--prompt", "x", "--sampler", "plms", "--out", "x.png"], "unknown sampler 'plms'"),
    (["generate", "--prompt", "x", "--out", "x.txt"], "names no image format"),
    (["generate", "--prompt", "x", "--stop-at", "9", "--handoff-out", "h.rdh"], "--stop-at must be in 1..7"),
    (["profile", "--batch-sizes", "1,two"], "--batch-sizes must be comma-separated integers"),
    (["bench", "offload", "--scenario", "nowhere"], "scenario nowhere not found"),
    (["bench", "offload", "--policy", "/nowhere/policy"], "policy /nowhere/policy not found"),
    (["bench", "offload", "--from-json", "x.json"], "--from-json only redraws the plots"),
    (["train", "offload", "--families", "default,nope"], "unknown families ['nope']"),
    (["bench", "quality", "--only", "relay,bogus"], "unknown bench quality section(s) ['bogus']"),
    (["bench", "quality", "--only", "relay", "--update", "/nowhere/quality.json"], "cannot read the table"),
    (["bandit", "pool", "/nowhere/bandit_live.json"], "cannot read the report"),
])
def test_user_mistakes_end_in_one_error_line_before_any_model_loads(monkeypatch, args, says):
    import relaydiff.demo
    import relaydiff.engine.family

    monkeypatch.setattr(relaydiff.engine.family, "load_family", _no_model_loads)
    monkeypatch.setattr(relaydiff.demo, "run_demo", _no_model_loads)
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a build without CUDA")
def test_a_device_this_build_lacks_is_a_clear_error():
    res = runner.invoke(app, ["profile", "--device", "cuda"])
    assert res.exit_code == 2 and res.output.startswith("error: --device cuda") and "CUDA" in res.output


def test_help_keeps_the_plan_grammar():
    res = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "300"})
    assert res.exit_code == 0 and "member[+adapter][@node]:start-end" in res.output and "[g=G]" in res.output


def test_long_prompt_warns_and_out_says_what_it_wrote(tmp_path):
    out = tmp_path / "x.jpg"
    res = runner.invoke(app, ["generate", "--family", "tiny", "--prompt", "a red circle left of a blue square",
                              "--steps", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "warning:" in res.output and "reads the first 16" in res.output
    assert "image (JPEG)" in res.output and out.read_bytes()[:2] == b"\xff\xd8"


def test_handoff_of_a_directory_family_resumes_elsewhere_with_family(tiny, tmp_path, monkeypatch):
    fam_dir = tiny.save_pretrained(tmp_path / "fam")
    manifest = json.loads((fam_dir / "family.json").read_text())
    (fam_dir / "family.json").write_text(json.dumps({**manifest, "id": "myfam"}))  # not a built-in name
    h, a, b = tmp_path / "h.rdh", tmp_path / "a.png", tmp_path / "b.png"
    common = ["--family", str(fam_dir), "--prompt", "a cat", "--steps", "4", "--plan", "large:0-2,small:2-4"]
    assert runner.invoke(app, ["generate", *common, "--out", str(a)]).exit_code == 0
    assert runner.invoke(app, ["generate", *common, "--stop-at", "2", "--handoff-out", str(h)]).exit_code == 0
    monkeypatch.chdir(tmp_path / "..")  # another folder: the handoff names the family, it holds no path
    res = runner.invoke(app, ["resume", str(h), "--out", str(b)])
    assert res.exit_code == 2 and "directory family 'myfam'" in res.output and "pass --family DIR" in res.output
    res = runner.invoke(app, ["resume", str(h), "--out", str(b), "--family", str(fam_dir)])
    assert res.exit_code == 0, res.output
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_public_api_relays_a_saved_diffusers_pipeline(tiny, tmp_path):
    """A tiny random StableDiffusionPipeline written by diffusers' own save_pretrained, relayed
    across a handoff through `import relaydiff`: the same image as the chain run whole."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from relaydiff.engine.family import TINY_SCHEDULER_CONFIG

    pipe = StableDiffusionPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder.model, tokenizer=tiny.text_encoder.tokenizer,
        unet=tiny.members["large"], scheduler=DDIMScheduler.from_config(TINY_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "sd")

    family = relaydiff.load_family(tmp_path / "sd")
    assert list(family.members) == ["default"]
    request = relaydiff.Request("a red circle", steps=4, seed=3)
    plan = relaydiff.parse_plan("default@edge:0-2,default@device:2-4")
    (whole,) = relaydiff.generate(family, [request], [plan])
    (edge,) = relaydiff.generate(family, [request], [plan], stop_at=2)
    wire = tmp_path / "h.rdh"
    relaydiff.write_handoff(wire, edge.handoff)
    finished = relaydiff.resume(family, relaydiff.read_handoff(wire))
    assert finished.image.shape == whole.image.shape and np.array_equal(finished.image, whole.image)
    assert set(relaydiff.__all__) >= {"load_family", "Request", "parse_plan", "generate", "resume", "run_demo"}


OPTIONS_RECORD = Path(__file__).with_name("cli_options.json")


def _command_options(command=None, words=()) -> dict[str, dict[str, str]]:
    """Every command's parameters, through click's introspection: {'bench qoe': {'--seeds': 'int = 5', ...}}."""
    command = typer.main.get_command(app) if command is None else command
    if hasattr(command, "commands"):  # a group
        return {k: v for name, sub in command.commands.items() for k, v in _command_options(sub, (*words, name)).items()}
    params = {}
    for p in command.params:
        kind = getattr(p.type_descriptor.annotation, "__name__", str(p.type_descriptor.annotation))
        flags = "/".join(p.opts + p.secondary_opts) if p.opts[0].startswith("-") else p.name.upper()
        params[flags] = f"{kind} = {'required' if p.required else repr(p.default)}"
    return {" ".join(words): params}


def test_every_command_keeps_its_options():
    """A refactor of the command line (shared options, options from configs) keeps every recorded command's
    flags, types and defaults; new commands and flags may come. A deliberate change of a recorded one:
    rewrite the record with RELAYDIFF_RECORD_CLI_OPTIONS=1 pytest tests/test_cli.py -k keeps_its_options."""
    now = _command_options()
    if os.environ.get("RELAYDIFF_RECORD_CLI_OPTIONS"):
        OPTIONS_RECORD.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
    record = json.loads(OPTIONS_RECORD.read_text())
    lost = {f"{words} {flag}": was for words, options in record.items() for flag, was in options.items()
            if now.get(words, {}).get(flag) != was}
    assert not lost, f"changed or gone (recorded -> now): {lost}"
    assert len(record) >= 18 and "--json" in record["bench qoe"] and "--ray" in record["serve edge"]


def test_shared_options_say_the_same_in_every_command():
    """An option defined once in relaydiff.cli.options shows its one help text in each command that takes it."""
    for words, flag, says in [(["bench", "serve"], "--json", "Print one JSON object."),
                              (["bench", "quality"], "--out", "Also write the JSON here."),
                              (["bandit", "live"], "--threads", "torch threads (the machine is shared)."),
                              (["serve", "edge"], "--threads", "CPU threads for torch (0: torch's default)."),
                              (["generate"], "--sampler", "ddim | euler | dpmpp_2m."),
                              (["train", "reference"], "--seed", "Seed: the run is a pure function of it.")]:
        res = runner.invoke(app, [*words, "--help"], env={"COLUMNS": "300"})
        line = next(line for line in res.output.splitlines() if line.strip().startswith(flag))
        assert says in line, (words, line)


def test_row_workers_checks_are_one_rule_in_both_commands():
    for words in (["serve", "edge", "--tokens", "no-such-tokens.json"], ["bench", "serve"]):
        res = runner.invoke(app, [*words, "--row-workers", "0"])
        assert res.exit_code == 2 and "--row-workers must be >= 1" in res.output, (words, res.output)
        res = runner.invoke(app, [*words, "--row-workers", "2", "--ray"])
        assert res.exit_code == 2 and "with --ray each replica has one CPU" in res.output, (words, res.output)
