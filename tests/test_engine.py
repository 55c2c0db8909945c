"""Executor batching, relays with adapters, the handoff invariant and the shared prefix, on the tiny family."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from relaydiff.engine.chain import new_chain
from relaydiff.engine.executor import Executor
from relaydiff.engine.handoff import HandoffError, decode_handoff, encode_handoff
from relaydiff.engine.plan import Plan, PlanError, Request, parse_plan
from relaydiff.engine.runner import from_handoff, generate, generate_shared_prefix, resume, run_chains

SAMPLERS = ("ddim", "euler", "dpmpp_2m")


def _alone(fam, req, plan):
    return generate(fam, [req], [plan], max_batch=1)[0]


def test_batch_of_chains_at_different_steps_matches_each_alone(tiny):
    reqs = [
        Request("a red circle", steps=6, guidance=3.0, seed=1, sampler="ddim"),
        Request("two blue squares", steps=8, guidance=1.0, seed=2, sampler="euler"),
        Request("a green star above a cat", steps=5, guidance=7.5, seed=3, sampler="dpmpp_2m"),
        Request("a red circle", steps=6, guidance=3.0, seed=4, sampler="ddim", negative_prompt="blurry"),
    ]
    plans = [Plan.single("large", r.steps) for r in reqs]
    ex = Executor(tiny, max_batch=8)
    chains = [new_chain(tiny, r, p) for r, p in zip(reqs, plans)]
    # chains join at different moments: the batch holds chains at different steps
    ex.submit(chains[0])
    ex.step()
    ex.step()
    ex.submit(chains[1])
    ex.step()
    ex.submit(chains[2])
    ex.submit(chains[3])
    steps_seen = {c.step for c in ex.active}
    assert len(steps_seen) >= 3, steps_seen
    ex.run()
    assert all(c.done for c in chains)
    assert ex.calls < sum(r.steps for r in reqs)  # the calls were shared
    for c, r, p in zip(chains, reqs, plans):
        ref = _alone(tiny, r, p)
        # a float32 U-Net gives slightly different numbers at different batch sizes (the kernels
        # block by batch; up to 2.7e-5 here on an AMD EPYC, 1 thread, after guidance 7.5): the
        # executor's own exactness is tested bit for bit with a row-wise U-Net (test_batched_step)
        torch.testing.assert_close(c.latents, ref.latents, rtol=1e-4, atol=1e-4)
        assert c.accounting.unet_evals == ref.accounting["unet_evals"]


def test_adapters_never_share_a_unet_call(tiny, monkeypatch):
    reqs = [Request(f"user {i}", steps=4, seed=i) for i in range(4)]
    plans = [Plan.single("small", 4, adapter) for adapter in ("style_a", "style_b", None, "style_a")]
    seen = []
    original = Executor._run_batch

    def spy(self, batch, member, adapter):
        seen.append({(c.segment.member, c.segment.adapter) for c in batch})
        return original(self, batch, member, adapter)

    monkeypatch.setattr(Executor, "_run_batch", spy)
    results = generate(tiny, reqs, plans, max_batch=8)
    assert all(len(keys) == 1 for keys in seen)
    assert len(seen) == 3 * 4  # three groups, four steps each
    monkeypatch.setattr(Executor, "_run_batch", original)
    for res, r, p in zip(results, reqs, plans):
        torch.testing.assert_close(res.latents, _alone(tiny, r, p).latents, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(results[0].latents, results[1].latents)


def test_finished_chains_are_decoded_together_and_give_each_alone_image(tiny, monkeypatch):
    reqs = [Request(f"a red circle {i}", steps=4, seed=i) for i in range(5)]
    plans = [Plan.single("large", 4)] * 5
    calls = []
    original = type(tiny).decode

    def spy(self, latents):
        calls.append(latents.shape[0])
        return original(self, latents)

    monkeypatch.setattr(type(tiny), "decode", spy)
    chains = [new_chain(tiny, r, p, stop_at=2 if i == 3 else None) for i, (r, p) in enumerate(zip(reqs, plans))]
    results = run_chains(tiny, chains, max_batch=3)
    assert calls == [3, 1]  # four finished chains, max_batch 3; the stopped one is not decoded
    assert results[3].image is None and results[3].handoff is not None and results[3].handoff.step == 2
    monkeypatch.setattr(type(tiny), "decode", original)
    for i in (0, 1, 2, 4):
        alone = _alone(tiny, reqs[i], plans[i]).image
        assert results[i].image.shape == alone.shape and results[i].image.dtype == np.uint8
        assert np.abs(results[i].image.astype(int) - alone.astype(int)).max() <= 1


def test_relay_accounting(tiny):
    req = Request("a red circle", steps=8, guidance=3.0, seed=0)
    (res,) = generate(tiny, [req], [parse_plan("large@edge:0-3,small+style_a@device:3-8")])
    acc = res.accounting
    assert acc["unet_evals"] == {"large": 6, "small": 10}  # CFG: two U-Net rows per step
    assert [(s["member"], s["start"], s["end"], s["node"]) for s in acc["segments"]] == [
        ("large", 0, 3, "edge"), ("small", 3, 8, "device")]
    assert all(s["wall_s"] >= 0 and s["compute_s"] > 0 for s in acc["segments"])
    assert res.image.shape == (32, 32, 3) and res.image.dtype == np.uint8


def test_segment_guidance_sets_the_rows_and_survives_a_handoff(tiny):
    req = Request("a red circle", steps=8, guidance=3.0, seed=0)
    same = _alone(tiny, req, parse_plan("large@edge:0-3,small@device:3-8[g=3]"))
    assert torch.equal(same.latents, _alone(tiny, req, parse_plan("large@edge:0-3,small@device:3-8")).latents)
    plan = parse_plan("large@edge:0-3,small@device:3-8[g=1]")
    off = _alone(tiny, req, plan)
    assert off.accounting["unet_evals"] == {"large": 6, "small": 5}  # no CFG on the device: one row a step
    assert not torch.equal(off.latents, same.latents)
    (stopped,) = generate(tiny, [req], [plan], stop_at=3, max_batch=1)
    wire = encode_handoff(stopped.handoff, dtype="fp32")
    assert torch.equal(resume(tiny, decode_handoff(wire, expect_latent_shape=(1, *tiny.latent_shape))).latents,
                       off.latents)
    # guidance only on a segment: the request itself asks for none, the segment's CFG still runs
    on = _alone(tiny, Request("a red circle", steps=8, guidance=1.0, seed=0), parse_plan("large:0-8[g=3]"))
    assert on.accounting["unet_evals"] == {"large": 16}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_handoff_invariant_in_process(tiny, sampler):
    req = Request("a yellow triangle left of a square", steps=6, seed=5, sampler=sampler)
    plan = parse_plan("large@edge:0-3,small+style_b@device:3-6")
    full = _alone(tiny, req, plan)
    for k in range(0, 6):
        (stopped,) = generate(tiny, [req], [plan], stop_at=k, max_batch=1)
        assert stopped.image is None and stopped.handoff.step == k
        if sampler == "dpmpp_2m" and k > 0:
            assert stopped.handoff.sampler_state  # the multistep history travels
        wire = encode_handoff(stopped.handoff, dtype="fp32", compress=k % 2 == 1)
        res = resume(tiny, decode_handoff(wire, expect_latent_shape=(1, *tiny.latent_shape)), max_batch=1)
        assert torch.equal(res.latents, full.latents), (sampler, k)
        assert np.array_equal(res.image, full.image)
        assert res.accounting["unet_evals"] == full.accounting["unet_evals"]


def test_stochastic_ddim_carries_the_generator(tiny):
    req = Request("a star", steps=6, seed=9, sampler="ddim", sampler_options={"eta": 1.0})
    plan = Plan.single("large", 6)
    full = _alone(tiny, req, plan)
    (stopped,) = generate(tiny, [req], [plan], stop_at=3)
    assert stopped.handoff.generator_state is not None
    res = resume(tiny, decode_handoff(encode_handoff(stopped.handoff)))
    assert torch.equal(res.latents, full.latents)
    other = _alone(tiny, Request("a star", steps=6, seed=10, sampler="ddim", sampler_options={"eta": 1.0}), plan)
    assert not torch.equal(other.latents, full.latents)


def test_handoff_for_another_family_is_refused(tiny):
    from relaydiff.engine.family import tiny_family

    (stopped,) = generate(tiny, [Request("x", steps=4)], [Plan.single("large", 4)], stop_at=2)
    other = tiny_family(1)
    with pytest.raises(HandoffError, match="family"):
        from_handoff(other, stopped.handoff)
    stopped.handoff.plan = [{"member": "ghost", "start": 0, "end": 4, "adapter": None, "node": "edge"}]
    with pytest.raises(HandoffError, match="impossible chain"):
        from_handoff(tiny, stopped.handoff)


def test_two_processes_joined_by_the_wire_format_give_the_same_image(tiny, tmp_path):
    """This process runs the whole plan; two CLI processes run it split by a handoff file."""
    from PIL import Image

    from relaydiff.cli.engine import write_image

    req = Request("a red circle", steps=8, guidance=3.0, seed=1, sampler="dpmpp_2m")
    plan = parse_plan("large:0-4,small:4-8")
    x, y, h = tmp_path / "x.png", tmp_path / "y.png", tmp_path / "h.rdh"
    write_image(_alone(tiny, req, plan).image, x)
    cli = [sys.executable, "-m", "relaydiff.cli"]
    common = ["--family", "tiny", "--prompt", req.prompt, "--steps", "8", "--plan", str(plan), "--seed", "1",
              "--sampler", "dpmpp_2m", "--guidance", "3"]
    subprocess.run([*cli, "generate", *common, "--stop-at", "4", "--handoff-out", str(h)], check=True,
                   capture_output=True)
    subprocess.run([*cli, "resume", str(h), "--out", str(y)], check=True, capture_output=True)
    assert np.array_equal(np.asarray(Image.open(x)), np.asarray(Image.open(y)))
    h.write_bytes(h.read_bytes()[:-10])
    bad = subprocess.run([*cli, "resume", str(h), "--out", str(y)], capture_output=True, text=True)
    assert bad.returncode == 2 and "error" in bad.stderr


def test_shared_prefix_counts_and_forks(tiny):
    reqs = [Request(f"a {c} circle", steps=8, guidance=3.0, seed=7) for c in ("red", "blue", "green")]
    plans = [parse_plan("large@edge:0-4,small@device:4-8")] * 3
    out = generate_shared_prefix(tiny, reqs, plans, shared_steps=4)
    assert out.unet_evals == {"large": 8, "small": 24}
    assert out.unet_evals_unshared == {"large": 24, "small": 24}
    assert out.saved_fraction == pytest.approx(1 / 3)
    assert all(r.accounting["shared_steps"] == 4 for r in out.results)
    # the leader's continuation is the leader's own chain: same as running it alone
    torch.testing.assert_close(out.results[0].latents, _alone(tiny, reqs[0], plans[0]).latents,
                               rtol=1e-5, atol=1e-5)
    # the others continue under their own prompts from the leader's state
    assert not torch.allclose(out.results[1].latents, out.results[2].latents)
    mean = generate_shared_prefix(tiny, reqs, plans, shared_steps=4, conditioning="mean")
    assert not torch.allclose(mean.results[0].latents, out.results[0].latents)
    # no sharing at all costs exactly the unshared count
    none = generate_shared_prefix(tiny, reqs, plans, shared_steps=0)
    assert none.saved_fraction == 0.0


def test_shared_prefix_rejects_incompatible_groups(tiny):
    a = Request("a", steps=8)
    with pytest.raises(PlanError, match="share steps"):
        generate_shared_prefix(tiny, [a, Request("b", steps=6)],
                               [Plan.single("large", 8), Plan.single("large", 6)], 2)
    with pytest.raises(PlanError, match="agree on the shared steps"):
        generate_shared_prefix(tiny, [a, Request("b", steps=8)],
                               [Plan.single("large", 8), parse_plan("small:0-4,large:4-8")], 2)


def test_executor_rejects_bad_input(tiny):
    with pytest.raises(ValueError, match="max_batch"):
        Executor(tiny, max_batch=0)
    with pytest.raises(PlanError, match="gap"):
        new_chain(tiny, Request("x", steps=8), parse_plan("large:0-3,small:4-8"))
    with pytest.raises(PlanError, match="requests but"):
        generate(tiny, [Request("x")], [])
    edge = Executor(tiny, node="edge")
    with pytest.raises(ValueError, match="nothing to run"):
        edge.submit(new_chain(tiny, Request("x", steps=4), parse_plan("small@device:0-4")))


def test_node_executors_hand_over(tiny):
    req = Request("a blue square", steps=6, seed=2)
    plan = parse_plan("large@edge:0-2,small@device:2-6")
    edge, device = Executor(tiny, node="edge"), Executor(tiny, node="device")
    c = new_chain(tiny, req, plan)
    edge.submit(c)
    (left,) = edge.run()
    assert left.step == 2
    device.submit(left)
    device.run()
    assert torch.equal(c.latents, _alone(tiny, req, plan).latents)
    assert run_chains(tiny, [c])[0].image is not None


def test_bench_engine_reports_the_contract_fields():
    from relaydiff.bench.engine import bench_engine

    out = bench_engine(n_requests=3, steps=3, max_batch=4)
    for key in ("requests", "sequential_images_per_s", "batched_images_per_s", "speedup", "hardware"):
        assert key in out
    assert out["requests"] == 3 and out["batched_unet_calls"] < 3 * 3
    assert out["speedup"] == pytest.approx(out["batched_images_per_s"] / out["sequential_images_per_s"])


def test_traced_unets_give_the_eager_images_and_keep_adapters_apart():
    """Traces are exact for every member and adapter, batch-size independent, and rebuilt on to()."""
    from relaydiff.engine.family import tiny_family

    fam = tiny_family(0)
    reqs = [Request(prompt=f"a red circle {i}", steps=4, guidance=3.0, seed=i) for i in range(3)]
    plans = [parse_plan("large:0-2,small+style_a:2-4"), parse_plan("small:0-4"), parse_plan("small+style_b:0-4")]
    eager = generate(fam, reqs, plans, max_batch=2)
    fam.trace = True
    traced = generate(fam, reqs, plans, max_batch=2)
    assert len(fam._traced) == 4  # (large), (small), (small, style_a), (small, style_b)
    for a, b in zip(eager, traced):
        assert np.array_equal(a.image, b.image)
    single = generate(fam, reqs[:1], plans[:1], max_batch=1)  # batch 1 reuses the traces made at batch 2
    assert np.array_equal(single[0].image, eager[0].image) and len(fam._traced) == 4
    fam.to(dtype=torch.float64)
    assert not fam._traced
    x = torch.randn(2, *fam.latent_shape, dtype=torch.float64)
    ctx = fam.encode_prompt(["a", "b"]).double()
    t = torch.tensor([10, 500])
    out = fam.denoise("small", "style_a", x, t, ctx)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, fam.unet("small", "style_a")(x, t, encoder_hidden_states=ctx).sample)


def test_a_guidance_distilled_member_runs_one_row_unless_the_plan_says_otherwise(tiny):
    """Its guidance is in its weights: a segment left to the request's guidance runs it at g=1."""
    req = Request("a red circle", steps=8, guidance=3.0, seed=0)
    explicit_off = _alone(tiny, req, parse_plan("large:0-3,small:3-8[g=1]"))
    plain = _alone(tiny, req, parse_plan("large:0-3,small:3-8"))
    tiny.guidance_distilled = {"small": 3.0}
    try:
        native = _alone(tiny, req, parse_plan("large:0-3,small:3-8"))
        forced = _alone(tiny, req, parse_plan("large:0-3,small:3-8[g=3]"))
        (stopped,) = generate(tiny, [req], [parse_plan("large@edge:0-3,small@device:3-8")], stop_at=3, max_batch=1)
        wire = encode_handoff(stopped.handoff, dtype="fp32")
        resumed = resume(tiny, decode_handoff(wire, expect_latent_shape=(1, *tiny.latent_shape)))
    finally:
        tiny.guidance_distilled = {}
    assert native.accounting["unet_evals"] == {"large": 6, "small": 5}
    assert torch.equal(native.latents, explicit_off.latents)
    assert forced.accounting["unet_evals"] == {"large": 6, "small": 10}
    assert torch.equal(forced.latents, plain.latents)
    assert torch.equal(resumed.latents, native.latents)


@pytest.mark.parametrize("trace", [False, True])
def test_row_workers_split_a_call_and_give_its_numbers(trace):
    """``row_workers`` runs a U-Net call's rows in parts on threads: the same numbers as the whole call
    (to float rounding), every part on a pool thread, and the family's default stays one whole call."""
    import threading

    from relaydiff.engine.family import tiny_family

    fam = tiny_family(0)
    fam.trace = trace
    assert fam.row_workers == 1
    member = sorted(fam.members)[0]
    cfg = fam.members[member].config
    torch.manual_seed(0)
    x = torch.randn(5, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    t = torch.full((5,), 500, dtype=torch.int64)
    ctx = fam.encode_prompt(["a red circle", "", "a blue square", "", "a star"])
    whole = fam.denoise(member, None, x, t, ctx)
    seen = []
    real = fam._denoise_rows
    fam._denoise_rows = lambda *a: (seen.append((threading.current_thread().name, a[2].shape[0])), real(*a))[1]
    fam.row_workers = 2
    parts = fam.denoise(member, None, x, t, ctx)
    assert sorted(n for _, n in seen) == [2, 3] and all(name.startswith("relaydiff-rows") for name, _ in seen)
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-5)
