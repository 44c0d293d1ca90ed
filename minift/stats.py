"""Confidence intervals for task metrics: the bootstrap over test items (Efron & Tibshirani
1993, ch. 13, percentile intervals) and the paired bootstrap for comparing two models on the
same items (Koehn 2004, "Statistical Significance Tests for Machine Translation Evaluation").

A metric here is a mean of per-item scores (exact match 0/1, ROUGE-L in [0, 1], a correct
choice 0/1), so one resample is a draw of n item indices with replacement and the mean of
their scores. With 100 test items, an accuracy near 0.5 has a 95% interval about +-0.1 wide:
two methods a few points apart cannot be told apart, which is why `minift compare` prints
the intervals and marks only the differences the paired bootstrap finds.

Pairing matters: both models answer the same items, and most of the variance is in which
items are hard. Resampling the items once for both (the same indices) and taking the mean
of the per-item differences cancels that shared part, so the paired interval for a
difference is narrower than the two separate intervals suggest.
"""
from __future__ import annotations

import numpy as np

N_RESAMPLES = 2000   # Monte Carlo error of a 95% bound ~0.005 on a 0/1 metric of 100 items


def _check(scores, name: str) -> np.ndarray:
    a = np.asarray(scores, dtype=np.float64)
    if a.ndim != 1 or a.size == 0 or not np.isfinite(a).all():
        raise ValueError(f"{name} must be a non-empty list of finite per-item scores")
    return a


def _resamples(n: int, n_resamples: int, seed: int, block: int = 1) -> np.ndarray:
    """Item indices of n_resamples bootstrap samples of n items: (n_resamples, n).

    block 1 draws single items. block > 1 is the moving-block bootstrap (Kunsch 1989), for a
    series whose neighbours are correlated (step times on a machine whose load drifts): each
    sample joins ceil(n / block) runs of `block` consecutive indices, drawn with replacement
    among the n - block + 1 runs, cut to n, so the correlation inside a run is kept."""
    b = min(block, n)
    starts = np.random.default_rng(seed).integers(0, n - b + 1, size=(n_resamples, -(-n // b)))
    return (starts[:, :, None] + np.arange(b)).reshape(n_resamples, -1)[:, :n]


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The percentile interval of resampled statistics `values`."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_ci(scores, confidence: float = 0.95, n_resamples: int = N_RESAMPLES,
                 seed: int = 0, block: int = 1) -> dict:
    """{"mean", "low", "high", "n"}: the mean of per-item scores and its percentile interval;
    block > 1 resamples runs of that many neighbouring scores (`_resamples`)."""
    a = _check(scores, "scores")
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    low, high = _percentiles(a[_resamples(a.size, n_resamples, seed, block)].mean(axis=1),
                             confidence)
    return {"mean": float(a.mean()), "low": low, "high": high, "n": int(a.size)}


def bootstrap_ratio_ci(numerators, denominators, confidence: float = 0.95,
                       n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict:
    """{"ratio", "low", "high", "n"}: sum(numerators) / sum(denominators) over items (tokens
    right / tokens, when items have different lengths) and its percentile interval, each
    resample drawing whole items, both sums from the same draw."""
    num, den = _check(numerators, "numerators"), _check(denominators, "denominators")
    if num.size != den.size or (den <= 0).any():
        raise ValueError(f"need one positive denominator per numerator: {num.size} numerators, "
                         f"{den.size} denominators, {int((den <= 0).sum())} not positive")
    idx = _resamples(num.size, n_resamples, seed)
    low, high = _percentiles(num[idx].sum(axis=1) / den[idx].sum(axis=1), confidence)
    return {"ratio": float(num.sum() / den.sum()), "low": low, "high": high, "n": int(num.size)}


def paired_bootstrap(scores_a, scores_b, confidence: float = 0.95,
                     n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict:
    """Compare two models scored on the same items (item i of a and of b is the same test
    item). Returns {"diff": mean(a) - mean(b), "low", "high", "significant", "n"}:
    `significant` when the interval of the difference excludes 0."""
    a, b = _check(scores_a, "scores_a"), _check(scores_b, "scores_b")
    if a.size != b.size:
        raise ValueError(f"paired scores need the same items: {a.size} vs {b.size} scores")
    ci = bootstrap_ci(a - b, confidence, n_resamples, seed)
    return {"diff": ci["mean"], "low": ci["low"], "high": ci["high"],
            "significant": bool(ci["low"] > 0 or ci["high"] < 0), "n": ci["n"]}


def significant_pairs(per_method: dict[str, list[float]], confidence: float = 0.95,
                      seed: int = 0) -> list[dict]:
    """Every pair of methods (in the dict's order) with its paired-bootstrap difference:
    [{"a", "b", "diff", "low", "high", "significant", "n"}]."""
    names = list(per_method)
    return [{"a": x, "b": y, **paired_bootstrap(per_method[x], per_method[y], confidence,
                                                seed=seed)}
            for i, x in enumerate(names) for y in names[i + 1:]]
