"""The handoff wire format: a denoising chain stopped at step k, as portable bytes.

A handoff travels between processes and machines (edge server -> user device), so the
receiver must treat it as untrusted input: every defect is reported as a
:class:`HandoffError` with a message that says what is wrong, and nothing in it is ever
unpickled. Full description with an example header: ``docs/handoff.md``.

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic  b"RDHO"
    4       2     format version (uint16, currently 1)
    6       2     flags (uint16, must be 0)
    8       4     header length H in bytes (uint32, at most MAX_HEADER_BYTES)
    12      4     CRC-32 of the header bytes (uint32, zlib.crc32)
    16      H     header: UTF-8 JSON object (see below)
    16+H    P     payload: safetensors bytes, zstd-compressed when header.compression == "zstd"

The file ends exactly after the payload. The JSON header has exactly these fields::

    format_version  int, equal to the version in the fixed prefix
    family          {"id": str, "version": str}
    request         conditioning reference: prompt, negative_prompt, steps, guidance, seed,
                    sampler, optional sampler_options (dict) and further JSON fields
    plan            [{"member", "start", "end", "adapter", "node"[, "guidance"]}, ...] covering 0..steps
                    (guidance: a number in [0, 50], the segment's own classifier-free guidance)
    step            index of the next step to run, 0 <= step < steps
    accounting      JSON object (U-Net evaluations per member, segment wall times, ...)
    dtype           "fp32" | "fp16": wire dtype of floating latents, sampler state, conditioning
    compression     "none" | "zstd"
    payload         {"length": P, "raw_length": safetensors size, "sha256": hex of the P bytes}
    tensors         [{"name", "dtype", "shape"}, ...]: the manifest, one entry per tensor

Tensor names in the payload: ``latents``, ``generator_state``, ``schedule/<key>``,
``sampler_state/<key>`` and ``conditioning/<key>``. Schedule tensors keep their own dtype
(float64 stays float64, so a relay is bit-identical to an uninterrupted chain); integer
tensors stay integer; the generator state stays uint8. Decoded latents, sampler state and
conditioning are float32 whatever the wire dtype.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from relaydiff.engine.plan import MAX_NAME_CHARS, Plan, PlanError, Request, Segment, validate_plan

__all__ = [
    "DEFAULT_MAX_BYTES",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "Handoff",
    "HandoffError",
    "decode_handoff",
    "encode_handoff",
    "read_handoff",
    "validate_handoff",
    "write_handoff",
]

MAGIC = b"RDHO"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHHII")
PREFIX_BYTES = _PREFIX.size
DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # SDXL latents + two 77x2048 fp32 embeddings fit 50x over
MAX_HEADER_BYTES = 1024 * 1024
MAX_TENSORS = 4096
MAX_TENSOR_DIMS = 8
MAX_JSON_DEPTH = 32
_ZSTD_LEVEL = 3
_ZSTD_MAX_WINDOW = 1 << 27

_WIRE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
_COMPRESSIONS = ("none", "zstd")
_HEADER_FIELDS = frozenset(
    {"format_version", "family", "request", "plan", "step", "accounting", "dtype", "compression",
     "payload", "tensors"}
)
_FLOAT_IN = (torch.float16, torch.bfloat16, torch.float32)
_SCHEDULE_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_DTYPE_NAMES = {
    str(d).removeprefix("torch."): d for d in (*_SCHEDULE_FLOATS, *_INTS)
}
_GROUPS = ("schedule", "sampler_state", "conditioning")


class HandoffError(ValueError):
    """Any reason a handoff cannot be written or accepted; the message says which."""


@dataclass
class Handoff:
    """A chain stopped before step ``step``: everything the receiver needs to finish it."""

    family_id: str
    family_version: str
    request: dict
    plan: list[dict]
    step: int
    latents: torch.Tensor
    schedule: dict[str, torch.Tensor]
    sampler_state: dict[str, torch.Tensor]
    generator_state: torch.Tensor | None
    accounting: dict
    conditioning: dict[str, torch.Tensor] | None = field(default=None)

    def validate(self) -> None:
        validate_handoff(self)


# ----------------------------------------------------------------------------------------------
# validation of the in-memory object (shared by encode and decode)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _short(x: Any, limit: int = 80) -> str:
    """repr for error messages, cut short: a hostile header may hold megabyte-long values."""
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_json(value: Any, where: str, depth: int = 0) -> None:
    """Accept only what JSON round-trips unchanged, so a decoded handoff equals the sent one."""
    if depth > MAX_JSON_DEPTH:
        raise HandoffError(f"{where} is nested deeper than {MAX_JSON_DEPTH} levels")
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise HandoffError(f"{where} is {value}; JSON fields must be finite numbers")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise HandoffError(f"{where} has a non-string key {_short(key)}; JSON keys are strings")
            _check_json(item, f"{where}[{_short(key, 40)}]", depth + 1)
        return
    raise HandoffError(
        f"{where} is a {type(value).__name__}, which JSON cannot carry unchanged "
        "(use dict, list, str, int, float, bool or None)"
    )


def _check_name(name: Any, where: str) -> None:
    if not isinstance(name, str) or not name:
        raise HandoffError(f"{where} must be a non-empty string, got {_short(name)}")
    if len(name) > MAX_NAME_CHARS:
        raise HandoffError(f"{where} is longer than {MAX_NAME_CHARS} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise HandoffError(f"{where} contains a control character: {_short(name)}")


def _check_request_and_plan(request: Any, plan: Any) -> int:
    """The engine's own Request and Plan schema (engine.plan) decides; the steps are returned."""
    if not isinstance(request, dict):
        raise HandoffError(f"request must be a dict, got {type(request).__name__}")
    if not isinstance(plan, list) or not plan:
        raise HandoffError(f"plan must be a non-empty list of segments, got {_short(plan)}")
    # a handoff states every field its writer knew (defaults are for people, not for the wire), so a
    # field lost in transit is an error, not a silent default; the two optional ones came later
    missing = sorted(set(Request.model_fields) - set(request) - {"sampler_options"})
    if missing:
        raise HandoffError(f"request is missing field(s) {missing}")
    for i, seg in enumerate(plan):
        missing = sorted(set(Segment.model_fields) - set(seg) - {"guidance"}) if isinstance(seg, dict) else []
        if missing:
            raise HandoffError(f"plan[{i}] is missing field(s) {missing}")
    try:
        steps = Request.from_dict(request).steps
        validate_plan(Plan.from_list(plan), steps)
    except PlanError as exc:
        raise HandoffError(str(exc)) from None
    _check_json(request, "request")
    return steps


