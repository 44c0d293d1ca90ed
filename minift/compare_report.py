"""The report of `minift compare`: one row per method with a 95% interval on the task metric,
which differences are significant, and the trade-off figure.

The summary `commands/compare.py` writes to report.json holds, per method, its finetune
report.json (with "item_scores": the per-test-item scores of the task metric), so every
number here is recomputed from saved scores: the intervals are bootstrap intervals over the
test items and the differences paired bootstraps over the same items (minift.stats).
DPO rows ("objective": "dpo") train on preference pairs: they add reward accuracy and margin
on the validation pairs, and have no ranked metric unless it is reward accuracy.
"""
from __future__ import annotations

from pathlib import Path

from .report import _share, fmt, markdown_table
from .stats import bootstrap_ci, paired_bootstrap, significant_pairs

METRIC_LABELS = {"exact_match": "exact match", "accuracy": "choice acc",
                 "rouge_l": "ROUGE-L", "f1": "token F1", "reward_accuracy": "reward acc"}


def _items(r: dict, metric: str) -> list[float] | None:
    return ((r.get("item_scores") or {}).get("after") or {}).get(metric)


def ranked(s: dict) -> dict:
    """{"best": method, "vs_best": {method: paired bootstrap against the best}, "ci": {method:
    interval}} for the methods that have per-item scores of s["metric"]."""
    metric, seed = s["metric"], s.get("seed", 0)
    scored = {r["method"]: _items(r, metric) for r in s["methods"] if not r.get("error")}
    scored = {m: v for m, v in scored.items() if v}
    if not scored:
        return {"best": None, "vs_best": {}, "ci": {}}
    ci = {m: bootstrap_ci(v, seed=seed) for m, v in scored.items()}
    best = max(ci, key=lambda m: ci[m]["mean"])
    vs = {m: paired_bootstrap(scored[m], scored[best], seed=seed) for m in scored if m != best}
    return {"best": best, "vs_best": vs, "ci": ci}


def _interval(ci: dict | None) -> str:
    return "-" if not ci else f"{ci['mean']:.3f} [{ci['low']:.2f}, {ci['high']:.2f}]"


def _dpo(s: dict) -> list[str]:
    return [r["method"] for r in s["methods"] if r.get("objective") == "dpo"]


def compare_columns(s: dict) -> list[str]:
    label = METRIC_LABELS.get(s["metric"], s["metric"])
    reward = [] if not _dpo(s) else ["reward margin"] if s["metric"] == "reward_accuracy" else [
        "reward acc", "reward margin"]   # the ranked column is reward accuracy already
    return ["method", "trainable", "share", "lr", "val loss", f"{label} [95% CI]", "vs best",
            *reward, "ref ppl change", "s/step", "peak MB"]


def compare_rows(s: dict) -> list[dict]:
    """One table row per method (and the base model first), values formatted. "vs best":
    "best", "=" (not significantly different from the best), or the significant difference;
    "-" where a row has no scores of the ranked metric (a DPO row on a supervised task)."""
    cols, rank = compare_columns(s), ranked(s)
    metric_col = cols[5]
    rewards = {c: "-" for c in ("reward acc", "reward margin") if c in cols}
    rows = []
    base = s.get("base")
    if base:
        base_items = (s.get("base_items") or {}).get(s["metric"])
        rows.append({"method": "base model (no training)", "trainable": "0", "share": "0%",
                     "lr": "-", "val loss": fmt(base.get("val_loss")),
                     metric_col: _interval(bootstrap_ci(base_items) if base_items else None),
                     "vs best": "-", **rewards, "ref ppl change": "-", "s/step": "-",
                     "peak MB": "-"})
    for r in s["methods"]:
        m = r["method"]
        if r.get("error"):
            rows.append({"method": m, "trainable": f"failed: {r['error']}"})
            continue
        a, t = r["after"], r["train"]
        change = (r.get("forgetting") or {}).get("change")
        vs = rank["vs_best"].get(m)
        mark = "best" if m == rank["best"] else "-" if vs is None else (
            f"{vs['diff']:+.3f}" if vs["significant"] else "=")
        dpo = r.get("objective") == "dpo"   # its val_loss is the DPO loss: not comparable
        reward = {c: fmt(a.get(k), 3) if dpo else "-" for c, k in (
            ("reward acc", "reward_accuracy"), ("reward margin", "reward_margin")) if c in cols}
        rows.append({"method": m, "trainable": fmt(r["trainable_params"]),
                     "share": _share(r["trainable_params"], r["total_params"]),
                     "lr": f"{r['lr']:g}", "val loss": "-" if dpo else fmt(a.get("val_loss")),
                     metric_col: _interval(rank["ci"].get(m)), "vs best": mark, **reward,
                     "ref ppl change": "-" if change is None else f"{change:+.3f}",
                     "s/step": fmt(t.get("seconds_per_step"), 3),
                     "peak MB": fmt(t.get("rss_growth_mb"), 1)})
    return rows


