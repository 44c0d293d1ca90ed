"""Run reports: what a run measures, its Markdown and JSON summaries, and loss plots.

`minift finetune` (commands/finetune.py) times training with `StepTimer` and `MemoryProbe`,
builds a summary dict for each run and hands it here:

    finetune_markdown(summary)  -> report.md of one run: before/after metrics, samples
    (compare's report.md: minift.compare_report)
    plot_losses(curves, path)   -> loss.png / loss_curves.png (needs matplotlib)

`read_metrics` reads a run's metrics.jsonl (written by train.py), so the plots work on
any run folder. matplotlib is optional (the `plot` extra) and imported only inside
`plot_losses`, which draws on a `matplotlib.figure.Figure` directly: no pyplot, so no
global backend or figure state is touched.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


# ----------------------------------------------------------------------------- measurements
class StepTimer:
    """A train() callback: wall time between consecutive optimizer steps."""

    def __init__(self):
        self.last, self.intervals = None, []

    def __call__(self, record: dict) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.intervals.append(now - self.last)
        self.last = now

    def median(self) -> float | None:
        s = sorted(self.intervals)
        return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2 if s else None


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryProbe:
    """Peak resident memory (RSS) of this process during a `with` block, and its growth over
    the RSS at the start: what the block added (gradients, optimizer state, activations,
    allocator caches), not what was already loaded (the model, the data).

    Linux resets the kernel's peak (VmHWM) at the start through /proc/self/clear_refs, so
    the peak is the block's own. Elsewhere the peak is the whole process's (ru_maxrss) and
    the growth is unknown (None); on Windows both are None.
    """

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.start_kb = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        try:
            import resource  # Unix only
        except ImportError:
            self.peak_kb = None
            return False
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        self.peak_kb = peak / 1024 if sys.platform == "darwin" else peak  # bytes on macOS
        return False

    @property
    def peak_mb(self) -> float | None:
        return None if self.peak_kb is None else self.peak_kb / 1024

    @property
    def growth_mb(self) -> float | None:
        if self.start_kb is None or self.peak_kb is None:
            return None
        return max(self.peak_kb - self.start_kb, 0) / 1024


# ----------------------------------------------------------------------------- files
def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a crash is skipped."""
    records = []
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def loss_curves(records: list[dict], val_loss_at_0: float | None = None) -> dict[str, list]:
    """metrics.jsonl records -> {"train_steps", "train_loss", "val_steps", "val_loss"}.

    train.py logs the mean training loss of the last `log_every` steps ("train" events)
    and the validation loss of each evaluation ("eval" events); val_loss_at_0, the base
    model's, starts the validation curve at step 0.
    """
    train = [r for r in records if r.get("event") == "train"]
    evals = [(r["step"], r["val_loss"]) for r in records if r.get("event") == "eval"]
    if val_loss_at_0 is not None:
        evals.insert(0, (0, val_loss_at_0))
    return {"train_steps": [r["step"] for r in train], "train_loss": [r["loss"] for r in train],
            "val_steps": [s for s, _ in evals], "val_loss": [v for _, v in evals]}


