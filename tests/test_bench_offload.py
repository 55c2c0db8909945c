"""The bench's honest metric (share of the possible gain) and its held-out families (issue 18)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from relaydiff.bench.offload import gain_share, run_families, training_mix
from relaydiff.sim.families import FAMILIES, TRAINING_FAMILIES, family_names
from relaydiff.sched.registry import solve
from relaydiff.system.problem import objective_value, sample_instance
from relaydiff.system.scenario import load_scenario

DEFAULT = load_scenario("default")


def _brute(inst) -> float:
    return max(objective_value(inst, np.array(k)) for k in itertools.product(inst.options, repeat=inst.n_users))


@pytest.mark.parametrize("seed", range(6))
def test_gain_share_against_brute_force(seed: int) -> None:
    inst = sample_instance(DEFAULT, n_users=1 + seed % 4, seed=seed)
    opt = _brute(inst)
    local = objective_value(inst, np.zeros(inst.n_users, dtype=np.int64))
    if opt - local <= 1e-9 * max(1.0, abs(opt)):
        assert gain_share(opt, opt, local) is None
        return
    assert gain_share(local, opt, local) == 0.0
    assert gain_share(opt, opt, local) == pytest.approx(1.0)
    for name in ("greedy", "local_search", "drl", "all_edge"):
        g = gain_share(solve(name, inst).objective, opt, local)
        assert g <= 1.0 + 1e-9


def test_gain_share_tells_apart_what_the_ratio_hides() -> None:
    # optimum 10, all-local 6: a solver at 9.6 has ratio 0.96 but captured only 90% of the gain
    assert gain_share(9.6, 10.0, 6.0) == pytest.approx(0.9)
    assert gain_share(5.0, 10.0, 6.0) == pytest.approx(-0.25)  # worse than all-local
    assert gain_share(6.0, 6.0, 6.0) is None


def test_families_are_valid_and_distinct() -> None:
    names = family_names()
    assert len(names) == len(set(names)) >= 12
    mix = training_mix()  # the shipped policy's own metadata: its training families
    assert mix and mix <= set(names) and mix != set(names)  # some families stay held out
    assert set(TRAINING_FAMILIES) < set(names)
    for fam in FAMILIES:
        sc = fam.scenario()
        inst = fam.sample(sc, 3, np.random.default_rng(0))
        assert inst.n_users == 3 and inst.steps == sc.steps
        assert np.isfinite(objective_value(inst, np.zeros(3, dtype=np.int64)))
    base = sample_instance(DEFAULT, n_users=3, seed=np.random.default_rng(0))
    rq = next(f for f in FAMILIES if f.name == "random_quality")
    assert not np.allclose(rq.sample(rq.scenario(), 3, np.random.default_rng(0)).quality, base.quality)


def test_run_families_reports_each_family_apart() -> None:
    rows = run_families(["default", "laptops"], sizes=(4, 40), rounds=2, seed=3, exact_max_n=10)
    assert [r["family"] for r in rows] == ["default", "laptops"]
    assert rows[0]["in_training"] is True and rows[1]["in_training"] is False
    for row in rows:
        small, large = row["by_n"]
        assert small["reference"] == "exact" and small["exact"]["gain_min"] in (None, pytest.approx(1.0))
        assert large["reference"] == "best_found" and "exact" not in large  # no MILP above exact_max_n
        for name in ("drl", "greedy", "local_search"):
            assert row[name]["ratio_min"] <= 1.0 + 1e-9
            assert {"gain_mean", "gain_min", "ms_median", "rounds_below_0.98"} <= set(small[name])
    with pytest.raises(ValueError, match="unknown families"):
        run_families(["nope"], sizes=(4,), rounds=1)


def test_plots_redraw_from_a_result(tmp_path) -> None:
    from relaydiff.bench.offload import plot_offload, run

    result = run(DEFAULT, seed=1, opt_sizes=(4,), opt_rounds=1, scale_sizes=(8,), scale_rounds=1,
                 families=["default", "laptops"], family_sizes=(4,), family_rounds=1)
    assert result["families"][0]["by_n"][0]["drl"]["cpu_ms_median"] > 0
    paths = plot_offload(result, tmp_path)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["bench_offload_families.png", "bench_offload_time.png"]
    assert all((tmp_path / p.rsplit("/", 1)[1]).stat().st_size > 1000 for p in paths)
