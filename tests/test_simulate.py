"""`relaydiff simulate` and `relaydiff bench offload` on tiny settings: files written, clear errors."""

from __future__ import annotations

import csv
import json

from typer.testing import CliRunner

from relaydiff.cli import app

runner = CliRunner()


def test_simulate_writes_csv_json_and_plots(tmp_path):
    out = tmp_path / "sim"
    res = runner.invoke(app, ["simulate", "default", "-p", "greedy", "-p", "drl", "--rounds", "3", "--population", "20",
                              "--arrival-mean", "6", "--n-max", "16", "--out", str(out)])
    assert res.exit_code == 0, res.output
    for name in ("rounds.csv", "summary.json", "utility.png", "latency.png", "quality.png"):
        assert (out / name).stat().st_size > 0
    rows = list(csv.DictReader((out / "rounds.csv").open()))
    assert len(rows) == 6 and {r["policy"] for r in rows} == {"greedy", "drl"}
    # same seed, same rounds for both policies
    by = {p: [r["n_users"] for r in rows if r["policy"] == p] for p in ("greedy", "drl")}
    assert by["greedy"] == by["drl"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["policies"]) == {"greedy", "drl"}
    assert (out / "utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_errors(tmp_path):
    res = runner.invoke(app, ["simulate", "default", "-p", "no_such_solver", "--rounds", "1", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "unknown solver" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nsteps: 20\nsplits: [4, 30]\n")
    res = runner.invoke(app, ["simulate", str(bad), "-p", "greedy", "--rounds", "1", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "splits" in res.output
    res = runner.invoke(app, ["simulate", "default", "-p", "greedy", "--rounds", "0", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "rounds" in res.output


def test_bench_offload_json_shape():
    res = runner.invoke(app, ["bench", "offload", "--json", "--sizes", "4", "--rounds", "2", "--scale-sizes", "40",
                              "--scale-rounds", "1", "--families", "default,steps_50", "--family-sizes", "3",
                              "--family-rounds", "1"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    opt = out["optimality"][0]
    assert opt["n"] == 4
    for name in ("exact", "drl", "greedy"):
        assert {"ratio_mean", "ratio_min", "gain_mean", "gain_min", "ms_median"} <= set(opt[name])
    assert [f["family"] for f in out["families"]] == ["default", "steps_50"]  # steps_50 is held out
    assert [f["in_training"] for f in out["families"]] == [True, False]
    assert out["targets"]["held_out_families"] == 1 and "drl_held_out_gain_mean" in out["targets"]
    assert opt["exact"]["ratio_mean"] <= 1.0 + 1e-9 and opt["drl"]["ratio_mean"] <= 1.0 + 1e-9
    scl = out["scaling"][0]
    assert scl["n"] == 40 and scl["greedy"]["vs_greedy_mean"] == 1.0
    assert "cores" in out["hardware"]
    res = runner.invoke(app, ["bench", "offload", "--json", "--families", "default,nope"])
    assert res.exit_code != 0 and "unknown nope" in res.output