# ----------------------------------------------------------------------------- plots
def plot_losses(curves: dict[str, dict], path: Path, title: str = "") -> bool:
    """One figure, two panels: training loss and validation loss against the step, one
    line per entry of `curves` ({label: loss_curves(...)}). Returns False, writing
    nothing, when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_train, ax_val = fig.subplots(1, 2)
    for label, c in curves.items():
        line, = ax_train.plot(c["train_steps"], c["train_loss"], label=label, linewidth=1.2)
        ax_val.plot(c["val_steps"], c["val_loss"], marker="o", markersize=3,
                    color=line.get_color(), label=label, linewidth=1.2)
    for ax, name in ((ax_train, "training loss"), (ax_val, "validation loss")):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(name + " (nats per target token)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    if len(curves) > 1:
        try:  # beside the panels (matplotlib >= 3.7), else inside
            fig.legend(*ax_val.get_legend_handles_labels(), loc="outside right upper",
                       fontsize="small")
        except ValueError:
            ax_val.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return True


# ----------------------------------------------------------------------------- markdown
def fmt(value, digits: int = 4) -> str:
    """A cell: floats with `digits` decimals, ints with thousands separators, None as "-"."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,d}"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _md_cell(text: str) -> str:
    """Keep a cell on one row: escape the column bar, show line breaks as \\n."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", "\\n")


def markdown_table(rows: list[dict], columns: list[str] | None = None,
                   right: tuple[str, ...] = ()) -> str:
    """A GitHub Markdown table of `rows` (dicts of already formatted strings or values);
    `right` names the columns to right-align (numbers)."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    head = "| " + " | ".join(_md_cell(c) for c in columns) + " |"
    rule = "|" + "|".join("---:" if c in right else "---" for c in columns) + "|"
    body = ["| " + " | ".join(_md_cell(fmt(r.get(c))) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


METRIC_NAMES = {  # key in an evaluation dict -> how a report names it
    "val_loss": "validation loss (nats/token)",
    "val_ppl": "validation perplexity",
    "exact_match": "exact match",
    "f1": "token F1",
    "rouge_l": "ROUGE-L",
    "accuracy": "choice accuracy",
    "reward_accuracy": "reward accuracy (DPO)",
    "reward_margin": "reward margin (DPO)",
    "reference_ppl": "reference perplexity",
}


def metrics_rows(before: dict | None, after: dict) -> list[dict]:
    """[{metric, before, after, change}] for the metrics either evaluation has."""
    rows = []
    dpo = "reward_accuracy" in after   # a DPO run's val_loss is its DPO loss, a mean over pairs
    for key, name in METRIC_NAMES.items():
        if key == "val_loss" and dpo:
            name = "validation DPO loss (per pair)"
        a = after.get(key)
        b = before.get(key) if before else None
        if a is None and b is None:
            continue
        change = a - b if isinstance(a, float) and isinstance(b, float) else None
        rows.append({"metric": name, "before": b, "after": a, "change": change})
    return rows


def _share(trainable: int, total: int) -> str:
    return f"{100 * trainable / total:.3g}%" if total else "-"


def finetune_markdown(s: dict) -> str:
    """report.md of one `minift finetune` run, from the summary commands/finetune.py writes to report.json."""
    t = s["train"]
    facts = [
        ("method", s["method_detail"]),
        ("data", s["data_detail"]),
        ("trainable parameters", f"{s['trainable_params']:,d} of {s['total_params']:,d} "
                                 f"({_share(s['trainable_params'], s['total_params'])})"),
        ("steps", f"{t['steps']}, learning rate {s['lr']:g} (stopped: {t['stopped'] or '-'}; "
                  f"best validation loss {fmt(t['best_val_loss'])} at step {fmt(t['best_step'])})"),
        ("training time", f"{t['seconds']:.1f} s, median {fmt(t['seconds_per_step'], 3)} s/step"),
        ("peak memory", f"{fmt(t['rss_growth_mb'], 1)} MB resident-memory growth during training "
                        f"(peak RSS {fmt(t['peak_rss_mb'], 1)} MB)"),
    ]
    lines = [f"# minift finetune: {s['method']} on {s['model']}", "",
             *(f"- **{k}**: {v}" for k, v in facts), "",
             "## Before and after fine-tuning", "",
             f"Task metrics: greedy answers to {s['eval_detail']}, cut at the first line break "
             "and scored against the reference completion (SQuAD normalisation: case, "
             "punctuation and articles ignored)."]
    if s.get("reference"):
        lines[-1] += (f" Reference perplexity: {s['reference']}, in blocks of "
                      f"{s['reference_block']} tokens; a rise means forgetting.")
    lines += ["", markdown_table(metrics_rows(s.get("before"), s["after"]),
                                 right=("before", "after", "change")), ""]
    if s.get("forgetting"):
        f = s["forgetting"]
        lines += [f"Forgetting: reference perplexity {f['before']:.4f} -> {f['after']:.4f} "
                  f"(change {f['change']:+.4f}, ratio {f['ratio']:.4f}).", ""]
    if s.get("samples"):
        short = [{k: _clip(v, 100) or "(empty)" for k, v in r.items()} for r in s["samples"]]
        lines += ["## Samples", "", markdown_table(short), ""]
    lines += ["## Files", "",
              "- `config.json`: every option of this run (`minift finetune --config "
              "config.json` repeats it; `--resume` continues it)",
              "- `metrics.jsonl`: training and validation losses, written by train()",
              f"- `{s['artifact']}/`: " + ("the adapter in PEFT's format, with the tokenizer"
                                           if s["artifact"] == "adapter" else
                                           "the fine-tuned model, a Hugging Face folder with "
                                           "the tokenizer"),
              "- `checkpoints/`, `best/`, `run.json`: the training loop's state, for --resume",
              "- `report.json`: the numbers of this report"]
    if s.get("plot"):
        lines += ["", f"![losses]({s['plot']})"]
    return "\n".join(lines) + "\n"
