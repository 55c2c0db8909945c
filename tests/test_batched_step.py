"""The executor's vectorized step: chains stepped together give each chain's own step, bit for bit.

The U-Net's own numerics depend on the batch size (GEMM blocking), so the executor-level checks use a
row-wise stand-in for it: whatever differs from running a chain alone is then the executor's doing.
"""

from __future__ import annotations

import pytest
import torch

from relaydiff.engine.chain import new_chain
from relaydiff.engine.executor import Executor
from relaydiff.engine.plan import Plan, Request, parse_plan
from relaydiff.engine.runner import generate
from relaydiff.engine.samplers import make_sampler

SD15 = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False, "timestep_spacing": "leading"}
CONFIGS = [("ddim", {}, {}), ("ddim", {"eta": 0.6}, {"clip_sample": True}), ("euler", {}, {}),
           ("euler", {}, {"prediction_type": "v_prediction"}), ("dpmpp_2m", {}, {}),
           ("dpmpp_2m", {"solver_type": "heun"}, {"prediction_type": "sample", "final_sigmas_type": "sigma_min"})]


@pytest.mark.parametrize("name,options,config", CONFIGS)
def test_step_batch_equals_each_chain_stepped_alone(name: str, options: dict, config: dict) -> None:
    """Chains with different T, at different steps (first, middle, last; with and without history)."""
    sampler = make_sampler(name, {**SD15, **config}, **options)
    g = torch.Generator().manual_seed(0)
    chains = []  # (schedule, step, x, state, generator seed)
    for k, (steps, at) in enumerate([(6, 0), (6, 3), (9, 8), (4, 1), (12, 5)]):
        sched = sampler.schedule(steps)
        x, state = torch.randn(1, 4, 8, 8, generator=g), sampler.initial_state()
        for i in range(at):
            x, state = sampler.step(x, torch.randn(1, 4, 8, 8, generator=g), sched, i, state,
                                    torch.Generator().manual_seed(100 + i))
        chains.append((sched, at, x, state, 10 + k))
    outs = [torch.randn(1, 4, 8, 8, generator=g) for _ in chains]
    alone = [sampler.step(sampler.scale_model_input(x, s, i), o, s, i, st, torch.Generator().manual_seed(seed))
             for (s, i, x, st, seed), o in zip(chains, outs)]
    scheds, idx = [c[0] for c in chains], [c[1] for c in chains]
    x_in = sampler.scale_model_inputs(torch.cat([c[2] for c in chains]), scheds, idx)
    together, states = sampler.step_batch(x_in, torch.cat(outs), scheds, idx, [c[3] for c in chains],
                                          [torch.Generator().manual_seed(c[4]) for c in chains])
    for j, (x_alone, state_alone) in enumerate(alone):
        assert torch.equal(together[j:j + 1], x_alone), f"chain {j} differs"
        assert states[j].keys() == state_alone.keys()
        assert all(torch.equal(states[j][key], state_alone[key]) for key in states[j])
    for (s, i, x, _, _), scaled in zip(chains, x_in.split(1)):
        assert torch.equal(scaled, sampler.scale_model_input(x, s, i))


def test_step_batch_rejects_mismatched_chains() -> None:
    sampler = make_sampler("dpmpp_2m", SD15)
    sched = sampler.schedule(4)
    x = torch.zeros(3, 4, 8, 8)
    with pytest.raises(ValueError, match="split into 2 chains"):
        sampler.step_batch(x, x, [sched, sched], [0, 0], [sampler.initial_state()] * 2, [None, None])
    with pytest.raises(ValueError, match="one state and one generator"):
        sampler.step_batch(x[:2], x[:2], [sched, sched], [0, 0], [sampler.initial_state()], [None, None])
    with pytest.raises(ValueError, match="needs the history"):
        sampler.step_batch(x[:2], x[:2], [sched, sched], [0, 1], [sampler.initial_state()] * 2, [None, None])


