"""minift.metrics: exact match, token F1 and ROUGE-L against hand-computed values, and
ROUGE-L against the rouge-score package."""
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minift.metrics import exact_match, normalize_tokens, rouge_l, rouge_tokens, task_metrics, token_f1


def test_normalisation_is_squad_with_unicode_punctuation():
    assert normalize_tokens("The Cat's  HAT, a (big) one!") == ["cats", "hat", "big", "one"]
    assert normalize_tokens("北京是首都。") == ["北京是首都"]  # no segmentation of CJK
    assert normalize_tokens("¿Qué tal? «Très» bien…") == ["qué", "tal", "très", "bien"]
    assert normalize_tokens("cafe\u0301 🍕!") == ["café", "🍕"]      # NFC; emoji kept
    assert normalize_tokens("An the a") == []


@pytest.mark.parametrize("pred, ref, em, f1, rl", [
    # identical after SQuAD's normalisation; ROUGE keeps "the": P = 1/2, R = 1
    ("The Cat!", "cat", 1.0, 1.0, 2 / 3),
    # SQuAD: pred [cat, sat, on, mat], ref [cat, on, mat]: overlap 3, P = 3/4, R = 1;
    # ROUGE, articles kept: LCS "cat on mat" = 3 of 6 and 5 tokens, P = 1/2, R = 3/5
    ("the cat sat on the mat", "a cat on a mat", 0.0, 6 / 7, 6 / 11),
    # same bag of words, reversed order: F1 = 1 but the LCS is one token, P = R = 1/3
    ("mat on cat", "cat on mat", 0.0, 1.0, 1 / 3),
    # repeated tokens count min(3, 1) = 1: P = 1/3, R = 1/2, F1 = 2/5; LCS also 1
    ("go go go", "go home", 0.0, 0.4, 0.4),
    # empty strings: both empty -> 1, one empty -> 0; "The." normalises to empty for
    # SQuAD, but is the token "the" for ROUGE
    ("", "", 1.0, 1.0, 1.0),
    ("", "cat", 0.0, 0.0, 0.0),
    ("cat", "", 0.0, 0.0, 0.0),
    ("The.", "", 1.0, 1.0, 0.0),
    # unicode: accents composed or not, CJK punctuation, emoji as tokens
    ("Café", "cafe\u0301", 1.0, 1.0, 1.0),
    ("élève très sérieux", "élève sérieux", 0.0, 0.8, 0.8),   # P = 2/3, R = 1
    ("北京是首都。", "北京是首都", 1.0, 1.0, 1.0),
    ("北京 是 首都", "北京", 0.0, 0.5, 0.5),                     # P = 1/3, R = 1
    ("北京是首都", "北京", 0.0, 0.0, 0.0),                       # one unsegmented token
    # emoji are tokens for SQuAD, separators for ROUGE (as in rouge-score)
    ("I love 🍕!", "i love 🍕", 1.0, 1.0, 1.0),
    ("I love 🍕", "I love 🍔", 0.0, 2 / 3, 1.0),
])
def test_metrics_equal_hand_computed_values(pred, ref, em, f1, rl):
    assert exact_match(pred, ref) == em
    assert token_f1(pred, ref) == pytest.approx(f1, abs=1e-12)
    assert rouge_l(pred, ref) == pytest.approx(rl, abs=1e-12)


def test_rouge_tokens_split_at_everything_but_letters_and_digits():
    assert rouge_tokens("Put_nowait(item=None) -> 'don't'") == [
        "put", "nowait", "item", "none", "don", "t"]
    assert rouge_tokens("Élève, cafe\u0301 北京是首都。🍕 x2") == ["élève", "café", "北京是首都", "x2"]
    assert rouge_tokens("... -- !") == []


# ASCII text with the separators a model writes: words, identifiers, punctuation, digits
_ASCII_TEXT = st.lists(st.one_of(
    st.sampled_from(["the", "a", "Return", "item", "queue", "put_nowait", "x2", "None"]),
    st.text(alphabet=string.ascii_letters + string.digits + string.punctuation + " \t\n",
            max_size=8)), max_size=12).map(" ".join)


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(pred=_ASCII_TEXT, ref=_ASCII_TEXT)
def test_rouge_l_equals_the_rouge_score_package_on_ascii_text(pred, ref):
    from rouge_score.rouge_scorer import RougeScorer
    want = RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure   # (target, prediction)
    if not rouge_tokens(pred) and not rouge_tokens(ref):
        assert rouge_l(pred, ref) == 1.0 and want == 0.0   # the one documented difference
    else:
        assert rouge_l(pred, ref) == pytest.approx(want, abs=1e-12)


def test_rouge_l_is_the_longest_common_subsequence_not_substring():
    # pred [w, x, y, z], ref [w, q, y, z, r]: LCS "w y z" = 3 (not contiguous); P = 3/4, R = 3/5
    assert rouge_l("w x y z", "w q y z r") == pytest.approx(2 * 0.75 * 0.6 / 1.35, abs=1e-12)


def test_task_metrics_are_means_and_take_the_best_reference():
    preds = ["the cat sat on the mat", "", "Paris"]
    refs = ["a cat on a mat", "cat", ["London", "paris!"]]
    got = task_metrics(preds, refs)
    # per pair (em, f1, rouge): (0, 6/7, 6/11), (0, 0, 0), best of (0,0,0) and (1,1,1)
    assert got["n"] == 3
    assert got["exact_match"] == pytest.approx(1 / 3, abs=1e-12)
    assert got["f1"] == pytest.approx((6 / 7 + 1) / 3, abs=1e-12)
    assert got["rouge_l"] == pytest.approx((6 / 11 + 1) / 3, abs=1e-12)


def test_task_metrics_bad_inputs():
    with pytest.raises(ValueError, match="2 preds but 1 refs"):
        task_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        task_metrics([], [])
    with pytest.raises(TypeError, match="non-empty list of strings"):
        task_metrics(["a"], [[]])
    with pytest.raises(TypeError, match="compare strings"):
        task_metrics([None], ["a"])
    with pytest.raises(TypeError, match="must be lists"):
        task_metrics("abc", "abc")
