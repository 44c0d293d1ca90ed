"""The bootstrap intervals behind `minift compare`: coverage on a known case, agreement with
the normal-theory interval, and the paired test's behaviour."""
import math

import numpy as np
import pytest

from minift.stats import bootstrap_ci, bootstrap_ratio_ci, paired_bootstrap, significant_pairs


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


def test_ratio_interval_covers_a_token_accuracy_of_lines_of_different_lengths():
    """Tokens right / tokens over 200 lines of 10-60 tokens, each token right with p = 0.9
    and a line's tokens correlated (a line is either 'easy', p = 0.97, or 'hard', p = 0.69,
    so resampling whole lines, not tokens, is what gets the width right): the 95% interval
    holds 0.9 in about 95% of 300 draws (binomial noise of that share: +-2.5%)."""
    rng = np.random.default_rng(3)
    hits = 0
    for i in range(300):
        lengths = rng.integers(10, 61, size=200)
        p = np.where(rng.random(200) < 0.75, 0.97, 0.69)           # mean 0.75*0.97+0.25*0.69
        right = rng.binomial(lengths, p)
        ci = bootstrap_ratio_ci(right, lengths, n_resamples=1000, seed=i)
        assert ci["ratio"] == right.sum() / lengths.sum() and ci["n"] == 200
        hits += ci["low"] <= 0.9 <= ci["high"]
    assert 0.90 <= hits / 300 <= 0.99


def test_ratio_interval_with_equal_denominators_is_the_interval_of_the_mean():
    x = np.random.default_rng(4).integers(0, 8, size=50)
    ratio, mean = bootstrap_ratio_ci(x, [8] * 50, seed=5), bootstrap_ci(x / 8, seed=5)
    for key in ("low", "high"):
        assert ratio[key] == pytest.approx(mean[key], rel=1e-12)
    assert ratio["ratio"] == pytest.approx(mean["mean"], rel=1e-12)


@pytest.mark.parametrize("num, den, match", [([1, 2], [3], "2 numerators, 1 denominators"),
                                             ([1, 2], [3, 0], "1 not positive"),
                                             ([], [], "non-empty")])
def test_bad_ratio_items_give_one_clear_error(num, den, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ratio_ci(num, den)


def test_block_bootstrap_widens_with_a_drift_and_block_1_is_the_plain_bootstrap():
    """A series faster for its first half than its second (step times on a machine whose load
    drifts): resampling runs of 6 neighbours gives a wider interval than treating the values
    as independent; a constant series gives the point itself; block 1 draws the plain
    bootstrap's very samples; a block below 1 is refused."""
    noise = np.random.default_rng(0).normal(0, 0.02, 48)
    drift = np.where(np.arange(48) < 24, 0.1, -0.1) + noise
    plain, blocks = bootstrap_ci(drift), bootstrap_ci(drift, block=6)
    assert plain["low"] < drift.mean() < plain["high"]
    assert blocks["low"] < drift.mean() < blocks["high"]
    assert blocks["high"] - blocks["low"] > 1.2 * (plain["high"] - plain["low"])
    assert bootstrap_ci(drift, block=1) == plain
    idx = np.random.default_rng(0).integers(0, 48, size=(2000, 48))
    assert plain["low"] == pytest.approx(np.quantile(drift[idx].mean(axis=1), 0.025), abs=0)
    c = bootstrap_ci([0.3] * 10, block=3)
    assert (c["low"], c["high"]) == pytest.approx((0.3, 0.3))
    with pytest.raises(ValueError, match="block must be at least 1"):
        bootstrap_ci(drift, block=0)