def _check_tensor(t: Any, where: str, allowed: tuple, *, finite: bool, nan_only: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise HandoffError(f"{where} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type == "meta":
        raise HandoffError(f"{where} is a meta tensor without data")
    if t.layout != torch.strided:
        raise HandoffError(f"{where} must be a dense tensor, got layout {t.layout}")
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise HandoffError(f"{where} has dtype {str(t.dtype).removeprefix('torch.')}; allowed: {names}")
    if t.dim() > MAX_TENSOR_DIMS:
        raise HandoffError(f"{where} has {t.dim()} dimensions; at most {MAX_TENSOR_DIMS} allowed")
    if finite and t.is_floating_point() and t.numel():
        bad = torch.isnan(t) if nan_only else ~torch.isfinite(t)
        if bool(bad.any()):
            kind = "NaN" if nan_only else "non-finite (NaN or inf)"
            raise HandoffError(f"{where} contains {int(bad.sum())} {kind} value(s)")


def _check_tensor_dict(d: Any, where: str, allowed: tuple, *, nan_only: bool = False) -> None:
    if not isinstance(d, dict):
        raise HandoffError(f"{where} must be a dict of tensors, got {type(d).__name__}")
    for key, t in d.items():
        _check_name(key, f"{where} key")
        _check_tensor(t, f"{where}[{key!r}]", allowed, finite=True, nan_only=nan_only)


def validate_handoff(h: Handoff) -> None:
    """Raise HandoffError unless ``h`` is a complete, consistent, finite handoff."""
    if not isinstance(h, Handoff):
        raise HandoffError(f"expected a Handoff, got {type(h).__name__}")
    _check_name(h.family_id, "family_id")
    _check_name(h.family_version, "family_version")
    steps = _check_request_and_plan(h.request, h.plan)
    if not _is_int(h.step):
        raise HandoffError(f"step must be an integer, got {type(h.step).__name__}")
    if not 0 <= h.step < steps:
        raise HandoffError(f"step {h.step} is out of range: a handoff needs 0 <= step < steps ({steps})")
    _check_tensor(h.latents, "latents", _FLOAT_IN, finite=True)
    shape = tuple(h.latents.shape)
    if len(shape) != 4 or shape[0] != 1 or min(shape) < 1:
        raise HandoffError(f"latents must have shape [1, C, H, W] with C, H, W >= 1, got {list(shape)}")
    _check_tensor_dict(h.schedule, "schedule", _SCHEDULE_FLOATS + _INTS, nan_only=True)
    if not h.schedule:
        raise HandoffError("schedule is empty; the receiver needs the sampler's schedule tensors")
    _check_tensor_dict(h.sampler_state, "sampler_state", _FLOAT_IN + _INTS)
    if h.generator_state is not None:
        _check_tensor(h.generator_state, "generator_state", (torch.uint8,), finite=False)
        if h.generator_state.dim() != 1 or h.generator_state.numel() == 0:
            raise HandoffError(
                f"generator_state must be a non-empty 1-D uint8 tensor, got shape {list(h.generator_state.shape)}"
            )
    if not isinstance(h.accounting, dict):
        raise HandoffError(f"accounting must be a dict, got {type(h.accounting).__name__}")
    _check_json(h.accounting, "accounting")
    if h.conditioning is not None:
        _check_tensor_dict(h.conditioning, "conditioning", _FLOAT_IN + _INTS)


# ----------------------------------------------------------------------------------------------
# encoding


def _wire_tensors(h: Handoff, wire: torch.dtype) -> dict[str, torch.Tensor]:
    def cast(t: torch.Tensor, where: str) -> torch.Tensor:
        t = t.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(wire)
            if wire != torch.float32 and not bool(torch.isfinite(t).all()):  # fp32 holds any validated value
                raise HandoffError(f"{where} overflows {str(wire).removeprefix('torch.')}; send it as fp32")
        return t.contiguous().clone()  # clone: safetensors refuses tensors that share storage

    out = {"latents": cast(h.latents, "latents")}
    for key, t in h.schedule.items():
        out[f"schedule/{key}"] = t.detach().to("cpu").contiguous().clone()
    for key, t in h.sampler_state.items():
        out[f"sampler_state/{key}"] = cast(t, f"sampler_state[{key!r}]")
    for key, t in (h.conditioning or {}).items():
        out[f"conditioning/{key}"] = cast(t, f"conditioning[{key!r}]")
    if h.generator_state is not None:
        out["generator_state"] = h.generator_state.detach().to("cpu").contiguous().clone()
    return out


def _frame(header: dict, payload: bytes) -> bytes:
    """Prefix + JSON header + payload; the one place the byte layout is written."""
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(text) > MAX_HEADER_BYTES:
        raise HandoffError(f"header is {len(text)} bytes; the limit is {MAX_HEADER_BYTES}")
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(text), zlib.crc32(text)) + text + payload


def encode_handoff(
    h: Handoff, *, dtype: str = "fp32", compress: bool = False, max_bytes: int = DEFAULT_MAX_BYTES
) -> bytes:
    """Serialize ``h``; fp32 is bit-exact, fp16 halves latents/history at fp16 precision."""
    if not isinstance(dtype, str) or dtype not in _WIRE_DTYPES:
        raise HandoffError(f"dtype must be one of {sorted(_WIRE_DTYPES)}, got {dtype!r}")
    validate_handoff(h)
    tensors = _wire_tensors(h, _WIRE_DTYPES[dtype])
    if len(tensors) > MAX_TENSORS:
        raise HandoffError(f"handoff has {len(tensors)} tensors; the limit is {MAX_TENSORS}")
    raw = safetensors.torch.save(tensors)
    payload = raw
    if compress:
        # lazy: only compressed handoffs need zstandard
        import zstandard

        payload = zstandard.ZstdCompressor(
            level=_ZSTD_LEVEL, write_content_size=True, write_checksum=True
        ).compress(raw)
    header = {
        "format_version": FORMAT_VERSION,
        "family": {"id": h.family_id, "version": h.family_version},
        "request": h.request,
        "plan": h.plan,
        "step": h.step,
        "accounting": h.accounting,
        "dtype": dtype,
        "compression": "zstd" if compress else "none",
        "payload": {"length": len(payload), "raw_length": len(raw),
                    "sha256": hashlib.sha256(payload).hexdigest()},
        "tensors": [
            {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            for name, t in sorted(tensors.items())
        ],
    }
    data = _with_handoff_bytes(header, payload, h.accounting)
    if len(data) > max_bytes:
        raise HandoffError(f"encoded handoff is {len(data)} bytes; the limit is {max_bytes}")
    return data


def _with_handoff_bytes(header: dict, payload: bytes, accounting: dict) -> bytes:
    """Frame the handoff with ``accounting.handoff_bytes`` = the bytes of the chain's earlier handoffs
    plus this one's own length (which includes that number: iterated to its fixed point)."""
    prior = accounting.get("handoff_bytes", 0)
    prior = prior if _is_int(prior) and prior >= 0 else 0
    size = 0
    for _ in range(8):  # the length changes only when the number gains a digit: 2-3 rounds
        header["accounting"] = {**accounting, "handoff_bytes": prior + size}
        data = _frame(header, payload)
        if len(data) == size:
            return data
        size = len(data)
    raise HandoffError("the handoff's byte count does not settle")  # unreachable: lengths grow by digits


# ----------------------------------------------------------------------------------------------
# decoding


def _reject_constant(name: str) -> Any:
    raise HandoffError(f"header contains the non-standard JSON constant {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise HandoffError(f"header contains a number that overflows a float: {text[:40]}")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise HandoffError(f"header repeats the JSON key {_short(key)}")
        out[key] = value
    return out


def _check_depth(value: Any) -> None:
    """Iteratively, so that later recursive code (validation, repr) never meets deep nesting."""
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH + 2:  # the header wraps request/accounting in two levels
            raise HandoffError(f"header JSON is nested deeper than {MAX_JSON_DEPTH + 2} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _parse_header(text: bytes) -> dict:
    try:
        header = json.loads(
            text.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except HandoffError:
        raise
    except UnicodeDecodeError as e:
        raise HandoffError(f"header is not valid UTF-8: {e}") from None
    except RecursionError:
        raise HandoffError("header JSON is nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError, int digit limit
        raise HandoffError(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise HandoffError(f"header must be a JSON object, got {type(header).__name__}")
    _check_depth(header)
    keys = set(header)
    if keys != _HEADER_FIELDS:
        missing, extra = sorted(_HEADER_FIELDS - keys), sorted(keys - _HEADER_FIELDS)
        raise HandoffError(f"header has missing field(s) {missing} and extra field(s) {extra}")
    return header


def _exact_dict(value: Any, where: str, fields: set[str]) -> dict:
    if not isinstance(value, dict):
        raise HandoffError(f"header['{where}'] must be an object, got {type(value).__name__}")
    if set(value) != fields:
        missing, extra = sorted(fields - set(value)), sorted(set(value) - fields)
        raise HandoffError(f"header['{where}'] has missing field(s) {missing} and extra field(s) {extra}")
    return value


def _parse_manifest(value: Any) -> dict[str, tuple[torch.dtype, list[int]]]:
    if not isinstance(value, list):
        raise HandoffError(f"header['tensors'] must be a list, got {type(value).__name__}")
    if len(value) > MAX_TENSORS:
        raise HandoffError(f"header lists {len(value)} tensors; the limit is {MAX_TENSORS}")
    manifest: dict[str, tuple[torch.dtype, list[int]]] = {}
    for i, entry in enumerate(value):
        entry = _exact_dict(entry, f"tensors'][{i}", {"name", "dtype", "shape"})
        name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
        _check_name(name, f"tensor name {i}")
        if name in manifest:
            raise HandoffError(f"tensor {name!r} is listed twice in the manifest")
        group = name.split("/", 1)[0] if "/" in name else None
        if name not in ("latents", "generator_state") and (group not in _GROUPS or name == f"{group}/"):
            raise HandoffError(
                f"unknown tensor name {name!r}; expected latents, generator_state or "
                "schedule/, sampler_state/, conditioning/ followed by a key"
            )
        if not isinstance(dtype, str) or dtype not in _DTYPE_NAMES:
            raise HandoffError(f"tensor {name!r} has unknown dtype {_short(dtype)}")
        if (not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS
                or not all(_is_int(s) and s >= 0 for s in shape)):
            raise HandoffError(f"tensor {name!r} has an invalid shape {_short(shape)}")
        manifest[name] = (_DTYPE_NAMES[dtype], shape)
    if "latents" not in manifest:
        raise HandoffError("the manifest has no 'latents' tensor")
    return manifest


def _decompress(payload: bytes, raw_length: int, max_bytes: int) -> bytes:
    # lazy: only compressed handoffs need zstandard
    import zstandard

    try:
        params = zstandard.get_frame_parameters(payload)
    except zstandard.ZstdError as e:
        raise HandoffError(f"payload is not a zstd frame: {e}") from None
    if params.content_size != raw_length:
        raise HandoffError(
            f"zstd frame declares {params.content_size} bytes of content, header says {raw_length}"
        )
    if params.window_size > _ZSTD_MAX_WINDOW:
        raise HandoffError(f"zstd frame asks for a {params.window_size}-byte window; at most {_ZSTD_MAX_WINDOW}")
    try:
        raw = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW).decompress(
            payload, max_output_size=min(raw_length, max_bytes), allow_extra_data=False
        )
    except zstandard.ZstdError as e:
        raise HandoffError(f"payload does not decompress: {e}") from None
    if len(raw) != raw_length:
        raise HandoffError(f"payload decompresses to {len(raw)} bytes, header says {raw_length}")
    return raw


def decode_handoff(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    expect_latent_shape: tuple | None = None,
    expect_family: tuple[str, str] | None = None,
) -> Handoff:
    """Parse and fully validate untrusted bytes; any defect raises HandoffError.

    ``expect_latent_shape`` is (1, C, H, W) or (C, H, W); ``expect_family`` is (id, version).
    """
    if not _is_int(max_bytes) or max_bytes < PREFIX_BYTES:
        raise HandoffError(f"max_bytes must be an integer >= {PREFIX_BYTES}, got {max_bytes!r}")
    if expect_family is not None and not (
        isinstance(expect_family, (tuple, list)) and len(expect_family) == 2
        and all(isinstance(x, str) for x in expect_family)
    ):
        raise HandoffError(f"expect_family must be a (family_id, version) pair of strings, got {_short(expect_family)}")
    if expect_latent_shape is not None and not (
        isinstance(expect_latent_shape, (tuple, list)) and len(expect_latent_shape) in (3, 4)
        and all(_is_int(x) for x in expect_latent_shape)
    ):
        raise HandoffError(f"expect_latent_shape must be (1, C, H, W) or (C, H, W), got {_short(expect_latent_shape)}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise HandoffError(f"handoff data must be bytes, got {type(data).__name__}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_bytes:
        raise HandoffError(f"handoff is {size} bytes; the limit is {max_bytes}")
    data = bytes(data)
    if size < PREFIX_BYTES:
        raise HandoffError(f"handoff is truncated: {size} bytes, shorter than the {PREFIX_BYTES}-byte prefix")
    magic, version, flags, header_len, header_crc = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise HandoffError(f"not a relaydiff handoff: magic is {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise HandoffError(f"unsupported handoff format version {version}; this reader knows {FORMAT_VERSION}")
    if flags != 0:
        raise HandoffError(f"unknown flags 0x{flags:04x} in the prefix (must be 0)")
    if header_len > MAX_HEADER_BYTES:
        raise HandoffError(f"header length {header_len} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if PREFIX_BYTES + header_len > size:
        raise HandoffError(
            f"handoff is truncated: header needs {header_len} bytes, only {size - PREFIX_BYTES} present"
        )
    header_bytes = data[PREFIX_BYTES:PREFIX_BYTES + header_len]
    if zlib.crc32(header_bytes) != header_crc:
        raise HandoffError("header checksum mismatch: the CRC-32 of the header differs from the prefix")
    header = _parse_header(header_bytes)

    if not _is_int(header["format_version"]) or header["format_version"] != version:
        raise HandoffError(
            f"header format_version {_short(header['format_version'])} disagrees with the prefix version {version}"
        )
    family = _exact_dict(header["family"], "family", {"id", "version"})
    if not isinstance(header["dtype"], str) or header["dtype"] not in _WIRE_DTYPES:
        raise HandoffError(f"header dtype must be one of {sorted(_WIRE_DTYPES)}, got {_short(header['dtype'])}")
    wire = _WIRE_DTYPES[header["dtype"]]
    if not isinstance(header["compression"], str) or header["compression"] not in _COMPRESSIONS:
        raise HandoffError(
            f"header compression must be one of {list(_COMPRESSIONS)}, got {_short(header['compression'])}"
        )
    pay = _exact_dict(header["payload"], "payload", {"length", "raw_length", "sha256"})
    length, raw_length, digest = pay["length"], pay["raw_length"], pay["sha256"]
    if not (_is_int(length) and _is_int(raw_length) and length >= 0 and raw_length >= 0):
        raise HandoffError(
            f"payload length/raw_length must be non-negative integers, got {_short(length)}, {_short(raw_length)}"
        )
    if not isinstance(digest, str) or len(digest) != 64:
        raise HandoffError(f"payload sha256 must be 64 hex characters, got {_short(digest)}")
    manifest = _parse_manifest(header["tensors"])

    present = size - PREFIX_BYTES - header_len
    if present < length:
        raise HandoffError(f"handoff is truncated: payload needs {length} bytes, only {present} present")
    if present > length:
        raise HandoffError(f"handoff has {present - length} unexpected bytes after the payload")
    payload = data[PREFIX_BYTES + header_len:]
    if hashlib.sha256(payload).hexdigest() != digest.lower():
        raise HandoffError("payload checksum mismatch: the sha256 of the payload differs from the header")
    if raw_length > max_bytes:
        raise HandoffError(f"payload would decompress to {raw_length} bytes; the limit is {max_bytes}")
    if header["compression"] == "zstd":
        raw = _decompress(payload, raw_length, max_bytes)
    else:
        if raw_length != length:
            raise HandoffError(f"uncompressed payload: raw_length {raw_length} must equal length {length}")
        raw = payload

    try:
        loaded = safetensors.torch.load(raw)
    except Exception as e:  # the Rust parser raises its own SafetensorError types
        raise HandoffError(f"payload is not valid safetensors data: {e}") from None
    if set(loaded) != set(manifest):
        missing, extra = sorted(set(manifest) - set(loaded)), sorted(set(loaded) - set(manifest))
        raise HandoffError(f"payload tensors differ from the manifest: missing {missing}, unlisted {extra}")
    for name, t in loaded.items():
        dtype, shape = manifest[name]
        if t.dtype != dtype or list(t.shape) != shape:
            raise HandoffError(
                f"tensor {name!r} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)} in the payload "
                f"but {str(dtype).removeprefix('torch.')} {shape} in the manifest"
            )

    def wire_float(name: str, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            if t.dtype != wire:
                raise HandoffError(f"tensor {name!r} is {t.dtype} but the handoff dtype is {header['dtype']}")
            return t.to(torch.float32)
        return t

    groups: dict[str, dict[str, torch.Tensor]] = {g: {} for g in _GROUPS}
    for name, t in loaded.items():
        if "/" in name:
            group, key = name.split("/", 1)
            groups[group][key] = t if group == "schedule" else wire_float(name, t)
    latents = wire_float("latents", loaded["latents"])
    if not latents.is_floating_point():
        raise HandoffError(f"latents must be floating point, got {latents.dtype}")
    h = Handoff(
        family_id=family["id"],
        family_version=family["version"],
        request=header["request"],
        plan=header["plan"],
        step=header["step"],
        latents=latents,
        schedule=groups["schedule"],
        sampler_state=groups["sampler_state"],
        generator_state=loaded.get("generator_state"),
        accounting=header["accounting"],
        conditioning=groups["conditioning"] or None,
    )
    validate_handoff(h)
    if expect_family is not None and (h.family_id, h.family_version) != tuple(expect_family):
        raise HandoffError(
            f"handoff is for family {h.family_id}@{h.family_version}, "
            f"expected {expect_family[0]}@{expect_family[1]}"
        )
    if expect_latent_shape is not None:
        got = tuple(h.latents.shape)
        want = tuple(expect_latent_shape)
        if got != want and got[1:] != want:
            raise HandoffError(f"latents have shape {list(got)}, expected {list(want)}")
    return h


# ----------------------------------------------------------------------------------------------
# files


def write_handoff(path: str | os.PathLike, h: Handoff, **kw: Any) -> int:
    """Write atomically (temp file + rename) so a reader never sees half a handoff; returns bytes."""
    data = encode_handoff(h, **kw)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(data)


def read_handoff(path: str | os.PathLike, **kw: Any) -> Handoff:
    """Read at most max_bytes + 1 bytes, so an oversized file is refused without loading it."""
    max_bytes = kw.get("max_bytes", DEFAULT_MAX_BYTES)
    if not _is_int(max_bytes):
        raise HandoffError(f"max_bytes must be an integer, got {max_bytes!r}")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise HandoffError(f"no handoff file at {os.fspath(path)}") from None
    except IsADirectoryError:
        raise HandoffError(f"{os.fspath(path)} is a directory, not a handoff file") from None
    return decode_handoff(data, **kw)
