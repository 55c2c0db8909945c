"""The handoff wire format: exact round trips and strict, crash-free rejection of bad bytes."""

from __future__ import annotations

import copy
import hashlib
import json
import struct
import zlib

import pytest
import safetensors.torch
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaydiff.engine import handoff as hmod
from relaydiff.engine.handoff import (
    DEFAULT_MAX_BYTES,
    FORMAT_VERSION,
    MAGIC,
    MAX_HEADER_BYTES,
    Handoff,
    HandoffError,
    decode_handoff,
    encode_handoff,
    read_handoff,
    validate_handoff,
    write_handoff,
)

PREFIX = struct.Struct("<4sHHII")


def make_handoff(
    seed: int = 0, *, conditioning: bool = True, generator: bool = True, long_schedule: bool = True
) -> Handoff:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    return Handoff(
        family_id="tiny",
        family_version="0.1.0",
        request={
            "prompt": "a red cube left of a blue ball",
            "negative_prompt": "",
            "steps": 8,
            "guidance": 7.5,
            "seed": seed,
            "sampler": "dpmpp_2m",
            "sampler_options": {"final_sigmas_type": "zero"},
        },
        plan=[
            {"member": "large", "start": 0, "end": 4, "adapter": None, "node": "edge-0"},
            {"member": "small", "start": 4, "end": 8, "adapter": "user-7", "node": "device"},
        ],
        step=4,
        latents=latents,
        schedule={
            "timesteps": torch.tensor([999, 874, 749, 624, 499, 374, 249, 124]),
            "sigmas": torch.rand(9, generator=g, dtype=torch.float64),
            **({"alphas_cumprod": torch.rand(1000, generator=g)} if long_schedule else {}),
        },
        sampler_state={
            "model_outputs": torch.randn(2, 1, 4, 8, 8, generator=g),
            "lower_order_nums": torch.tensor(1, dtype=torch.int64),
        },
        generator_state=g.get_state() if generator else None,
        accounting={"unet_evals": {"large": 8, "small": 0}, "segment_wall_s": [0.012, 0.0]},
        conditioning={
            "prompt_embeds": torch.randn(2, 7, 16, generator=g),
            "attention_mask": torch.ones(2, 7, dtype=torch.int64),
        }
        if conditioning
        else None,
    )


def all_tensors(h: Handoff) -> dict[str, torch.Tensor]:
    out = {"latents": h.latents}
    out.update({f"schedule/{k}": v for k, v in h.schedule.items()})
    out.update({f"sampler_state/{k}": v for k, v in h.sampler_state.items()})
    out.update({f"conditioning/{k}": v for k, v in (h.conditioning or {}).items()})
    if h.generator_state is not None:
        out["generator_state"] = h.generator_state
    return out


def split(data: bytes) -> tuple[dict, bytes]:
    n = PREFIX.unpack_from(data)[3]
    return json.loads(data[PREFIX.size:PREFIX.size + n]), data[PREFIX.size + n:]


