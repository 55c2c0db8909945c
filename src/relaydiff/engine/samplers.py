"""Samplers that advance one chain from explicit, serializable position: (x, step i, Schedule, state).

Why not diffusers' schedulers directly: they keep the step index and the multistep history inside
the scheduler object, so one object serves one chain that starts at step 0. The relay engine
batches chains that sit at different steps (each with its own T), stops them anywhere and resumes
them in another process. That needs a chain's whole position in plain tensors (a ``Schedule`` and a
state dict) that survive a safetensors round trip bit for bit, and a sampler object that holds only
the family's configuration.

The loop for one chain::

    sched = sampler.schedule(T); state = sampler.initial_state()
    x = noise * sampler.init_noise_sigma(sched)
    for i in range(T):
        out = unet(sampler.scale_model_input(x, sched, i), sched.timesteps[i], cond)   # + guidance
        x, state = sampler.step(x, out, sched, i, state, generator)

The executor batches that loop over chains, each at its own step of its own schedule:
``scale_model_inputs`` and ``step_batch`` take one row per chain and run each term of the update
as one tensor op over the batch, with the per-chain scalars (noise levels, solver coefficients) as
a column. ``step`` is ``step_batch`` on one chain: a chain gives the same bits alone or batched.

Each sampler is built from a diffusers-style scheduler config (a plain dict) and follows the
diffusers scheduler of the same name built by ``from_config`` on that dict: the same timesteps,
noise levels, prediction types and final-step conventions (tests/test_samplers.py checks whole
chains against DDIMScheduler, EulerDiscreteScheduler and DPMSolverMultistepScheduler). Keys that
the sampler does not read are ignored, as ``from_config`` does (so are ``algorithm_type`` and
``solver_order``: the sampler's name fixes them); keys that would select behaviour not implemented
here (Karras sigmas, thresholding, zero-SNR rescaling, ...) are rejected.

Noise levels are stored as the variance-exploding sigma ``sqrt((1 - alpha_bar) / alpha_bar)`` in
float64 for every sampler, so one Schedule layout serves all of them. The step math runs in
float32 (or wider) and the result is cast back to the input dtype, as diffusers does for fp16.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Mapping

import numpy as np
import torch

from relaydiff.engine.plan import MAX_STEPS

SAMPLERS: tuple[str, ...] = ("ddim", "euler", "dpmpp_2m")
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")
BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")
# sampling steps share the plan's bound (one MAX_STEPS); the training timesteps of a scheduler config
# are another quantity, with a sanity bound of their own (schedules are read back from handoffs)
MAX_TRAIN_TIMESTEPS = 100_000


class SamplerError(ValueError):
    """A sampler config, schedule, state or step index that cannot be used."""


# ---- the schedule ------------------------------------------------------------------------------

_SCHEDULE_KEYS = ("timesteps", "sigmas", "sigmas_next")


@dataclass(frozen=True, eq=False)
class Schedule:
    """Everything a chain needs to continue, independent of the process that started it.

    timesteps: [T] model timesteps as passed to the U-Net (int64; float32 for Euler, whose
        "linspace" spacing gives fractional timesteps, as in diffusers).
    sigmas: [T] float64, noise level sqrt((1 - a_bar) / a_bar) of the input of step i.
    sigmas_next: [T] float64, the level step i lands on. Equals sigmas[1:] plus the final level,
        except for DDIM, which (as in diffusers) steps to timestep t_i - N // T.
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor
    sigmas_next: torch.Tensor

    def __post_init__(self) -> None:
        for key in _SCHEDULE_KEYS:
            if not isinstance(getattr(self, key), torch.Tensor):
                raise SamplerError(f"schedule {key} must be a torch.Tensor, got {type(getattr(self, key)).__name__}")
        t, s, sn = self.timesteps, self.sigmas, self.sigmas_next
        if t.dim() != 1 or not 1 <= t.numel() <= MAX_STEPS:
            raise SamplerError(f"schedule timesteps must have shape [T] with 1 <= T <= {MAX_STEPS}, "
                               f"got {tuple(t.shape)}")
        if t.dtype not in (torch.int64, torch.float32):
            raise SamplerError(f"schedule timesteps must be int64 or float32, got {t.dtype}")
        n = t.numel()
        for key, v in (("sigmas", s), ("sigmas_next", sn)):
            if v.dtype != torch.float64 or tuple(v.shape) != (n,):
                raise SamplerError(f"schedule {key} must be float64 of shape ({n},), got {v.dtype} {tuple(v.shape)}")
        tv, sv, snv = t.double().tolist(), s.tolist(), sn.tolist()
        if not all(math.isfinite(v) and v >= 0 for v in tv):
            raise SamplerError("schedule timesteps must be finite and >= 0")
        if not all(math.isfinite(v) and v > 0 for v in sv) or not all(math.isfinite(v) and v >= 0 for v in snv):
            raise SamplerError("schedule sigmas must be finite and > 0, sigmas_next finite and >= 0")
        if any(a <= b for a, b in zip(tv, tv[1:])) or any(a <= b for a, b in zip(sv, sv[1:])):
            raise SamplerError("schedule timesteps and sigmas must be strictly decreasing")
        if any(b > a for a, b in zip(sv, snv)):  # equal happens: DDIM's last step from t=0 to alpha_bar_0
            raise SamplerError("no step may raise the noise level (need sigmas_next <= sigmas)")

    @property
    def steps(self) -> int:
        return self.timesteps.numel()

    @cached_property
    def values(self) -> dict[str, list[float] | list[int]]:
        """The schedule as Python numbers, read once: per-step scalars without a tensor index per step."""
        return {key: getattr(self, key).tolist() for key in _SCHEDULE_KEYS}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The schedule as named tensors, for the safetensors handoff."""
        return {key: getattr(self, key).detach().cpu().contiguous().clone() for key in _SCHEDULE_KEYS}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> Schedule:
        keys = set(tensors)
        if keys != set(_SCHEDULE_KEYS):
            raise SamplerError(f"schedule tensors must be exactly {sorted(_SCHEDULE_KEYS)}, got {sorted(keys)}")
        return cls(**{key: tensors[key] for key in _SCHEDULE_KEYS})

    def check_index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= int(i) < self.steps:
            raise SamplerError(f"step index must be an int in [0, {self.steps}), got {i!r}")
        return int(i)


# ---- the training noise schedule -------------------------------------------------------------


def train_alphas_cumprod(config: Mapping[str, Any]) -> torch.Tensor:
    """alpha_bar over the training timesteps, in float32 as diffusers-trained models define it."""
    n = config["num_train_timesteps"]
    if config.get("trained_betas") is not None:
        try:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as err:
            raise SamplerError(f"trained_betas must be a list of numbers: {err}") from None
        if betas.shape != (n,):
            raise SamplerError(f"trained_betas must have num_train_timesteps={n} values, got {tuple(betas.shape)}")
    elif config["beta_schedule"] == "linear":
        betas = torch.linspace(config["beta_start"], config["beta_end"], n, dtype=torch.float32)
    elif config["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n, dtype=torch.float32) ** 2
    else:  # squaredcos_cap_v2: the cosine alpha_bar of Nichol & Dhariwal (2021), betas capped at 0.999

        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - alpha_bar((k + 1) / n) / alpha_bar(k / n), 0.999) for k in range(n)],
                             dtype=torch.float32)
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise SamplerError("betas must lie in (0, 1)")
    return torch.cumprod(1.0 - betas, dim=0)


def _spaced_timesteps(config: Mapping[str, Any], steps: int, *, extra_point: bool,
                      round_linspace: bool) -> np.ndarray:
    """Descending timesteps for T steps by the config's timestep_spacing (float64 values).

    extra_point: space T + 1 points and drop the last (t = 0), as DPM-Solver does in diffusers.
    round_linspace: round "linspace" timesteps to integers (DDIM, DPM) or keep them fractional (Euler).
    """
    n, spacing = config["num_train_timesteps"], config["timestep_spacing"]
    points = steps + 1 if extra_point else steps
    if spacing == "trailing":
        t = np.round(np.arange(n, 0, -n / steps)) - 1
    else:
        if spacing == "linspace":
            t = np.linspace(0, n - 1, points)
            t = t.round() if round_linspace else t
        else:  # leading
            t = np.arange(points, dtype=np.float64) * (n // points) + config["steps_offset"]
        t = t[::-1][:steps]
    if t.shape != (steps,) or t.min() < 0 or t.max() > n - 1 or np.any(np.diff(t) >= 0):
        raise SamplerError(f"steps={steps} with timestep_spacing={spacing!r}, steps_offset={config['steps_offset']} "
                           f"and num_train_timesteps={n} gives no valid strictly decreasing timesteps")
    return np.ascontiguousarray(t)


def _vp(sigma: float) -> tuple[float, float]:
    """(alpha, sigma_vp) of the variance-preserving process at VE noise level sigma."""
    alpha = 1.0 / math.sqrt(1.0 + sigma * sigma)
    return alpha, sigma * alpha


def _x0_eps(x: torch.Tensor, out: torch.Tensor, prediction_type: str, alpha: float | torch.Tensor,
            sigma: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean-sample and noise predictions from a model output, for a VP sample x = alpha x0 + sigma eps."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha, out
    if prediction_type == "sample":
        return out, (x - alpha * out) / sigma
    return alpha * x - sigma * out, alpha * out + sigma * x  # v_prediction


def _columns(x: torch.Tensor, *values: Sequence[float]) -> list[torch.Tensor]:
    """Per-chain scalars (one list per quantity) as tensors that broadcast over x, whose rows are the
    chains' blocks of x.shape[0] // n rows each; one tensor is built for all quantities."""
    n = len(values[0])
    table = torch.tensor(values, dtype=x.dtype, device=x.device)
    if x.shape[0] != n:
        table = table.repeat_interleave(x.shape[0] // n, dim=1)
    return list(table.view(len(values), -1, *(1,) * (x.dim() - 1)).unbind(0))


# ---- samplers ------------------------------------------------------------------------------------

_COMMON_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon", "steps_offset": 0,
}
# Config keys that select behaviour not implemented here, with the only value accepted.
_COMMON_FIXED: dict[str, Any] = {"rescale_betas_zero_snr": False}
_SIGMA_FIXED: dict[str, Any] = {
    **_COMMON_FIXED, "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
}


