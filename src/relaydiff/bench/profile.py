"""Build a profile from the engine's own measurements on this machine (``relaydiff profile``).

The simulator must read what the engine measured, not made-up constants: this times the real
executor per member and batch size (:func:`relaydiff.engine.profile.measure_step_latency`) and
the VAE decode, and writes the same JSON format as the shipped profiles. Power cannot be measured
from Python portably, so energy fields are only filled when the caller supplies a power figure
(a device profile without them is rejected by the sampler with a message naming the field).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from relaydiff.engine.profile import hardware, measure_step_latency
from relaydiff.system.profiles import MemberLatency, Profile


def measure_decode_s(family: Any, repeats: int = 3) -> float:
    """Median seconds to decode one latent with the family's VAE."""
    c, h, w = family.latent_shape
    z = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0))
    family.decode(z)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        family.decode(z)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_profile(
    family: Any,
    members: list[str],
    batch_sizes: list[int],
    kind: str = "edge",
    name: str = "measured",
    steps: int = 5,
    max_batch: int | None = None,
    step_power_w: float | None = None,
    radio_power_w: float | None = None,
) -> Profile:
    """Time each member at each batch size (and the decoder) and return a :class:`Profile`.

    ``max_batch`` defaults to the largest batch size measured (an edge profile needs one; pass the
    real memory limit when it is known).
    """
    if kind not in ("edge", "device"):
        raise ValueError(f"kind must be 'edge' or 'device', got {kind!r}")
    if not members:
        raise ValueError("need at least one member to measure")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be a non-empty list of integers >= 1, got {batch_sizes}")
    for label, value in (("step_power_w", step_power_w), ("radio_power_w", radio_power_w)):
        if value is not None and value <= 0:
            raise ValueError(f"{label} must be > 0, got {value}")
    hw = hardware()
    where = f"relaydiff profile on {hw}, family {getattr(family, 'id', '?')} {getattr(family, 'version', '')}".strip()
    measured: dict[str, MemberLatency] = {}
    for member in members:
        lat = measure_step_latency(family, member, sorted(set(batch_sizes)), steps=steps)
        bs = tuple(sorted(lat))
        measured[member] = MemberLatency(bs, tuple(float(lat[b]) for b in bs), f"measured: {where}, median of {steps} steps", False)
    decode_s = measure_decode_s(family)
    sources = {"step_latency_s": f"measured: {where}", "decode_s": f"measured: {where}, median of 3 decodes"}
    power: dict[str, float | None] = {"decode_j": None, "step_power_w": None, "tx_power_w": None, "rx_power_w": None}
    if step_power_w is not None:
        power["step_power_w"] = float(step_power_w)
        power["decode_j"] = float(step_power_w) * decode_s
        sources["step_power_w"] = "given on the command line (not measured)"
    if radio_power_w is not None:
        power["tx_power_w"] = power["rx_power_w"] = float(radio_power_w)
        sources["tx_power_w"] = sources["rx_power_w"] = "given on the command line (not measured)"
    return Profile(
        kind=kind,  # type: ignore[arg-type]
        name=name,
        hardware=hw,
        members=measured,
        max_batch=int(max_batch) if max_batch is not None else (max(batch_sizes) if kind == "edge" else None),
        decode_s=decode_s,
        sources=sources,
        **power,  # type: ignore[arg-type]
    )