def reframe(header: dict, payload: bytes, *, raw: bytes | None = None) -> bytes:
    """What a hostile sender can do: any header and payload, with a correct checksum."""
    header = copy.deepcopy(header)
    header["payload"] = {
        "length": len(payload),
        "raw_length": len(payload if raw is None else raw),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    return hmod._frame(header, payload)


def with_tensors(tensors: dict[str, torch.Tensor], base: bytes | None = None) -> bytes:
    header, _ = split(base or VALID)
    header["tensors"] = [
        {"name": k, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        for k, t in sorted(tensors.items())
    ]
    return reframe(header, safetensors.torch.save(tensors))


def with_header(**changes) -> bytes:
    header, payload = split(VALID)
    header.update(changes)
    return reframe(header, payload)


H = make_handoff()
VALID = encode_handoff(H)
VALID_ZSTD = encode_handoff(H, dtype="fp16", compress=True)
SMALL = encode_handoff(
    make_handoff(3, conditioning=False, generator=False, long_schedule=False), dtype="fp16", compress=True
)
SMALL_PLAIN = encode_handoff(make_handoff(4, generator=False, long_schedule=False), dtype="fp16")


def expect_error(match: str, data: bytes, **kw) -> None:
    with pytest.raises(HandoffError, match=match):
        decode_handoff(data, **kw)


# ----------------------------------------------------------------------------------------------
# round trips


def test_fp32_round_trip_is_bit_exact():
    d = decode_handoff(VALID)
    sent, got = all_tensors(H), all_tensors(d)
    assert sent.keys() == got.keys()
    for name, t in sent.items():
        assert got[name].dtype == t.dtype, name
        assert torch.equal(got[name], t), name
    assert (d.family_id, d.family_version, d.step) == (H.family_id, H.family_version, H.step)
    assert (d.request, d.plan) == (H.request, H.plan)
    assert d.accounting == {**H.accounting, "handoff_bytes": len(VALID)}  # the real byte count
    g = torch.Generator().set_state(d.generator_state)
    g0 = torch.Generator().set_state(H.generator_state)
    assert torch.equal(torch.randn(5, generator=g), torch.randn(5, generator=g0))


def test_encoding_is_deterministic():
    assert encode_handoff(make_handoff()) == VALID
    assert encode_handoff(make_handoff(), dtype="fp16", compress=True) == VALID_ZSTD


def test_fp16_within_fp16_precision_and_decoded_as_float32():
    raw16 = encode_handoff(H, dtype="fp16")
    assert len(raw16) < len(VALID)
    for data in (raw16, VALID_ZSTD):
        d = decode_handoff(data)
        assert d.latents.dtype == torch.float32
        assert torch.allclose(d.latents, H.latents, rtol=2**-11, atol=2**-24)
        for k in ("model_outputs",):
            assert d.sampler_state[k].dtype == torch.float32
            assert torch.allclose(d.sampler_state[k], H.sampler_state[k], rtol=2**-11, atol=2**-24)
        assert not torch.equal(d.latents, H.latents)  # really went through fp16
        # schedule, integer tensors and the generator state are untouched by the wire dtype
        for k, t in H.schedule.items():
            assert d.schedule[k].dtype == t.dtype and torch.equal(d.schedule[k], t)
        assert torch.equal(d.sampler_state["lower_order_nums"], H.sampler_state["lower_order_nums"])
        assert d.conditioning["attention_mask"].dtype == torch.int64
        assert torch.equal(d.generator_state, H.generator_state)


def test_zstd_round_trip_fp32_exact_and_smaller_for_redundant_data():
    h = make_handoff()
    h.schedule["alphas_cumprod"] = torch.linspace(0.9999, 0.005, 1000)
    h.sampler_state["model_outputs"] = torch.zeros(2, 1, 4, 8, 8)
    plain, packed = encode_handoff(h), encode_handoff(h, compress=True)
    assert len(packed) < len(plain)
    d = decode_handoff(packed)
    for name, t in all_tensors(h).items():
        assert torch.equal(all_tensors(d)[name], t), name
    assert split(packed)[0]["compression"] == "zstd"


def test_optional_parts_absent_round_trip():
    h = make_handoff(conditioning=False, generator=False)
    h.sampler_state = {}
    h.step = 0
    d = decode_handoff(encode_handoff(h))
    assert d.conditioning is None and d.generator_state is None and d.sampler_state == {}
    assert d.step == 0


def test_cuda_free_half_precision_input_is_accepted_exactly():
    h = make_handoff()
    h.latents = h.latents.half()
    d = decode_handoff(encode_handoff(h))
    assert d.latents.dtype == torch.float32 and torch.equal(d.latents, h.latents.float())


def test_file_round_trip_and_expectations(tmp_path):
    path = tmp_path / "h.rdh"
    n = write_handoff(path, H, compress=True)
    assert n == path.stat().st_size
    d = read_handoff(path, expect_latent_shape=(1, 4, 8, 8), expect_family=("tiny", "0.1.0"))
    assert torch.equal(d.latents, H.latents)
    assert read_handoff(path, expect_latent_shape=(4, 8, 8)).step == 4
    assert [p.name for p in tmp_path.iterdir()] == ["h.rdh"]  # no temp file left behind


def test_read_missing_directory_and_oversized_file(tmp_path):
    with pytest.raises(HandoffError, match="no handoff file"):
        read_handoff(tmp_path / "absent.rdh")
    with pytest.raises(HandoffError, match="is a directory"):
        read_handoff(tmp_path)
    path = tmp_path / "big.rdh"
    path.write_bytes(VALID)
    with pytest.raises(HandoffError, match="the limit is 1000"):
        read_handoff(path, max_bytes=1000)


# ----------------------------------------------------------------------------------------------
# validation, one test per rule, each checking the message


def test_total_size_limit():
    n = len(VALID)
    expect_error(f"handoff is {n} bytes; the limit is {n - 1}", VALID, max_bytes=n - 1)
    with pytest.raises(HandoffError, match="encoded handoff is .* the limit is 100"):
        encode_handoff(H, max_bytes=100)
    expect_error("max_bytes must be an integer", VALID, max_bytes="big")


def test_header_size_limit():
    data = PREFIX.pack(MAGIC, FORMAT_VERSION, 0, MAX_HEADER_BYTES + 1, 0) + b"{}"
    expect_error("header length .* exceeds the limit", data)
    h = make_handoff()
    h.request["prompt"] = "x" * (MAX_HEADER_BYTES + 1)
    with pytest.raises(HandoffError, match="header is .* bytes; the limit is"):
        encode_handoff(h)


def test_unknown_magic_version_and_flags():
    expect_error("not a relaydiff handoff: magic", b"PK\x03\x04" + VALID[4:])
    expect_error("unsupported handoff format version 2", VALID[:4] + struct.pack("<H", 2) + VALID[6:])
    expect_error("unknown flags 0x0001", VALID[:6] + struct.pack("<H", 1) + VALID[8:])
    expect_error("format_version 7 disagrees with the prefix version 1", with_header(format_version=7))


def test_malformed_json_header():
    def raw_header(text: bytes) -> bytes:
        return PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(text), zlib.crc32(text)) + text

    expect_error("header is not valid JSON", raw_header(b'{"step": 4,'))
    expect_error("header is not valid UTF-8", raw_header(b'{"a": "\xff"}'))
    expect_error("header must be a JSON object, got list", raw_header(b"[1, 2]"))
    expect_error("non-standard JSON constant NaN", raw_header(b'{"a": NaN}'))
    expect_error("overflows a float", raw_header(b'{"a": 1e999}'))
    expect_error("repeats the JSON key 'a'", raw_header(b'{"a": 1, "a": 2}'))
    expect_error("nested too deeply|not valid JSON", raw_header(b"[" * 200_000 + b"]" * 200_000))


def test_missing_and_extra_header_fields():
    header, payload = split(VALID)
    del header["step"]
    expect_error(r"missing field\(s\) \['step'\] and extra field\(s\) \[\]", reframe(header, payload))
    expect_error(r"extra field\(s\) \['x'\]", with_header(x=1))
    expect_error(r"header\['family'\] has missing field\(s\) \['version'\]", with_header(family={"id": "tiny"}))
    h2, p2 = split(VALID)
    h2["tensors"][0]["strides"] = [1]
    expect_error(r"extra field\(s\) \['strides'\]", reframe(h2, p2))
    plan = copy.deepcopy(H.plan)
    plan[0]["weight"] = 1.0
    expect_error(r"plan\[0\]\['weight'\]: unknown field", with_header(plan=plan))
    req = dict(H.request)
    del req["seed"]
    expect_error(r"request is missing field\(s\) \['seed'\]", with_header(request=req))
    plan = copy.deepcopy(H.plan)
    del plan[1]["node"]
    expect_error(r"plan\[1\] is missing field\(s\) \['node'\]", with_header(plan=plan))


def test_wrong_types():
    expect_error("step must be an integer, got str", with_header(step="4"))
    expect_error("step must be an integer, got bool", with_header(step=True))
    expect_error(r"request\['steps'\]: input should be a valid integer, got '8'", with_header(request={**H.request, "steps": "8"}))
    expect_error(r"request\['guidance'\]: input should be a valid number, got None",
                 with_header(request={**H.request, "guidance": None}))
    expect_error(r"request\['sampler_options'\]: input should be a valid dictionary",
                 with_header(request={**H.request, "sampler_options": []}))
    expect_error("family_id must be a non-empty string, got 3", with_header(family={"id": 3, "version": "1"}))
    expect_error("accounting must be a dict, got list", with_header(accounting=[1]))
    header, payload = split(VALID)
    header["payload"] = 3
    expect_error(r"header\['payload'\] must be an object", hmod._frame(header, payload))
    expect_error("header dtype must be one of", with_header(dtype="bf16"))
    expect_error("header compression must be one of", with_header(compression="gzip"))
    expect_error(r"header\['tensors'\] must be a list", with_header(tensors={}))
    with pytest.raises(HandoffError, match="request must be a dict, got tuple"):
        validate_handoff(Handoff(**{**vars(H), "request": ("a",)}))
    with pytest.raises(HandoffError, match=r"accounting\['t'\] is a tuple, which JSON cannot carry"):
        encode_handoff(Handoff(**{**vars(H), "accounting": {"t": (1, 2)}}))
    with pytest.raises(HandoffError, match="schedule\\['sigmas'\\] must be a torch.Tensor, got list"):
        encode_handoff(Handoff(**{**vars(H), "schedule": {"sigmas": [1.0]}}))
    with pytest.raises(HandoffError, match="dtype must be one of"):
        encode_handoff(H, dtype="int8")
    expect_error("handoff data must be bytes, got str", "RDHO")


def test_hostile_values_give_short_clear_errors():
    deep: list = []
    node = deep
    for _ in range(100):
        node.append([])
        node = node[0]
    expect_error("nested deeper than 34 levels", with_header(accounting={"x": deep}))
    with pytest.raises(HandoffError, match=r"family_id must be a non-empty string, got \[0, 0, .*\.\.\.$") as info:
        decode_handoff(with_header(family={"id": [0] * 100_000, "version": "1"}))
    assert len(str(info.value)) < 200
    # the engine's Request schema decides what a request may hold: guidance is a float in [0, 50]
    expect_error(r"request\['guidance'\]: input should be a valid number, got 1000000.*\.\.\.$",
                 with_header(request={**H.request, "guidance": 10**400}))
    with pytest.raises(HandoffError, match="meta tensor"):
        encode_handoff(Handoff(**{**vars(H), "latents": torch.empty(1, 4, 8, 8, device="meta")}))


def test_plan_must_cover_the_steps():
    gap = copy.deepcopy(H.plan)
    gap[1]["start"] = 5
    expect_error(r"gap in the plan: steps 4..5 are not assigned", with_header(plan=gap))
    short = copy.deepcopy(H.plan)
    short[1]["end"] = 7
    expect_error("plan ends at step 7 but the request has 8 steps", with_header(plan=short))
    rev = [{**H.plan[0], "end": 0}]
    expect_error(r"segment large:0-0 is empty or reversed", with_header(plan=rev))
    expect_error("plan must be a non-empty list", with_header(plan=[]))


def test_step_out_of_range():
    expect_error(r"step 8 is out of range: a handoff needs 0 <= step < steps \(8\)", with_header(step=8))
    expect_error("step -1 is out of range", with_header(step=-1))
    with pytest.raises(HandoffError, match="request\\['steps'\\]: input should be greater than or equal to 1, got 0"):
        validate_handoff(Handoff(**{**vars(H), "request": {**H.request, "steps": 0}}))


def test_latent_shapes():
    for bad in (torch.zeros(4, 8, 8), torch.zeros(2, 4, 8, 8), torch.zeros(1, 0, 8, 8)):
        with pytest.raises(HandoffError, match=r"latents must have shape \[1, C, H, W\]"):
            encode_handoff(Handoff(**{**vars(H), "latents": bad}))
    tensors = {k: v for k, v in all_tensors(H).items()}
    tensors["latents"] = torch.zeros(2, 4, 8, 8)
    expect_error(r"latents must have shape \[1, C, H, W\].*got \[2, 4, 8, 8\]", with_tensors(tensors))
    expect_error(r"latents have shape \[1, 4, 8, 8\], expected \[1, 4, 16, 16\]", VALID,
                 expect_latent_shape=(1, 4, 16, 16))
    expect_error(r"expected \[8, 8, 8\]", VALID, expect_latent_shape=(8, 8, 8))
    expect_error(r"expect_latent_shape must be \(1, C, H, W\) or \(C, H, W\), got \(8, 8\)", VALID,
                 expect_latent_shape=(8, 8))
    h2, p2 = split(VALID)
    next(e for e in h2["tensors"] if e["name"] == "latents")["shape"] = [1, 4, 8, 9]
    expect_error(r"tensor 'latents' is float32 \[1, 4, 8, 8\] in the payload but float32 \[1, 4, 8, 9\]",
                 reframe(h2, p2))
    h3, p3 = split(VALID)
    h3["tensors"][0]["shape"] = [-1]
    expect_error("has an invalid shape", reframe(h3, p3))


def test_dtypes():
    with pytest.raises(HandoffError, match="latents has dtype float64; allowed: float16, bfloat16, float32"):
        encode_handoff(Handoff(**{**vars(H), "latents": H.latents.double()}))
    with pytest.raises(HandoffError, match="generator_state has dtype int64; allowed: uint8"):
        encode_handoff(Handoff(**{**vars(H), "generator_state": torch.zeros(4, dtype=torch.int64)}))
    with pytest.raises(HandoffError, match="generator_state must be a non-empty 1-D uint8 tensor"):
        encode_handoff(Handoff(**{**vars(H), "generator_state": torch.zeros(2, 2, dtype=torch.uint8)}))
    h2, p2 = split(VALID)
    h2["tensors"][0]["dtype"] = "complex64"
    expect_error("has unknown dtype 'complex64'", reframe(h2, p2))
    h3, p3 = split(VALID)
    next(e for e in h3["tensors"] if e["name"] == "latents")["dtype"] = "float16"
    expect_error(r"tensor 'latents' is float32 \[1, 4, 8, 8\] in the payload but float16", reframe(h3, p3))
    tensors = dict(all_tensors(H))
    tensors["sampler_state/model_outputs"] = tensors["sampler_state/model_outputs"].half()
    expect_error("tensor 'sampler_state/model_outputs' is torch.float16 but the handoff dtype is fp32",
                 with_tensors(tensors))
    tensors = dict(all_tensors(H))
    tensors["latents"] = torch.zeros(1, 4, 8, 8, dtype=torch.int64)
    expect_error("latents must be floating point", with_tensors(tensors))


def test_non_finite_values():
    for name in ("latents", "model_outputs"):
        for value in (float("nan"), float("inf")):
            h = make_handoff()
            t = h.latents if name == "latents" else h.sampler_state[name]
            t.view(-1)[3] = value
            with pytest.raises(HandoffError, match=r"contains 1 non-finite \(NaN or inf\) value"):
                encode_handoff(h)
    h = make_handoff()
    h.latents.view(-1)[0] = 1e5
    with pytest.raises(HandoffError, match="latents overflows float16; send it as fp32"):
        encode_handoff(h, dtype="fp16")
    assert encode_handoff(h, dtype="fp32")  # fine in fp32
    tensors = dict(all_tensors(H))
    tensors["latents"] = tensors["latents"].clone()
    tensors["latents"].view(-1)[:2] = float("nan")
    expect_error(r"latents contains 2 non-finite", with_tensors(tensors))
    tensors = dict(all_tensors(H))
    tensors["schedule/sigmas"] = torch.tensor([1.0, float("nan")], dtype=torch.float64)
    expect_error(r"schedule\['sigmas'\] contains 1 NaN value", with_tensors(tensors))
    # +inf is a legitimate schedule value (e.g. log-SNR at sigma = 0), so the schedule allows it
    tensors["schedule/sigmas"] = torch.tensor([1.0, float("inf")], dtype=torch.float64)
    assert torch.isinf(decode_handoff(with_tensors(tensors)).schedule["sigmas"][1])
    with pytest.raises(HandoffError, match=r"accounting\['x'\] is nan; JSON fields must be finite"):
        encode_handoff(Handoff(**{**vars(H), "accounting": {"x": float("nan")}}))


def test_payload_length_and_checksums():
    corrupted = bytearray(VALID)
    corrupted[PREFIX.size + 30] ^= 0x01
    expect_error("header checksum mismatch", bytes(corrupted))
    expect_error("handoff has 3 unexpected bytes after the payload", VALID + b"abc")
    corrupted = bytearray(VALID)
    corrupted[-5] ^= 0x01
    expect_error("payload checksum mismatch", bytes(corrupted))
    header, payload = split(VALID)
    header["payload"]["sha256"] = "zz"
    expect_error("sha256 must be 64 hex characters", hmod._frame(header, payload))
    header, payload = split(VALID)
    header["payload"]["length"] = -1
    expect_error("must be non-negative integers", hmod._frame(header, payload))
    header, payload = split(VALID)
    expect_error("raw_length 1 must equal length", reframe(header, payload, raw=b"x"))


def test_truncated_data():
    expect_error("truncated: 5 bytes, shorter than the 16-byte prefix", VALID[:5])
    expect_error("truncated: header needs", VALID[:40])
    expect_error(r"truncated: payload needs \d+ bytes, only \d+ present", VALID[:-1])
    expect_error("truncated", b"")


def test_family_mismatch():
    expect_error("handoff is for family tiny@0.1.0, expected sd15@1", VALID, expect_family=("sd15", "1"))
    expect_error("expected tiny@0.2.0", VALID, expect_family=("tiny", "0.2.0"))
    expect_error("expect_family must be a .* pair of strings, got 'tiny'", VALID, expect_family="tiny")


def test_hostile_payloads_with_valid_checksums():
    header, _ = split(VALID)
    expect_error("payload is not valid safetensors data", reframe(header, b"\x08" + b"\x00" * 7 + b"notjson!"))
    tensors = dict(all_tensors(H))
    del tensors["schedule/sigmas"]
    header["tensors"] = [e for e in header["tensors"]]  # manifest still lists sigmas
    payload = safetensors.torch.save(tensors)
    expect_error(r"payload tensors differ from the manifest: missing \['schedule/sigmas'\]", reframe(header, payload))
    tensors = dict(all_tensors(H))
    tensors["evil"] = torch.zeros(1)
    expect_error("unknown tensor name 'evil'", with_tensors(tensors))
    tensors = dict(all_tensors(H))
    del tensors["latents"]
    expect_error("the manifest has no 'latents' tensor", with_tensors(tensors))
    h2, p2 = split(VALID)
    h2["tensors"].append(dict(h2["tensors"][0]))
    expect_error("is listed twice in the manifest", reframe(h2, p2))


def test_zstd_bombs_and_bad_frames_are_refused():
    header, _ = split(VALID_ZSTD)
    bomb_raw = b"\x00" * (8 * 1024 * 1024)
    bomb = zstandard.ZstdCompressor(level=19).compress(bomb_raw)
    assert len(bomb) < 2048
    # the header lies about the size: refused before decompressing anything
    expect_error("zstd frame declares 8388608 bytes of content, header says 100", reframe(header, bomb, raw=b"x" * 100))
    # the header is honest but the decompressed size is over the limit
    expect_error("payload would decompress to 8388608 bytes; the limit is 1000000",
                 reframe(header, bomb, raw=bomb_raw), max_bytes=1_000_000)
    # a frame without a declared content size is refused (no unbounded decompression)
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"abc")
    expect_error("declares -1 bytes of content|zstd frame declares", reframe(header, no_size, raw=b"abc"))
    expect_error("payload is not a zstd frame", reframe(header, b"not zstd at all", raw=b"abc"))
    two_frames = zstandard.ZstdCompressor().compress(b"abc") * 2
    expect_error("payload does not decompress", reframe(header, two_frames, raw=b"abc"))


