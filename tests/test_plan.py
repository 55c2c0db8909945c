import pytest

from relaydiff.engine.plan import Plan, PlanError, Request, Segment, parse_plan, validate_plan

MEMBERS = {"large", "small"}
ADAPTERS = {"style_a": "small"}


def test_parse_roundtrip():
    p = parse_plan("large@edge:0-4,small+style_a@device:4-8")
    assert p.segments == (Segment("large", 0, 4, None, "edge"), Segment("small", 4, 8, "style_a", "device"))
    assert parse_plan(str(p)) == p
    assert Plan.from_list(p.to_list()) == p
    validate_plan(p, 8, MEMBERS, ADAPTERS)


@pytest.mark.parametrize("text,steps,message", [
    ("large:0-4,small:5-8", 8, "gap"),
    ("large:0-5,small:4-8", 8, "overlap"),
    ("large:1-8", 8, "gap"),
    ("large:0-4", 8, "ends at step 4"),
    ("huge:0-8", 8, "unknown member"),
    ("small+nope:0-8", 8, "unknown adapter"),
    ("large+style_a:0-8", 8, "belongs to member"),
    ("large:4-4,small:4-8", 8, "empty"),
    ("large:0-0", 0, "steps must be"),
    ("large:0-2000", 2000, "steps must be"),
])
def test_validation_errors(text, steps, message):
    with pytest.raises(PlanError, match=message):
        validate_plan(parse_plan(text), steps, MEMBERS, ADAPTERS)


@pytest.mark.parametrize("text", ["large", "large:0-", "large:a-b", "la rge:0-4", ""])
def test_parse_errors(text):
    with pytest.raises(PlanError, match="cannot parse"):
        parse_plan(text)


def test_request_validation():
    with pytest.raises(PlanError, match="steps"):
        Request("x", steps=0)
    with pytest.raises(PlanError, match="guidance"):
        Request("x", guidance=float("nan"))
    with pytest.raises(PlanError, match="seed"):
        Request("x", seed=-1)
    with pytest.raises(PlanError, match="unknown request fields"):
        Request.from_dict({"prompt": "x", "evil": 1})
    r = Request("x", steps=5, seed=3)
    assert Request.from_dict(r.to_dict()) == r


def test_relay_helper():
    assert str(Plan.relay("large", "small", 3, 8, "style_a")) == "large@edge:0-3,small+style_a@device:3-8"
    assert Plan.relay("large", "small", 0, 8).segments == (Segment("small", 0, 8, None, "device"),)
    assert Plan.relay("large", "small", 8, 8).segments == (Segment("large", 0, 8, None, "edge"),)


def test_segment_guidance_parses_serializes_and_validates():
    p = parse_plan("large@edge:0-4,small+style_a@device:4-8[g=1]")
    assert p.segments[1].guidance == 1.0 and p.segments[0].guidance is None
    assert parse_plan(str(p)) == p and Plan.from_list(p.to_list()) == p
    assert "guidance" not in p.to_list()[0]  # plans without segment guidance serialize as before
    assert Plan.relay("large", "small", 4, 8, device_guidance=1.5).segments[1].guidance == 1.5
    with pytest.raises(PlanError, match="guidance"):
        validate_plan(Plan((Segment("large", 0, 8, guidance=float("nan")),)), 8)
    with pytest.raises(PlanError, match="guidance"):
        validate_plan(Plan((Segment("large", 0, 8, guidance=60.0),)), 8)
    with pytest.raises(PlanError, match="malformed"):
        Plan.from_list([{"member": "large", "start": 0, "end": 8, "guidance": "x"}])
    with pytest.raises(PlanError, match="cannot parse"):
        parse_plan("large:0-8[g=-1]")
