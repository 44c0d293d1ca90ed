"""String metrics on generated answers, per item and as means: SQuAD's exact match and
token F1 (Rajpurkar et al. 2016 §6.1) and ROUGE-L (Lin 2004 §3.1). Pure Python, no torch;
evaluate.py runs the model and scores its answers with these.
"""
from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

_ARTICLES = {"a", "an", "the"}


def normalize_tokens(text: str) -> list[str]:
    """SQuAD's answer normalisation (Rajpurkar et al. 2016), extended to unicode.

    1. Unicode NFC, so "é" typed as e + combining accent equals the single "é";
    2. lowercase; 3. delete punctuation (ASCII string.punctuation and every unicode
    punctuation character, e.g. "。" or "¿"; no space is inserted, so "don't" -> "dont");
    4. split on whitespace; 5. drop the English articles a, an, the.
    Emoji and other symbols are kept as text. Scripts written without spaces (Chinese,
    Japanese) are not segmented: "北京是首都" is one token; pre-segment them if needed.
    """
    text = unicodedata.normalize("NFC", text).lower()
    text = "".join(c for c in text
                   if c not in string.punctuation and not unicodedata.category(c).startswith("P"))
    return [t for t in text.split() if t not in _ARTICLES]


def _check_str(pred, ref):
    if not isinstance(pred, str) or not isinstance(ref, str):
        raise TypeError(f"metrics compare strings, got {type(pred).__name__} and "
                        f"{type(ref).__name__}")


def exact_match(pred: str, ref: str) -> float:
    """1.0 if the normalised token lists are equal, else 0.0 (both empty count as equal)."""
    _check_str(pred, ref)
    return float(normalize_tokens(pred) == normalize_tokens(ref))


def _f_measure(overlap: int, n_pred: int, n_ref: int) -> float:
    """Harmonic mean of precision overlap / n_pred and recall overlap / n_ref.

    With no tokens on a side precision or recall is undefined; as SQuAD does, two empty
    sides score 1.0 and one empty side 0.0.
    """
    if n_pred == 0 or n_ref == 0:
        return float(n_pred == n_ref)
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: str, ref: str) -> float:
    """SQuAD's token F1: overlap counts each shared token min(count in pred, count in ref)."""
    _check_str(pred, ref)
    p, r = normalize_tokens(pred), normalize_tokens(ref)
    overlap = sum((Counter(p) & Counter(r)).values())
    return _f_measure(overlap, len(p), len(r))


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence by dynamic programming, one row of len(b) + 1 at a time."""
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def rouge_tokens(text: str) -> list[str]:
    """ROUGE's tokens: NFC, lowercase, then every run of letters and digits is a token and
    everything else separates them ("put_nowait(item)" -> put, nowait, item).

    On ASCII text these are exactly the tokens of the rouge-score package (Google's
    reimplementation of Lin's ROUGE-1.5.5, without its optional stemmer; tested against it),
    so the scores are the ones papers report. Unlike that package, which deletes every
    character outside a-z and 0-9, letters and digits of any script stay in their tokens
    ("élève" is one token there "l ve"). Articles stay (SQuAD's normalize_tokens drops them).
    """
    return _WORD.findall(unicodedata.normalize("NFC", text).lower())


_WORD = re.compile(r"[^\W_]+")  # \w is letters, digits and "_" in any script: minus "_"


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure (Lin 2004 §3.1) on rouge_tokens' tokens.

    P = LCS / len(pred), R = LCS / len(ref), F = 2PR / (P + R): Lin's F_lcs with beta = 1,
    the F1 that rouge-score reports, and equal to it on ASCII text; as for exact match and
    token F1, two sides with no tokens score 1.0 (rouge-score: 0.0) and one such side 0.0.
    """
    _check_str(pred, ref)
    p, r = rouge_tokens(pred), rouge_tokens(ref)
    return _f_measure(_lcs_length(p, r), len(p), len(r))


METRICS = {"exact_match": exact_match, "f1": token_f1, "rouge_l": rouge_l}


def item_scores(preds: list[str], refs: list) -> dict[str, list[float]]:
    """Per-item exact_match, f1 and rouge_l: {metric: [score of item i]}, for confidence
    intervals over test items (minift.stats).

    Each ref is a string or a non-empty list of acceptable strings; with a list the
    prediction gets its best score over them (SQuAD's rule for multiple answers).
    """
    if not isinstance(preds, (list, tuple)) or not isinstance(refs, (list, tuple)):
        raise TypeError("preds and refs must be lists")
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} preds but {len(refs)} refs; they must pair up")
    if not preds:
        raise ValueError("preds and refs are empty; nothing to evaluate")
    refs = [[r] if isinstance(r, str) else r for r in refs]
    if any(not isinstance(r, (list, tuple)) or not r for r in refs):
        raise TypeError("each reference must be a string or a non-empty list of strings")
    return {name: [max(fn(p, r) for r in rs) for p, rs in zip(preds, refs)]
            for name, fn in METRICS.items()}


def score_means(scores: dict[str, list[float]]) -> dict:
    """Per-item scores {metric: [score of item i]} (each list as long, none empty) ->
    {metric: mean, ..., "n": the number of items}."""
    n = len(next(iter(scores.values())))
    return {**{name: sum(s) / n for name, s in scores.items()}, "n": n}


def task_metrics(preds: list[str], refs: list) -> dict:
    """Corpus means of exact_match, f1 and rouge_l (item_scores' means), in [0, 1], plus
    the count n."""
    return score_means(item_scores(preds, refs))