# ----------------------------------------------------------------------------------------------
# fuzzing: every outcome is a valid Handoff or a HandoffError, never another exception or a hang


def decode_or_reject(data: bytes) -> None:
    try:
        h = decode_handoff(data)
    except HandoffError as e:
        assert str(e)
        return
    validate_handoff(h)


@pytest.mark.parametrize("encoding", ["plain", "zstd"])
def test_every_truncation_is_rejected(encoding):
    data = {"plain": SMALL_PLAIN, "zstd": SMALL}[encoding]
    assert len(data) < 4096  # small enough to try every length quickly
    for n in range(len(data)):
        with pytest.raises(HandoffError, match="truncated"):
            decode_handoff(data[:n])


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes(data):
    with pytest.raises(HandoffError):
        decode_handoff(data)


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes_after_a_valid_prefix(tail):
    decode_or_reject(VALID[:PREFIX.size] + tail)
    decode_or_reject(PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(tail), zlib.crc32(tail)) + tail)


@FUZZ
@given(st.sampled_from([VALID, VALID_ZSTD, SMALL, SMALL_PLAIN]), st.integers(0, 10**9), st.integers(1, 255))
def test_fuzz_single_byte_mutations(data, where, delta):
    i = where % len(data)
    mutated = bytearray(data)
    mutated[i] = (mutated[i] + delta) % 256
    decode_or_reject(bytes(mutated))


