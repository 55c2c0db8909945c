"""The alpha study (bench.bandit_alpha): the live protocol's simulated twin, paired per seed, and its rule."""

from __future__ import annotations

import pytest

from relaydiff.bench.bandit_alpha import AlphaStudyConfig, alpha_study
from relaydiff.serve.bandit_live import LiveConfig


def test_alpha_study_pairs_every_arm_and_picks_by_its_rule():
    cfg = AlphaStudyConfig(alphas=(0.0, 0.5), seeds=(101, 102), live_seed=0,
                           live=LiveConfig(requests=15, arrival_rate_hz=0.31, warm_requests=60))
    out = alpha_study(cfg)
    tuning, arms = out["tuning"], out["arms"]
    assert set(tuning["alphas"]) == {"0.0", "0.5"} and len(out["per_seed"]) == 2
    margins = {a: s["margin_over_best_fixed"]["mean"] for a, s in tuning["alphas"].items()}
    assert out["chosen_alpha"] == float(max(margins, key=margins.get))  # the rule, on the tuning seeds only
    for a, s in tuning["alphas"].items():
        assert set(s["margin_over_fixed"]) == set(arms) and sum(s["arm_counts"]) == 2 * 15
        per_seed = [r["policies"][a]["reward_mean"] - max(r["fixed"].values()) for r in out["per_seed"]]
        assert s["margin_over_best_fixed"]["per_seed"] == pytest.approx(per_seed, abs=1e-4)
        assert s["ratio_to_oracle_min"] <= s["ratio_to_oracle_mean"]
        lo, hi = s["margin_over_best_fixed"]["ci95"]
        assert lo <= s["margin_over_best_fixed"]["mean"] <= hi
    assert out["live_twin"]["seed"] == 0 and set(out["live_twin"]["alphas"]) == {"0.0", "0.5"}
    # the same config gives the same figures (seeded streams and policies)
    again = alpha_study(cfg)
    assert again["tuning"]["alphas"] == tuning["alphas"]


@pytest.mark.parametrize("kw, message", [({"alphas": (-0.1,)}, "alphas"), ({"seeds": (0, 1)}, "live run's seed 0"),
                                         ({"alphas": ()}, "at least one alpha")])
def test_alpha_study_rejects_bad_settings(kw, message):
    with pytest.raises(ValueError, match=message):
        AlphaStudyConfig(**kw)


def test_alpha_study_cli_rejects_bad_arguments(capsys):
    from relaydiff.bench.bandit_alpha import main

    with pytest.raises(SystemExit, match="--seeds and --requests must be >= 1"):
        main(["--seeds", "0"])
    with pytest.raises(SystemExit, match="alphas: each must be a finite number >= 0"):
        main(["--alphas", "0.1,nan"])