def significant_differences(s: dict) -> list[str]:
    """Lines naming every pair of methods whose paired-bootstrap interval excludes 0."""
    scored = {r["method"]: _items(r, s["metric"]) for r in s["methods"] if not r.get("error")}
    out = []
    for res in significant_pairs({m: v for m, v in scored.items() if v}, seed=s.get("seed", 0)):
        if res["significant"]:
            hi, lo = (res["a"], res["b"]) if res["diff"] > 0 else (res["b"], res["a"])
            low, high = sorted((abs(res["low"]), abs(res["high"])))  # both of one sign
            out.append(f"{hi} > {lo}: {abs(res['diff']):+.3f} [{low:.3f}, {high:.3f}]")
    return out


def plot_tradeoff(s: dict, path: Path) -> bool:
    """tradeoff.png: the task metric (with its 95% interval) against the trainable share
    (log scale) and against forgetting, one labelled point per method. False without
    matplotlib (an optional extra)."""
    try:
        from matplotlib.figure import Figure   # no pyplot: no global backend or figure state
    except ImportError:
        return False
    rank = ranked(s)
    rows = [r for r in s["methods"] if r["method"] in rank["ci"]]
    if not rows:
        return False
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    label = METRIC_LABELS.get(s["metric"], s["metric"])
    for ax, xlabel, x_of in (
            (axes[0], "trainable share of parameters (%)",
             lambda r: 100 * r["trainable_params"] / r["total_params"]),
            (axes[1], "forgetting: reference perplexity change",
             lambda r: (r.get("forgetting") or {}).get("change", float("nan")))):
        for r in rows:
            ci, x = rank["ci"][r["method"]], x_of(r)
            ax.errorbar([x], [ci["mean"]], yerr=[[ci["mean"] - ci["low"]], [ci["high"] - ci["mean"]]],
                        fmt="o", capsize=3)
            ax.annotate(r["method"], (x, ci["mean"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    axes[0].set_ylabel(f"{label} (95% CI)")
    fig.suptitle(f"minift compare: {s['max_steps']} steps per method")
    fig.savefig(path, dpi=100)
    return True


def _dpo_sentence(s: dict) -> list[str]:
    dpo = _dpo(s)
    if not dpo:
        return []
    return [f"The DPO rows ({', '.join(dpo)}) optimise the DPO loss instead, with the same "
            f"budget (a step's examples are pairs), on {s.get('dpo_data_detail', 'pairs')}.", ""]


def _dpo_notes(s: dict) -> list[str]:
    if not _dpo(s):
        return []
    where = s.get("dpo_eval_detail", "the validation pairs")
    return [f"- reward acc / reward margin (DPO rows only): {where}, the share of pairs whose "
            "chosen completion gets the higher implicit reward beta * log(policy / reference), "
            "and the mean difference of the two rewards; the base model is the reference, so "
            "its margin is 0 by definition (`-`)",
            "- val loss is `-` for DPO rows: their validation loss is the DPO loss, not the "
            "next-token loss of the other rows; they are not in loss_curves.png either"]


def compare_markdown(s: dict) -> str:
    """report.md of `minift compare`, from the summary commands/compare.py writes."""
    cols = compare_columns(s)
    sig = significant_differences(s)
    lines = ["# minift compare", "",
             f"Every method fine-tunes {s['model']} on {s['data_detail']} for {s['max_steps']} "
             f"optimizer steps of {s['batch_size']} examples (seed {s['seed']}), each with its "
             "own learning rate (column lr). Each method runs in its own process"
             + (f", with {s['threads']} CPU thread{'s' if s['threads'] != 1 else ''}."
                if s.get("threads") else "."), "",
             *_dpo_sentence(s),
             markdown_table(compare_rows(s), cols, right=tuple(cols[1:])), "",
             f"- {cols[5]}: the task metric on {s['eval_detail']}, with a 95% bootstrap "
             "interval over those items (2,000 resamples)",
             "- vs best: the paired-bootstrap difference to the best method on the same items "
             "when it is significant at 95%, `=` when it is not, `-` for a row without that "
             "metric",
             *_dpo_notes(s),
             "- trainable / share: parameters updated by the optimizer, and their share of all "
             "parameters (the adapter's included)",
             "- val loss: mean next-token loss per target token on the validation set, after "
             "training (with restore_best: the best evaluation's weights)",
             f"- ref ppl change: perplexity on {s['reference'] or '(no reference)'} after "
             f"training minus before ({fmt((s.get('base') or {}).get('reference_ppl'))}); "
             "positive means forgetting",
             "- s/step: median wall time of an optimizer step",
             "- peak MB: growth of the process's resident memory during training (peak RSS "
             "minus RSS when train() started); for a model this small, allocator arenas and "
             "autograd's one-off buffers dominate it", "",
             "## Significant differences (paired bootstrap, 95%)", ""]
    lines += [f"- {x}" for x in sig] or ["- none: no pair of methods can be told apart on "
                                         "these items"]
    lines += [""]
    for key, title in (("tradeoff_plot", "trade-off"), ("plot", "loss curves")):
        if s.get(key):
            lines += [f"![{title}]({s[key]})", ""]
    lines += ["Per-method run folders (config, metrics, report, log.txt): "
              + ", ".join(f"`{r['method']}/`" for r in s["methods"]), ""]
    return "\n".join(lines)