@FUZZ
@given(st.integers(0, 10**9), st.integers(1, 255))
def test_fuzz_mutations_of_the_header_with_resealed_checksum(where, delta):
    """Mutate only the JSON header and fix its CRC, so the parser and validator must cope."""
    magic, version, flags, n, _ = PREFIX.unpack_from(SMALL)
    text = bytearray(SMALL[PREFIX.size:PREFIX.size + n])
    text[where % n] = (text[where % n] + delta) % 256
    prefix = PREFIX.pack(magic, version, flags, n, zlib.crc32(text))
    decode_or_reject(prefix + bytes(text) + SMALL[PREFIX.size + n:])


@FUZZ
@given(st.integers(0, 10**9), st.integers(1, 255))
def test_fuzz_payload_mutations_with_resealed_checksum(where, delta):
    """A sender that recomputes the checksum: the safetensors and zstd parsers must cope."""
    header, payload = split(SMALL)
    raw = zstandard.ZstdDecompressor().decompress(payload)
    for blob, compressed in ((bytearray(raw), False), (bytearray(payload), True)):
        blob[where % len(blob)] = (blob[where % len(blob)] + delta) % 256
        h = copy.deepcopy(header)
        if compressed:
            decode_or_reject(reframe(h, bytes(blob), raw=raw))
        else:
            h["compression"] = "none"
            decode_or_reject(reframe(h, bytes(blob)))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
