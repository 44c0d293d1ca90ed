"""compare's ranking: intervals and significance recomputed from per-item scores, checked
against the plain bootstrap in minift.stats and by construction."""
import pytest

from minift.compare_report import (compare_columns, compare_markdown, compare_rows, plot_tradeoff,
                                   ranked, significant_differences)
from minift.stats import bootstrap_ci


def method(name, scores, trainable=10, change=1.0):
    return {"method": name, "trainable_params": trainable, "total_params": 1000, "lr": 1e-3,
            "after": {"val_loss": 1.0}, "train": {"seconds_per_step": 0.1, "rss_growth_mb": 5.0},
            "forgetting": {"change": change}, "item_scores": {"after": {"exact_match": scores}}}


@pytest.fixture
def summary():
    strong = [1.0] * 80 + [0.0] * 20          # 0.80
    close = [1.0] * 78 + [0.0] * 22           # 0.78: 2 items worse, not significant
    weak = [1.0] * 30 + [0.0] * 70            # 0.30: far worse on the same items
    return {"model": "m", "data_detail": "d", "eval_detail": "100 prompts", "reference": "r",
            "max_steps": 5, "batch_size": 4, "seed": 0, "threads": 1, "metric": "exact_match",
            "base": {"val_loss": 2.0, "reference_ppl": 10.0},
            "base_items": {"exact_match": [0.0] * 100},
            "methods": [method("lora", strong), method("full", close, 1000, 5.0),
                        method("prompt", weak, 1, 0.0), {"method": "adapter", "error": "boom"}]}


def test_best_and_significance_marks(summary):
    rank = ranked(summary)
    assert rank["best"] == "lora"
    assert rank["ci"]["lora"] == bootstrap_ci([1.0] * 80 + [0.0] * 20, seed=0)
    rows = {r["method"]: r for r in compare_rows(summary)}
    col = compare_columns(summary)[5]
    assert rows["lora"]["vs best"] == "best"
    assert rows["full"]["vs best"] == "="              # 0.02 apart: inside the interval
    assert rows["prompt"]["vs best"] == "-0.500"       # significant
    assert rows["lora"][col].startswith("0.800 [")
    assert rows["base model (no training)"][col] == "0.000 [0.00, 0.00]"
    assert rows["adapter"]["trainable"] == "failed: boom"


def test_significant_differences_name_each_pair_once(summary):
    lines = significant_differences(summary)
    assert lines[0].startswith("lora > prompt: +0.500 [")
    assert any(x.startswith("full > prompt: +0.480") for x in lines)
    assert not any("lora > full" in x or "full > lora" in x for x in lines)
    text = compare_markdown(summary)
    assert "## Significant differences" in text and "lora > prompt" in text


def test_tradeoff_plot_is_written(summary, tmp_path):
    pytest.importorskip("matplotlib")
    assert plot_tradeoff(summary, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000


def dpo_method(name, scores, margin=0.5):
    r = method(name, [], change=2.0)
    r |= {"objective": "dpo", "after": {"val_loss": 0.6, "reward_margin": margin,
                                        "reward_accuracy": sum(scores) / len(scores)},
          "item_scores": {"after": {"reward_accuracy": scores}}}
    return r


def test_a_dpo_row_has_reward_columns_and_no_rank_on_a_supervised_metric(summary):
    summary["methods"].append(dpo_method("lora-dpo", [1.0] * 60 + [0.0] * 40))
    assert ranked(summary)["best"] == "lora"           # the DPO row has no exact match
    assert "lora-dpo" not in ranked(summary)["ci"]
    assert not any("lora-dpo" in x for x in significant_differences(summary))
    cols = compare_columns(summary)
    assert cols[5].startswith("exact match") and cols[7:9] == ["reward acc", "reward margin"]
    rows = {r["method"]: r for r in compare_rows(summary)}
    d = rows["lora-dpo"]
    assert (d["val loss"], d[cols[5]], d["vs best"]) == ("-", "-", "-")
    assert (d["reward acc"], d["reward margin"], d["ref ppl change"]) == ("0.600", "0.500",
                                                                         "+2.000")
    assert rows["lora"]["reward acc"] == "-"
    assert rows["base model (no training)"]["reward acc"] == "-"
    assert "reward acc / reward margin (DPO rows only)" in compare_markdown(summary)


def test_dpo_rows_alone_are_ranked_by_reward_accuracy(summary):
    summary |= {"metric": "reward_accuracy", "base": {"reference_ppl": 10.0}, "base_items": {},
                "methods": [dpo_method("lora-dpo", [1.0] * 90 + [0.0] * 10),
                            dpo_method("full-dpo", [1.0] * 40 + [0.0] * 60)]}
    rows = {r["method"]: r for r in compare_rows(summary)}
    cols = compare_columns(summary)
    assert cols[5].startswith("reward acc [95% CI]") and "reward acc" not in cols[6:]
    assert rows["lora-dpo"]["vs best"] == "best" and rows["full-dpo"]["vs best"] == "-0.500"
    assert significant_differences(summary)[0].startswith("lora-dpo > full-dpo: +0.500")
