"""The demo: split points from the measured table, and a short run on the shipped family."""

from __future__ import annotations

import json

from relaydiff.demo import PHASES, personal_split, run_demo


def _table(style: list[float], prompt: list[float]) -> dict:
    return {"personalization": {"split_points": [0, 5, 10, 15, 20],
                                "styles": {"a": {"style_fidelity": style, "prompt_fidelity": prompt}}}}


def test_personal_split_balances_style_and_prompt():
    # style survives until k=10, prompt fidelity rises with k: the balance is k=10
    assert personal_split(_table([1, 1, 1, 0.2, 0], [0.6, 0.7, 0.8, 0.85, 0.9]), 20) == 10
    # never 0 or T: a split it is, even where the device alone would score best
    assert personal_split(_table([1, 0, 0, 0, 0], [0.9, 0.5, 0.5, 0.5, 0.9]), 20) == 5
    assert personal_split(None, 20) is None
    assert personal_split({"personalization": {"skipped": "no adapters"}}, 20) is None
    assert personal_split(_table([1, 1], [0.5, 0.5]), 20) is None  # curves that do not match the split points


def test_demo_runs_on_the_shipped_family(tmp_path):
    phases: list[str] = []
    report = run_demo(tmp_path, steps=6, log=lambda _m: None, phase=phases.append)
    assert phases == list(PHASES)
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "report.md").is_file()
    assert json.loads((tmp_path / "report.json").read_text())["steps"] == 6
    assert 0 < report["handoff_k"] < 6 and 0 < report["personal_split_k"] < 6
    kinds = {u["kind"] for u in report["users"]}
    assert {"edge only", "relay", "split + adapter", "device only", "shared prefix"} <= kinds
    assert all(0.0 <= u["prompt_fidelity"] <= 1.0 for u in report["users"])
    # the group shares what the measured curves allow, never past its edge part k; the edge saves
    # (members - 1) / members of the group's large-member work on the s shared of k; cost measured paired
    sp = report["shared_prefix"]
    assert sp["grouped"] and 0 <= sp["steps"] <= report["personal_split_k"]
    group = [u for u in report["users"] if u["kind"] == "shared prefix"]
    assert all(u["shared_steps"] == sp["steps"] for u in group)
    assert abs(sp["edge_evals_saved_fraction"] - 2 / 3 * sp["steps"] / report["personal_split_k"]) < 1e-9
    assert all("prompt_fidelity_unshared" in u for u in group) and sp["prompt_fidelity_unshared"] is not None
    # the service part: every device's job went through the edge server and ended done, one round
    service = report["service"]["jobs"]
    assert len(service) == 4 and len({j["round"] for j in service}) == 1
    assert {j["kind"] for j in service} <= {"edge_only", "relay", "device_only"}
    for j in service:
        assert j["finished_by"] == ("edge" if j["kind"] == "edge_only" else "device")
        assert 0 < j["marks_ms"]["planned"] <= j["latency_ms"]
    assert (tmp_path / "service.png").is_file() and "## The service" in (tmp_path / "report.md").read_text()