HEADER_PATHS = sorted(split(SMALL)[0]) + [
    "family.id", "family.version", "request.steps", "request.prompt", "request.guidance", "request.seed",
    "request.sampler_options", "plan.0", "plan.0.start", "plan.0.member", "plan.1.adapter", "tensors.0",
    "tensors.0.name", "tensors.0.dtype", "tensors.0.shape", "payload.raw_length",
]


@FUZZ
@given(st.sampled_from(HEADER_PATHS), JSON_VALUES)
def test_fuzz_header_fields_replaced_by_arbitrary_json(path, value):
    """Any JSON value in any header field (CRC and checksum valid): a Handoff or a HandoffError."""
    header, payload = split(SMALL)
    *parents, last = path.split(".")
    node = header
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(last) if isinstance(node, list) else last] = value
    raw = zstandard.ZstdDecompressor().decompress(payload)
    try:
        data = reframe(header, payload, raw=raw)
    except HandoffError:  # e.g. a value JSON cannot encode; nothing to decode
        return
    decode_or_reject(data)


def test_default_limits_are_sane():
    assert DEFAULT_MAX_BYTES >= 16 * 1024 * 1024 and MAX_HEADER_BYTES < DEFAULT_MAX_BYTES
    assert len(VALID) < 32 * 1024


