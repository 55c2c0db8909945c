"""Every bandit's constructor settings: one check with a one-line error naming the field, and the
same settings saved in the state's JSON as before the check was shared."""

from __future__ import annotations

import numpy as np
import pytest

from relaydiff.sched.bandit import BanditError, make_bandit

ARMS = ("a", "b", "c")


@pytest.mark.parametrize("kind, kw, says", [
    ("linucb", {"alpha": -0.1}, "alpha: must be >= 0, got -0.1"),
    ("linucb", {"alpha": float("nan")}, "alpha: must be a finite number, got nan"),
    ("linucb", {"alpha": "wide"}, "alpha: not a number ('wide')"),
    ("linucb", {"l2": 0.0}, "l2: must be > 0, got 0.0"),
    ("lints", {"v": float("inf")}, "v: must be a finite number, got inf"),
    ("egreedy", {"epsilon": 1.5}, "epsilon: must be in [0, 1], got 1.5"),
    ("swlinucb", {"window": 0}, "window: must be >= 1, got 0"),
    ("ucb1", {"c": -1}, "c: must be >= 0, got -1"),
    ("linucb_shared", {"arm_features": np.eye(3), "alpha": -1}, "alpha: must be >= 0, got -1"),
])
def test_a_bad_setting_names_its_field(kind, kw, says):
    with pytest.raises(BanditError) as err:
        make_bandit(kind, ARMS, 3, **kw)
    assert str(err.value) == says


def test_params_list_each_class_settings_base_first():
    assert make_bandit("swlinucb", ARMS, 3, alpha=0.3, l2=2.0, window=50).params() == {
        "l2": 2.0, "alpha": 0.3, "window": 50}
    assert make_bandit("lints", ARMS, 3, v=0.2).params() == {"l2": 1.0, "v": 0.2}
    assert make_bandit("egreedy", ARMS, 3, epsilon=0.1).params() == {"l2": 1.0, "epsilon": 0.1}
    assert make_bandit("ucb1", ARMS, 3, c=0.7).params() == {"c": 0.7}
    assert make_bandit("fixed", ARMS, 3, arm="b").params() == {"arm": 1}
    assert make_bandit("random", ARMS, 3).params() == {}