class Sampler(ABC):
    """Advances one chain by one step; holds only configuration, never a chain's position."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]]      # config keys read, with the diffusers class's defaults
    fixed: ClassVar[dict[str, Any]]         # config keys accepted only at this value
    option_defaults: ClassVar[dict[str, Any]] = {}  # per-request options that no scheduler config holds

    def __init__(self, scheduler_config: Mapping[str, Any], **options: Any) -> None:
        if not isinstance(scheduler_config, Mapping):
            raise SamplerError(f"scheduler_config must be a dict, got {type(scheduler_config).__name__}")
        known = set(self.defaults) | set(self.option_defaults)
        unknown = sorted(set(options) - known)
        if unknown:
            raise SamplerError(f"unknown option(s) {unknown} for sampler {self.name!r}; known: {sorted(known)}")
        for key, only in self.fixed.items():
            value = scheduler_config.get(key, only)
            if value != only and value is not None:  # diffusers reads None as "off" for these keys
                raise SamplerError(f"{self.name}: scheduler config {key}={value!r} is not supported (only {only!r})")
        cfg = {**self.defaults, **self.option_defaults}
        cfg.update({k: v for k, v in scheduler_config.items() if k in known})  # so make_sampler(n, s.config) rebuilds s
        cfg.update(options)
        self.config: dict[str, Any] = self._validate(cfg)
        self._train_sigmas = self._sigmas_of_alphas(train_alphas_cumprod(self.config))
        self.stochastic: bool = False
        # samplers with equal keys compute alike: the executor steps their chains together
        self.batch_key: tuple[str, str] = (self.name, json.dumps(self.config, sort_keys=True, default=repr))

    @staticmethod
    def _sigmas_of_alphas(alphas_cumprod: torch.Tensor) -> np.ndarray:
        ac = alphas_cumprod.double().numpy()
        return np.sqrt((1.0 - ac) / ac)

    def _validate(self, cfg: dict[str, Any]) -> dict[str, Any]:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise SamplerError(f"{self.name}: {key}={cfg[key]!r} is invalid: expected {what}")

        def is_int(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)

        need(is_int(cfg["num_train_timesteps"]) and 2 <= cfg["num_train_timesteps"] <= MAX_TRAIN_TIMESTEPS,
             "num_train_timesteps", f"an int in [2, {MAX_TRAIN_TIMESTEPS}]")
        if cfg["trained_betas"] is None:
            need(cfg["beta_schedule"] in BETA_SCHEDULES, "beta_schedule", f"one of {BETA_SCHEDULES}")
            for key in ("beta_start", "beta_end"):
                need(is_num(cfg[key]) and 0 < cfg[key] < 1, key, "a number in (0, 1)")
        need(cfg["prediction_type"] in PREDICTION_TYPES, "prediction_type", f"one of {PREDICTION_TYPES}")
        need(cfg["timestep_spacing"] in TIMESTEP_SPACINGS, "timestep_spacing", f"one of {TIMESTEP_SPACINGS}")
        need(is_int(cfg["steps_offset"]) and cfg["steps_offset"] >= 0, "steps_offset", "an int >= 0")
        for key, value in cfg.items():
            if isinstance(self.defaults.get(key, self.option_defaults.get(key)), bool):
                need(isinstance(value, bool), key, "a bool")
        if "final_sigmas_type" in cfg:
            need(cfg["final_sigmas_type"] in ("zero", "sigma_min"), "final_sigmas_type", "'zero' or 'sigma_min'")
        if "eta" in cfg:
            need(is_num(cfg["eta"]) and 0 <= cfg["eta"] <= 1, "eta", "a number in [0, 1]")
        if "clip_sample_range" in cfg:
            need(is_num(cfg["clip_sample_range"]) and cfg["clip_sample_range"] > 0, "clip_sample_range",
                 "a number > 0")
        if "solver_type" in cfg:
            need(cfg["solver_type"] in ("midpoint", "heun"), "solver_type", "'midpoint' or 'heun'")
        return cfg

    def _final_sigma(self, to_zero: bool) -> float:
        return 0.0 if to_zero else float(self._train_sigmas[0])

    def _at(self, timesteps: np.ndarray) -> np.ndarray:
        """Training noise levels at (possibly fractional) timesteps, linearly interpolated."""
        return np.interp(timesteps, np.arange(self._train_sigmas.size), self._train_sigmas)

    def _check_steps(self, steps: int) -> None:
        n = self.config["num_train_timesteps"]
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= n:
            raise SamplerError(f"steps must be an int in [1, num_train_timesteps={n}], got {steps!r}")

    # -- the per-chain interface --

    @abstractmethod
    def schedule(self, steps: int) -> Schedule:
        """The chain's timesteps and noise levels for T = steps."""

    def init_noise_sigma(self, schedule: Schedule) -> float:
        """Standard deviation of the starting noise."""
        return 1.0

    def scale_model_input(self, x: torch.Tensor, schedule: Schedule, i: int) -> torch.Tensor:
        return self.scale_model_inputs(x, [schedule], [i])

    def scale_model_inputs(self, x: torch.Tensor, schedules: Sequence[Schedule],
                           indices: Sequence[int]) -> torch.Tensor:
        """``scale_model_input`` for n chains: x holds chain j's rows as block j, at step indices[j]."""
        self._check_rows(x, schedules, indices)
        return x

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {}

    def step(self, x: torch.Tensor, model_output: torch.Tensor, schedule: Schedule, i: int,
             state: Mapping[str, torch.Tensor], generator: torch.Generator | None = None,
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x at step i -> x at step i + 1, and the new state (the input state is not modified)."""
        x_next, (new_state,) = self.step_batch(x, model_output, [schedule], [i], [state], [generator])
        return x_next, new_state

    def step_batch(self, x: torch.Tensor, model_output: torch.Tensor, schedules: Sequence[Schedule],
                   indices: Sequence[int], states: Sequence[Mapping[str, torch.Tensor]],
                   generators: Sequence[torch.Generator | None]) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """``step`` for n chains at once: block j of x's rows (x.shape[0] // n of them) is chain j, at
        step indices[j] of schedules[j] with states[j] and generators[j]. Returns x at the next steps
        and the n new states; each block is what ``step`` gives for that chain alone."""
        idx = self._check_rows(x, schedules, indices)
        if len(states) != len(idx) or len(generators) != len(idx):
            raise SamplerError(f"step_batch needs one state and one generator per chain ({len(idx)}), "
                               f"got {len(states)} and {len(generators)}")
        if not isinstance(model_output, torch.Tensor):
            raise SamplerError("x and model_output must be tensors")
        if x.shape != model_output.shape:
            raise SamplerError(f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(x.shape)}")
        if not x.is_floating_point() or not model_output.is_floating_point():
            raise SamplerError("x and model_output must be floating point")
        if self.stochastic and any(g is None for g in generators):
            raise SamplerError(f"{self.name} with these options is stochastic: pass a torch.Generator")
        work = torch.promote_types(x.dtype, torch.float32)
        out, new_states = self._step(x.to(work), model_output.to(work), schedules, idx, states, generators)
        return out.to(x.dtype), new_states

    @staticmethod
    def _check_rows(x: torch.Tensor, schedules: Sequence[Schedule], indices: Sequence[int]) -> list[int]:
        """Validated step indices, one per chain, and x split evenly into the chains' row blocks."""
        if not isinstance(x, torch.Tensor):
            raise SamplerError("x and model_output must be tensors")
        if not schedules or len(schedules) != len(indices):
            raise SamplerError(f"need one step index per schedule, got {len(schedules)} schedules and "
                               f"{len(indices)} indices")
        if x.dim() < 1 or x.shape[0] % len(schedules):
            raise SamplerError(f"x with shape {tuple(x.shape)} does not split into {len(schedules)} chains' rows")
        return [s.check_index(i) for s, i in zip(schedules, indices)]

    @abstractmethod
    def _step(self, x: torch.Tensor, out: torch.Tensor, schedules: Sequence[Schedule], indices: list[int],
              states: Sequence[Mapping[str, torch.Tensor]], generators: Sequence[torch.Generator | None],
              ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """The step of every chain's row block, on validated inputs in the working dtype (float32 or wider)."""

    @staticmethod
    def _levels(schedules: Sequence[Schedule], indices: list[int]) -> tuple[list[float], list[float]]:
        """Each chain's noise level at its step and the level it lands on."""
        here = [s.values["sigmas"][i] for s, i in zip(schedules, indices)]
        return here, [s.values["sigmas_next"][i] for s, i in zip(schedules, indices)]

    def _no_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise SamplerError(f"{self.name} carries no state, got keys {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021); deterministic at eta = 0, eta > 0 adds generator noise."""

    name = "ddim"
    defaults = {**_COMMON_DEFAULTS, "timestep_spacing": "leading", "clip_sample": True, "clip_sample_range": 1.0,
                "set_alpha_to_one": True}
    fixed = {**_COMMON_FIXED, "thresholding": False}
    option_defaults = {"eta": 0.0}

    def __init__(self, scheduler_config: Mapping[str, Any], **options: Any) -> None:
        super().__init__(scheduler_config, **options)
        self.stochastic = self.config["eta"] > 0

    def schedule(self, steps: int) -> Schedule:
        self._check_steps(steps)
        t = _spaced_timesteps(self.config, steps, extra_point=False, round_linspace=True).astype(np.int64)
        # diffusers' DDIM steps to t - N // T whatever the spacing; below 0 it lands on the final level.
        prev = t - self.config["num_train_timesteps"] // steps
        final = self._final_sigma(self.config["set_alpha_to_one"])
        nxt = np.where(prev >= 0, self._train_sigmas[np.clip(prev, 0, None)], final)
        return Schedule(torch.from_numpy(t), torch.from_numpy(self._train_sigmas[t].copy()), torch.from_numpy(nxt))

    def _step(self, x, out, schedules, indices, states, generators):
        for state in states:
            self._no_state(state)
        eta = float(self.config["eta"])
        alphas, sigmas, alphas_next, eps_gains, stds = [], [], [], [], []
        for s, s_next in zip(*self._levels(schedules, indices)):
            alpha, sigma = _vp(s)
            alpha_next, sigma_next = _vp(s_next)
            # DDIM's sigma_t(eta) (eq. 16): eta * sqrt((1 - a_next) / (1 - a) * (1 - a / a_next)), a = alpha^2.
            std = eta * math.sqrt((sigma_next / sigma) ** 2 * (1.0 - (alpha / alpha_next) ** 2))
            alphas.append(alpha), sigmas.append(sigma), alphas_next.append(alpha_next), stds.append(std)
            eps_gains.append(math.sqrt(max(sigma_next ** 2 - std ** 2, 0.0)))
        alpha, sigma, alpha_next, eps_gain, std = _columns(x, alphas, sigmas, alphas_next, eps_gains, stds)
        x0, eps = _x0_eps(x, out, self.config["prediction_type"], alpha, sigma)
        if self.config["clip_sample"]:
            r = float(self.config["clip_sample_range"])
            x0 = x0.clamp(-r, r)
        x_next = alpha_next * x0 + eps_gain * eps
        if eta > 0:
            rows = (x.shape[0] // len(generators), *x.shape[1:])
            noise = torch.cat([torch.randn(rows, generator=g, device=g.device, dtype=x.dtype).to(x.device)
                               for g in generators])
            x_next = x_next + std * noise
        return x_next, [{} for _ in states]


class EulerSampler(Sampler):
    """Euler's method on the probability-flow ODE in sigma (Karras et al. 2022), non-ancestral."""

    name = "euler"
    defaults = {**_COMMON_DEFAULTS, "timestep_spacing": "linspace", "final_sigmas_type": "zero"}
    fixed = {**_SIGMA_FIXED, "interpolation_type": "linear", "timestep_type": "discrete"}

    def schedule(self, steps: int) -> Schedule:
        self._check_steps(steps)
        t = _spaced_timesteps(self.config, steps, extra_point=False, round_linspace=False).astype(np.float32)
        sig = self._at(t.astype(np.float64))
        nxt = np.append(sig[1:], self._final_sigma(self.config["final_sigmas_type"] == "zero"))
        return Schedule(torch.from_numpy(t), torch.from_numpy(sig), torch.from_numpy(nxt))

    def init_noise_sigma(self, schedule: Schedule) -> float:
        # diffusers' convention: sigma_max for "linspace"/"trailing", sqrt(sigma_max^2 + 1) for "leading".
        top = float(schedule.sigmas[0])
        return top if self.config["timestep_spacing"] in ("linspace", "trailing") else math.sqrt(top * top + 1.0)

    def scale_model_inputs(self, x: torch.Tensor, schedules: Sequence[Schedule],
                           indices: Sequence[int]) -> torch.Tensor:
        # The sample lives in VE scale (x0 + sigma eps); the model was trained on VP inputs.
        idx = self._check_rows(x, schedules, indices)
        work = x.to(torch.promote_types(x.dtype, torch.float32))
        (scale,) = _columns(work, [math.sqrt(s * s + 1.0) for s in self._levels(schedules, idx)[0]])
        return (work / scale).to(x.dtype)

    def _step(self, x, out, schedules, indices, states, generators):
        for state in states:
            self._no_state(state)
        here, nxt = self._levels(schedules, indices)
        if self.config["prediction_type"] == "epsilon":
            (dsigma,) = _columns(x, [b - a for a, b in zip(here, nxt)])
            slope = out  # dx/dsigma = (x - x0) / sigma = eps
        else:
            vp = [_vp(s) for s in here]
            sigma, dsigma, alpha, sigma_vp = _columns(x, here, [b - a for a, b in zip(here, nxt)],
                                                      [a for a, _ in vp], [s for _, s in vp])
            x0, _ = _x0_eps(x * alpha, out, self.config["prediction_type"], alpha, sigma_vp)
            slope = (x - x0) / sigma
        return x + slope * dsigma, [{} for _ in states]


class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022): second order from the previous step's x0 prediction.

    The state carries that prediction ("prev_x0") and the step it belongs to ("last_step", -1 when
    empty), so a chain resumed elsewhere continues at second order exactly as if never stopped.
    """

    name = "dpmpp_2m"
    defaults = {**_COMMON_DEFAULTS, "timestep_spacing": "linspace", "final_sigmas_type": "zero",
                "lower_order_final": True, "euler_at_final": False, "solver_type": "midpoint"}
    fixed = {**_SIGMA_FIXED, "thresholding": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
             "variance_type": None, "lambda_min_clipped": -math.inf, "use_dynamic_shifting": False}

    def schedule(self, steps: int) -> Schedule:
        self._check_steps(steps)
        t = _spaced_timesteps(self.config, steps, extra_point=True, round_linspace=True).astype(np.int64)
        sig = self._train_sigmas[t].copy()
        nxt = np.append(sig[1:], self._final_sigma(self.config["final_sigmas_type"] == "zero"))
        return Schedule(torch.from_numpy(t), torch.from_numpy(sig), torch.from_numpy(nxt))

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {"last_step": torch.tensor(-1, dtype=torch.int64)}

    def _history(self, state: Mapping[str, torch.Tensor], x: torch.Tensor, i: int) -> torch.Tensor | None:
        """The chain's previous x0 prediction (None before its first step); x is its block of rows."""
        last = state.get("last_step")
        if not isinstance(last, torch.Tensor) or last.dtype != torch.int64 or last.dim() != 0:
            raise SamplerError("dpmpp_2m state needs 'last_step' as a 0-d int64 tensor (see initial_state())")
        last_step = int(last)
        if last_step < 0:
            if set(state) != {"last_step"}:
                raise SamplerError(f"dpmpp_2m state without history must hold only 'last_step', got {sorted(state)}")
            if i > 0:
                raise SamplerError(f"dpmpp_2m at step {i} needs the history of step {i - 1}; "
                                   "a resumed chain must carry its sampler state")
            return None
        if set(state) != {"last_step", "prev_x0"}:
            raise SamplerError(f"dpmpp_2m state must hold 'last_step' and 'prev_x0', got {sorted(state)}")
        if last_step != i - 1:
            raise SamplerError(f"dpmpp_2m state holds the history of step {last_step}, not of step {i - 1}")
        prev = state["prev_x0"]
        if not isinstance(prev, torch.Tensor) or prev.shape != x.shape or not prev.is_floating_point():
            raise SamplerError(f"dpmpp_2m prev_x0 must be a float tensor of shape {tuple(x.shape)}")
        return prev.to(device=x.device, dtype=x.dtype)

    def _step(self, x, out, schedules, indices, states, generators):
        rows = x.shape[0] // len(schedules)
        blocks = [x[j * rows:(j + 1) * rows] for j in range(len(schedules))]
        prevs = [self._history(state, block, i) for state, block, i in zip(states, blocks, indices)]
        alphas, sigmas, decays, gains, corrections, ratios = [], [], [], [], [], []
        for schedule, i, prev, s, s_next in zip(schedules, indices, prevs, *self._levels(schedules, indices)):
            alpha, sigma = _vp(s)
            alpha_next, sigma_next = _vp(s_next)
            last = i == schedule.steps - 1
            first_order = prev is None or (last and (
                s_next == 0.0 or self.config["euler_at_final"]
                or (self.config["lower_order_final"] and schedule.steps < 15)))
            # With lambda = log(alpha / sigma) = -log(s), the step size is h = log(s / s_next), exp(-h) = s_next / s.
            gain = alpha_next * (1.0 - s_next / s)  # alpha_next * (1 - exp(-h))
            correction, r = 0.0, 1.0  # first order: no correction term
            if not first_order:
                h = math.log(s / s_next)
                r = math.log(schedule.values["sigmas"][i - 1] / s) / h  # previous step size / this one
                correction = 0.5 * gain if self.config["solver_type"] == "midpoint" else (
                    alpha_next * (1.0 - gain / alpha_next / h))  # heun
            alphas.append(alpha), sigmas.append(sigma), decays.append(sigma_next / sigma), gains.append(gain)
            corrections.append(correction), ratios.append(r)
        alpha, sigma, decay, gain, correction, r = _columns(x, alphas, sigmas, decays, gains, corrections, ratios)
        x0, _ = _x0_eps(x, out, self.config["prediction_type"], alpha, sigma)
        if x0 is out:  # "sample" prediction: the state must not alias the caller's tensor
            x0 = x0.clone()
        x_next = decay * x + gain * x0
        if any(corrections):  # second order where a chain has history (first-order chains add 0 * 0)
            prev_x0 = torch.cat([x0[j * rows:(j + 1) * rows] if p is None else p for j, p in enumerate(prevs)])
            x_next = x_next + correction * ((x0 - prev_x0) / r)
        return x_next, [{"last_step": torch.tensor(i, dtype=torch.int64), "prev_x0": x0[j * rows:(j + 1) * rows]}
                        for j, i in enumerate(indices)]


_REGISTRY: dict[str, type[Sampler]] = {cls.name: cls for cls in (DDIMSampler, EulerSampler, DPMSolverPP2MSampler)}
assert tuple(_REGISTRY) == SAMPLERS


def make_sampler(name: str, scheduler_config: Mapping[str, Any], **options: Any) -> Sampler:
    """Build sampler `name` from a family's scheduler config; options (e.g. eta for ddim) override it."""
    if name not in _REGISTRY:
        raise SamplerError(f"unknown sampler {name!r}; known samplers: {', '.join(SAMPLERS)}")
    return _REGISTRY[name](scheduler_config, **options)