def test_segment_guidance_is_optional_and_checked():
    plan = copy.deepcopy(H.plan)
    plan[1]["guidance"] = 1.0
    assert decode_handoff(with_header(plan=plan)).plan[1]["guidance"] == 1.0
    for bad in (True, "1", -1.0, 51.0):  # NaN cannot reach here: the header is strict JSON
        plan[1]["guidance"] = bad
        expect_error(r"plan\[1\]\['guidance'\]: input should be", with_header(plan=plan))
    plan[1]["guidance"] = 1.0
    plan[1]["guidance_scale"] = 2.0
    expect_error(r"plan\[1\]\['guidance_scale'\]: unknown field", with_header(plan=plan))


def test_handoff_bytes_counts_every_crossing(tiny):
    """accounting.handoff_bytes holds the real size: this handoff's bytes plus the chain's earlier ones."""
    from relaydiff.engine.plan import Plan, Request
    from relaydiff.engine.runner import from_handoff, generate, to_handoff

    res = generate(tiny, [Request("a red circle", steps=6, seed=3)], [Plan.relay("large", "small", 2, 6)],
                   stop_at=2)[0]
    first = encode_handoff(res.handoff)
    assert decode_handoff(first).accounting["handoff_bytes"] == len(first)
    chain = from_handoff(tiny, decode_handoff(first))
    assert chain.accounting.handoff_bytes == len(first)
    second = encode_handoff(to_handoff(tiny, chain), dtype="fp16", compress=True)
    assert decode_handoff(second).accounting["handoff_bytes"] == len(first) + len(second)
