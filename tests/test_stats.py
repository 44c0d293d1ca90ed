"""The bootstrap intervals behind `minift compare`: coverage on a known case, agreement with
the normal-theory interval, and the paired test's behaviour."""
import math

import numpy as np
import pytest

from minift.stats import bootstrap_ci, paired_bootstrap, significant_pairs


def test_interval_covers_the_true_mean_95_percent_of_the_time():
    """A 0/1 metric with p = 0.3 on 100 items, drawn 400 times: the 95% interval should hold
    0.3 in about 95% of draws (percentile intervals run a little short at n = 100;
    binomial noise of the coverage itself over 400 draws is +-2%)."""
    rng = np.random.default_rng(1)
    hits = 0
    for i in range(400):
        scores = (rng.random(100) < 0.3).astype(float)
        ci = bootstrap_ci(scores, n_resamples=1000, seed=i)
        hits += ci["low"] <= 0.3 <= ci["high"]
    assert 0.90 <= hits / 400 <= 0.98


def test_interval_matches_normal_theory_on_a_large_sample():
    """For n = 4000 the bootstrap interval of a mean is mean +- 1.96 sd / sqrt(n) (CLT),
    computed here without the bootstrap."""
    x = np.random.default_rng(2).exponential(size=4000)
    half = 1.959964 * x.std(ddof=1) / math.sqrt(x.size)
    ci = bootstrap_ci(x, seed=0)
    assert ci["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert ci["low"] == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert ci["high"] == pytest.approx(x.mean() + half, abs=0.1 * half)
    assert ci["n"] == 4000


def test_paired_test_finds_a_small_consistent_gain_the_separate_intervals_miss():
    """b = a with 8 of 100 items flipped from wrong to right: the separate intervals overlap,
    the paired difference (+0.08 on every resample's shared items) is significant."""
    rng = np.random.default_rng(3)
    a = (rng.random(100) < 0.5).astype(float)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:8]] = 1.0
    ca, cb = bootstrap_ci(a), bootstrap_ci(b)
    assert ca["high"] > cb["low"]                      # the separate intervals overlap
    res = paired_bootstrap(b, a)
    assert res["diff"] == pytest.approx(0.08)
    assert res["significant"] and res["low"] > 0
    same = paired_bootstrap(a, a)
    assert same["diff"] == 0 and not same["significant"]


def test_significant_pairs_covers_every_pair_once():
    per = {"x": [1, 1, 1, 0] * 25, "y": [0, 0, 0, 1] * 25, "z": [1, 0, 1, 0] * 25}
    rows = significant_pairs(per)
    assert [(r["a"], r["b"]) for r in rows] == [("x", "y"), ("x", "z"), ("y", "z")]
    assert rows[0]["significant"] and rows[0]["diff"] == pytest.approx(0.5)


@pytest.mark.parametrize("a, b, match", [([], [], "non-empty"), ([1, 0], [1], "same items"),
                                         ([1, float("nan")], [1, 0], "finite")])
def test_bad_scores_give_one_clear_error(a, b, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(a, b)
