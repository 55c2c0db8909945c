"""Samplers: whole chains against diffusers' schedulers, exact resumption through safetensors, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from relaydiff.engine.samplers import SAMPLERS, Schedule, Sampler, SamplerError, make_sampler

SHAPE = (1, 4, 8, 8)
SD15 = {  # diffusers' scheduler_config.json of SD 1.5 (PNDM keys included: they must be ignored)
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False,
    "skip_prk_steps": True, "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "leading",
}
DIFFUSERS_DEFAULTS: dict = {}  # each diffusers class's own defaults (linear betas, clip_sample for DDIM, ...)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: threads only add contention on the shared 2-core machine (20 ms vs 0.1 ms a matvec)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


REFERENCE = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}


class FakeModel:
    """A deterministic stand-in for a U-Net that behaves like a denoiser, so latents stay O(1).

    Its clean-sample guess is a fixed pattern plus a fixed random linear map of x plus a function of
    t; it returns that guess as the config's prediction type (using the config's own alpha_bar, in
    float64 numpy, independent of the code under test).
    """

    def __init__(self, seed: int = 0, config: dict | None = None) -> None:
        config = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                  "prediction_type": "epsilon", **(config or {})}
        g = torch.Generator().manual_seed(seed)
        d = math.prod(SHAPE)
        self.w = torch.randn(d, d, generator=g) * (0.3 / math.sqrt(d))
        self.mean = torch.randn(SHAPE, generator=g)
        self.phase = torch.rand(SHAPE, generator=g) * 6.28
        n, b0, b1 = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
        betas = {"linear": np.linspace(b0, b1, n), "scaled_linear": np.linspace(b0**0.5, b1**0.5, n) ** 2}.get(
            config["beta_schedule"], np.full(n, 0.01))
        self.alpha_bar = np.cumprod(1 - betas)
        self.prediction_type = config["prediction_type"]

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = float(t)
        ab = float(np.interp(t, np.arange(self.alpha_bar.size), self.alpha_bar))
        a, b = math.sqrt(ab), math.sqrt(1 - ab)
        x0 = self.mean + 0.2 * (self.w @ x.reshape(-1)).reshape(SHAPE) + 0.1 * torch.sin(t / 150.0 + self.phase)
        x0 = x0.to(x.dtype)
        eps = (x - a * x0) / b
        return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - b * x0}[self.prediction_type]


def noise(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def diffusers_chain(name: str, config: dict, steps: int, model: FakeModel, seed: int = 0, **step_kwargs):
    sched = REFERENCE[name].from_config({**config, **({"algorithm_type": "dpmsolver++", "solver_order": 2}
                                                       if name == "dpmpp_2m" else {})})
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed + 1)
    x = noise(seed) * sched.init_noise_sigma
    xs = []
    for t in sched.timesteps:
        out = model(sched.scale_model_input(x, t), t)
        kwargs = {"generator": gen, **step_kwargs} if name != "dpmpp_2m" else {}
        x = sched.step(out, t, x, **kwargs).prev_sample
        xs.append(x)
    return sched.timesteps, xs


def our_chain(sampler: Sampler, steps: int, model: FakeModel, seed: int = 0):
    sched = sampler.schedule(steps)
    gen = torch.Generator().manual_seed(seed + 1)
    x = noise(seed) * sampler.init_noise_sigma(sched)
    state = sampler.initial_state()
    xs = []
    for i in range(steps):
        out = model(sampler.scale_model_input(x, sched, i), sched.timesteps[i])
        x, state = sampler.step(x, out, sched, i, state, gen)
        xs.append(x)
    return sched.timesteps, xs


def assert_chains_match(name: str, config: dict, steps: int, options: dict | None = None) -> float:
    options = options or {}
    model = FakeModel(seed=steps, config=config)
    ref_t, ref_xs = diffusers_chain(name, config, steps, model, **options)
    t, xs = our_chain(make_sampler(name, config, **options), steps, model)
    assert torch.equal(t.double(), ref_t.double()), (t, ref_t)
    assert t.dtype == (torch.float32 if name == "euler" else torch.int64)
    # fp32: the final latents (|x| ~ 3) to 1e-5 absolute; intermediate ones, which in Euler's VE scale
    # reach |x| ~ 500 (an fp32 ulp there is 3e-5), to 1e-5 relative to their magnitude.
    for i, (a, b) in enumerate(zip(xs, ref_xs)):
        diff, scale = float((a - b).abs().max()), max(1.0, float(b.abs().max()))
        assert diff <= 1e-5 * scale, f"{name} {config} T={steps}: step {i} max abs diff {diff:.3g} (|x| {scale:.3g})"
    worst = float((xs[-1] - ref_xs[-1]).abs().max())
    assert worst <= 1e-5, f"{name} {config} T={steps}: final max abs diff {worst:.3g}"
    assert float(xs[-1].abs().max()) > 0.05  # the chain really moved (not a vacuous comparison)
    return worst


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("config,steps", [(SD15, 1), (SD15, 4), (SD15, 8), (SD15, 25), (DIFFUSERS_DEFAULTS, 4),
                                          (DIFFUSERS_DEFAULTS, 8), (DIFFUSERS_DEFAULTS, 25)],
                         ids=["sd15-1", "sd15-4", "sd15-8", "sd15-25", "defaults-4", "defaults-8", "defaults-25"])
def test_whole_chain_matches_diffusers(name: str, steps: int, config: dict) -> None:
    # (defaults with T=1 is left out: one step from alpha_bar = 4e-5 straight to x0 divides by
    # alpha = 0.006, so fp32 rounding alone moves diffusers 5.6e-5 off its own fp64 result.)
    assert_chains_match(name, config, steps)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [3, 7, 16])
def test_spacings_and_prediction_types_match_diffusers(name, spacing, prediction_type, steps) -> None:
    # clip_sample off: with "sample"/v outputs of a fake model, clipping would hide most of the math.
    config = {**SD15, "timestep_spacing": spacing, "prediction_type": prediction_type, "clip_sample": False}
    assert_chains_match(name, config, steps)


@pytest.mark.parametrize("extra", [
    {"final_sigmas_type": "sigma_min"},
    {"final_sigmas_type": "sigma_min", "lower_order_final": False},
    {"final_sigmas_type": "sigma_min", "euler_at_final": True},
    {"solver_type": "heun"},
    {"solver_type": "heun", "final_sigmas_type": "sigma_min", "lower_order_final": False},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "linear", "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
])
@pytest.mark.parametrize("steps", [4, 14, 15, 25])
def test_dpm_final_step_conventions_match_diffusers(extra: dict, steps: int) -> None:
    assert_chains_match("dpmpp_2m", {**SD15, **extra}, steps)


@pytest.mark.parametrize("extra", [
    {"final_sigmas_type": "sigma_min"}, {"beta_schedule": "squaredcos_cap_v2"},
    {"trained_betas": torch.linspace(1e-4, 0.02, 1000).tolist()},
])
@pytest.mark.parametrize("steps", [4, 25])
def test_euler_options_match_diffusers(extra: dict, steps: int) -> None:
    assert_chains_match("euler", {**SD15, **extra}, steps)


@pytest.mark.parametrize("config", [
    {**SD15, "set_alpha_to_one": True}, {**SD15, "clip_sample": True, "clip_sample_range": 1.5},
    {**SD15, "timestep_spacing": "trailing"}, {**SD15, "beta_schedule": "squaredcos_cap_v2"},
])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("steps", [3, 10])
def test_ddim_options_and_eta_match_diffusers(config: dict, eta: float, steps: int) -> None:
    assert_chains_match("ddim", config, steps, {"eta": eta})


def test_ddim_trailing_quirk_is_kept() -> None:
    # T=3 trailing: timesteps 999, 666, 332 but diffusers' DDIM steps to t - 333 (666, 333, 0 -> final).
    sched = make_sampler("ddim", {**SD15, "timestep_spacing": "trailing"}).schedule(3)
    assert sched.timesteps.tolist() == [999, 666, 332]
    assert not torch.equal(sched.sigmas_next[:-1], sched.sigmas[1:])


def _roundtrip(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return st_load(st_save(tensors)) if tensors else {}


@pytest.mark.parametrize("name,options", [("ddim", {}), ("ddim", {"eta": 0.7}), ("euler", {}), ("dpmpp_2m", {}),
                                          ("dpmpp_2m", {"solver_type": "heun", "final_sigmas_type": "sigma_min"})])
def test_resume_at_every_step_is_bit_identical(name: str, options: dict) -> None:
    steps, model = 9, FakeModel(3, SD15)
    _, whole = our_chain(make_sampler(name, SD15, **options), steps, model, seed=5)
    for k in range(steps + 1):
        # first process: steps 0..k-1
        sampler = make_sampler(name, SD15, **options)
        sched = sampler.schedule(steps)
        gen = torch.Generator().manual_seed(6)
        x, state = noise(5) * sampler.init_noise_sigma(sched), sampler.initial_state()
        for i in range(k):
            x, state = sampler.step(x, model(sampler.scale_model_input(x, sched, i), sched.timesteps[i]),
                                    sched, i, state, gen)
        wire = st_save({"x": x, "gen": gen.get_state(), **{f"s.{n}": v for n, v in sched.tensors().items()},
                        **{f"h.{n}": v for n, v in state.items()}})
        # second process: a fresh sampler, everything else read back from bytes
        got = st_load(wire)
        sampler2 = make_sampler(name, sampler.config)
        sched2 = Schedule.from_tensors({n[2:]: v for n, v in got.items() if n.startswith("s.")})
        state2 = {n[2:]: v for n, v in got.items() if n.startswith("h.")}
        gen2 = torch.Generator()
        gen2.set_state(got["gen"])
        x2 = got["x"]
        for i in range(k, steps):
            x2, state2 = sampler2.step(x2, model(sampler2.scale_model_input(x2, sched2, i), sched2.timesteps[i]),
                                       sched2, i, state2, gen2)
            assert torch.equal(x2, whole[i]), f"{name} split at {k}: step {i} differs"


def test_dpm_history_must_travel_with_the_chain() -> None:
    sampler, model = make_sampler("dpmpp_2m", SD15), FakeModel(1, SD15)
    sched = sampler.schedule(6)
    x, state = noise(0), sampler.initial_state()
    for i in range(3):
        x, state = sampler.step(x, model(x, sched.timesteps[i]), sched, i, state)
    assert set(state) == {"last_step", "prev_x0"} and int(state["last_step"]) == 2
    out = model(x, sched.timesteps[3])
    with pytest.raises(SamplerError, match="history"):
        sampler.step(x, out, sched, 3, sampler.initial_state())
    with pytest.raises(SamplerError, match="step 1"):
        sampler.step(x, out, sched, 2, state)  # stale: history of step 2 used at step 2
    # the history changes the result: with prev_x0 set to this step's own x0 prediction the
    # second-order correction vanishes, i.e. a first-order step, which differs from the real one.
    x_second, after = sampler.step(x, out, sched, 3, state)
    x_first, _ = sampler.step(x, out, sched, 3, {"last_step": torch.tensor(2), "prev_x0": after["prev_x0"]})
    assert float((x_second - x_first).abs().max()) > 1e-3


def test_state_is_not_mutated_and_step_is_pure() -> None:
    sampler, model = make_sampler("dpmpp_2m", SD15), FakeModel(2, SD15)
    sched = sampler.schedule(5)
    x, state = noise(1), sampler.initial_state()
    x, state = sampler.step(x, model(x, sched.timesteps[0]), sched, 0, state)
    before = {k: v.clone() for k, v in state.items()}
    out = model(x, sched.timesteps[1])
    a, sa = sampler.step(x, out, sched, 1, state)
    b, sb = sampler.step(x, out, sched, 1, state)
    assert torch.equal(a, b) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(state[k], before[k]) for k in state)


def test_stochastic_flag_and_generator() -> None:
    assert not make_sampler("ddim", SD15).stochastic
    assert not make_sampler("euler", SD15).stochastic and not make_sampler("dpmpp_2m", SD15).stochastic
    sampler = make_sampler("ddim", SD15, eta=0.3)
    assert sampler.stochastic
    sched = sampler.schedule(4)
    with pytest.raises(SamplerError, match="Generator"):
        sampler.step(noise(0), noise(1), sched, 0, {})
    a, _ = sampler.step(noise(0), noise(1), sched, 0, {}, torch.Generator().manual_seed(1))
    b, _ = sampler.step(noise(0), noise(1), sched, 0, {}, torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", SAMPLERS)
def test_half_precision_keeps_dtype(name: str) -> None:
    sampler, model = make_sampler(name, SD15), FakeModel(4, SD15)
    sched = sampler.schedule(4)
    x32, state32 = noise(2) * sampler.init_noise_sigma(sched), sampler.initial_state()
    x16, state16 = x32.half(), sampler.initial_state()
    for i in range(4):
        x32, state32 = sampler.step(x32, model(sampler.scale_model_input(x32, sched, i), sched.timesteps[i]),
                                    sched, i, state32)
        out16 = model(sampler.scale_model_input(x16, sched, i).float(), sched.timesteps[i]).half()
        x16, state16 = sampler.step(x16, out16, sched, i, state16)
        assert x16.dtype == torch.float16
    assert float((x16.float() - x32).abs().max()) < 2e-2


def test_schedule_tensors_roundtrip_and_validation() -> None:
    sched = make_sampler("dpmpp_2m", SD15).schedule(8)
    back = Schedule.from_tensors(_roundtrip(sched.tensors()))
    assert all(torch.equal(a, b) for a, b in zip(sched.tensors().values(), back.tensors().values()))
    good = sched.tensors()
    bad_cases = [
        ({k: v for k, v in good.items() if k != "sigmas"}, "exactly"),
        ({**good, "extra": torch.zeros(8)}, "exactly"),
        ({**good, "sigmas": good["sigmas"].float()}, "float64"),
        ({**good, "sigmas_next": good["sigmas_next"][:-1]}, "shape"),
        ({**good, "timesteps": good["timesteps"].flip(0)}, "decreasing"),
        ({**good, "timesteps": good["timesteps"].to(torch.int32)}, "int64"),
        ({**good, "timesteps": torch.zeros(0, dtype=torch.int64)}, r"\[T\]"),
        ({**good, "sigmas": torch.full((8,), float("nan"), dtype=torch.float64)}, "finite"),
        ({**good, "sigmas_next": good["sigmas"] + 1.0}, "raise"),
        ({**good, "timesteps": [1, 2]}, "torch.Tensor"),
    ]
    for tensors, message in bad_cases:
        with pytest.raises(SamplerError, match=message):
            Schedule.from_tensors(tensors)


def test_bad_input_gives_clear_errors() -> None:
    with pytest.raises(SamplerError, match="unknown sampler 'plms'"):
        make_sampler("plms", SD15)
    with pytest.raises(SamplerError, match="unknown option"):
        make_sampler("euler", SD15, eta=0.5)
    with pytest.raises(SamplerError, match="use_karras_sigmas"):
        make_sampler("dpmpp_2m", {**SD15, "use_karras_sigmas": True})
    with pytest.raises(SamplerError, match="thresholding"):
        make_sampler("ddim", {**SD15, "thresholding": True})
    make_sampler("euler", {**SD15, "use_karras_sigmas": None, "thresholding": True})  # None = off; not read by Euler
    with pytest.raises(SamplerError, match="prediction_type"):
        make_sampler("ddim", {**SD15, "prediction_type": "flow_prediction"})
    with pytest.raises(SamplerError, match="eta"):
        make_sampler("ddim", SD15, eta=1.5)
    with pytest.raises(SamplerError, match="trained_betas"):
        make_sampler("ddim", {**SD15, "trained_betas": [0.1, 0.2]})
    with pytest.raises(SamplerError, match="trained_betas"):
        make_sampler("ddim", {**SD15, "trained_betas": "0.1"})
    with pytest.raises(SamplerError, match="betas must lie"):
        make_sampler("ddim", {**SD15, "num_train_timesteps": 3, "trained_betas": [0.1, float("nan"), 0.2]})
    with pytest.raises(SamplerError, match="num_train_timesteps"):
        make_sampler("euler", {**SD15, "num_train_timesteps": 10**9})
    with pytest.raises(SamplerError, match="dict"):
        make_sampler("ddim", ["not", "a", "dict"])
    sampler = make_sampler("euler", SD15)
    for steps in (0, 1001, True, 2.5):
        with pytest.raises(SamplerError, match="steps"):
            sampler.schedule(steps)
    with pytest.raises(SamplerError, match="no valid"):  # leading + offset 1 runs past t = 999
        make_sampler("ddim", SD15).schedule(1000)
    sched = sampler.schedule(4)
    x = noise(0)
    for i in (-1, 4, 1.0):
        with pytest.raises(SamplerError, match="step index"):
            sampler.step(x, x, sched, i, {})
    with pytest.raises(SamplerError, match="shape"):
        sampler.step(x, x[:, :2], sched, 0, {})
    with pytest.raises(SamplerError, match="no state"):
        sampler.step(x, x, sched, 0, {"last_step": torch.tensor(0)})


def test_sampler_config_rebuilds_the_same_sampler() -> None:
    for name in SAMPLERS:
        a = make_sampler(name, SD15)
        b = make_sampler(name, a.config)
        assert all(torch.equal(u, v) for u, v in zip(a.schedule(12).tensors().values(),
                                                     b.schedule(12).tensors().values()))
    assert make_sampler("ddim", SD15, eta=0.25).config["eta"] == 0.25


_DTYPES = [torch.int64, torch.int32, torch.float32, torch.float64, torch.float16, torch.uint8, torch.bool]


@st.composite
def schedule_like(draw) -> dict:
    """Dicts that look more or less like schedule tensors: random keys, dtypes, shapes and values."""
    keys = draw(st.sets(st.sampled_from(["timesteps", "sigmas", "sigmas_next", "x"]), min_size=0, max_size=4))
    if draw(st.booleans()):
        keys = {"timesteps", "sigmas", "sigmas_next"}
    n = draw(st.integers(0, 6))
    out = {}
    for key in keys:
        shape = draw(st.sampled_from([(n,), (n + 1,), (), (1, n)]))
        values = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32),
                               min_size=math.prod(shape), max_size=math.prod(shape)))
        if draw(st.booleans()):  # often sorted descending, so that deeper checks are reached
            values = sorted(values, key=lambda v: -v if v == v else 0.0)
        dtype = draw(st.sampled_from(_DTYPES))
        t = torch.tensor(values, dtype=torch.float64).reshape(shape)
        out[key] = t.nan_to_num(0.0).clamp(-1e6, 1e6).to(dtype) if not dtype.is_floating_point else t.to(dtype)
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule_like())
def test_schedule_from_random_tensors_is_valid_or_a_clear_error(tensors: dict) -> None:
    try:
        sched = Schedule.from_tensors(tensors)
    except SamplerError:
        return
    s, sn = sched.sigmas, sched.sigmas_next
    assert bool((s > 0).all() and (sn >= 0).all() and (sn <= s).all() and torch.isfinite(s).all())
    assert bool((sched.timesteps[1:] < sched.timesteps[:-1]).all())


def test_dpm_state_validation() -> None:
    sampler = make_sampler("dpmpp_2m", SD15)
    sched, x = sampler.schedule(4), noise(0)
    _, state = sampler.step(x, x, sched, 0, sampler.initial_state())
    bad = [({}, 1, "last_step"), ({"last_step": torch.tensor(0.0)}, 1, "last_step"),
           ({"last_step": torch.tensor([0])}, 1, "last_step"), ({"last_step": torch.tensor(0)}, 1, "prev_x0"),
           ({**state, "prev_x0": x[:, :1]}, 1, "shape"), ({**state, "junk": x}, 1, "prev_x0"),
           ({"last_step": torch.tensor(-1), "prev_x0": x}, 0, "only")]
    for bad_state, i, message in bad:
        with pytest.raises(SamplerError, match=message):
            sampler.step(x, x, sched, i, bad_state)