def _rowwise_denoise(member, adapter, x, t, context):
    """A stand-in U-Net whose every output row depends on its own input row only, exactly."""
    return 0.9 * x + context[:, 0, :4].reshape(-1, 4, 1, 1) + t.reshape(-1, 1, 1, 1).to(x.dtype) * 1e-3


def test_mixed_batch_gives_each_chain_its_own_image_bit_for_bit(tiny, monkeypatch):
    """Mixed samplers (one stochastic), guidance on and off (request and segment), different T,
    chains joining and leaving mid-run: every chain ends where it ends alone."""
    monkeypatch.setattr(tiny, "denoise", _rowwise_denoise)
    reqs = [Request("a red circle", steps=6, guidance=3.0, seed=1, sampler="ddim"),
            Request("two blue squares", steps=8, guidance=1.0, seed=2, sampler="euler"),
            Request("a green star above a cat", steps=5, guidance=7.5, seed=3, sampler="dpmpp_2m"),
            Request("a red circle", steps=7, guidance=3.0, seed=4, sampler="ddim", negative_prompt="blurry",
                    sampler_options={"eta": 0.5}),
            Request("a yellow square", steps=9, guidance=4.0, seed=5, sampler="dpmpp_2m"),
            Request("a purple star", steps=6, guidance=2.0, seed=6, sampler="euler")]
    plans = [Plan.single("large", 6), Plan.single("large", 8), Plan.single("large", 5), Plan.single("large", 7),
             parse_plan("large:0-4,large:4-9[g=1]"), parse_plan("large:0-2[g=1],large:2-6")]
    chains = [new_chain(tiny, r, p) for r, p in zip(reqs, plans)]
    ex = Executor(tiny, max_batch=8)
    for k, c in enumerate(chains):
        ex.submit(c)
        if k % 2:
            ex.step()
    assert len({c.step for c in ex.active}) >= 3
    ex.run()
    assert ex.calls < sum(r.steps for r in reqs)
    for c, r, p in zip(chains, reqs, plans):
        ref = generate(tiny, [r], [p], max_batch=1)[0]
        assert torch.equal(c.latents, ref.latents), r
        assert c.accounting.unet_evals == ref.accounting["unet_evals"]


def test_bench_engine_overhead_reports_both_clocks_per_member_and_sampler():
    from relaydiff.bench.engine import bench_engine_overhead

    torch.set_num_threads(1)
    out = bench_engine_overhead(family="tiny", batch=2, members=["small"], samplers=("euler", "dpmpp_2m"),
                                rounds=2, repeats=2, trace=False)
    assert out["clocks"] == ["wall", "cpu"] and out["latent_shape"] == [4, 8, 8]
    assert [(r["member"], r["sampler"]) for r in out["results"]] == [("small", "euler"), ("small", "dpmpp_2m")]
    for r in out["results"]:
        assert r["rows"] == 4  # two chains with guidance: two rows each
        for clock in out["clocks"]:
            m = r[clock]
            assert len(m["ratios"]) == 2 and m["ratio"]["min"] <= m["ratio"]["median"] <= m["ratio"]["max"]
            assert m["ratio"]["min"] > 0 and m["bare_forward_ms"]["min"] > 0
    assert "threads" in out["hardware"]


@pytest.mark.parametrize("args, says", [
    (["--samplers", "ddim,plms"], "--samplers must be a comma-separated subset"),
    (["--rounds", "0"], "--batch, --rounds and --repeats must be >= 1"),
    (["--shapes", "no/such/config.json"], "--shapes: no such file"),
])
def test_bench_engine_overhead_mistakes_are_one_line(monkeypatch, args, says):
    from typer.testing import CliRunner

    import relaydiff.engine.family
    from relaydiff.cli import app

    def no_model_loads(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(relaydiff.engine.family, "load_family", no_model_loads)
    res = CliRunner().invoke(app, ["bench", "engine", "--overhead", *args])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], res.output
