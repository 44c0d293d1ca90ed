"""A fine-tuning task's data and its before/after metrics, shared by finetune and compare.

The task is --data (+ --val-data, --test-data) or the built-in one (assets/task/): tokenised
train and validation examples, the {"prompt", "completion"} records for the task metrics,
and the reference text for forgetting and EWC."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..data import load_dataset, load_text, train_val_split
from ..distributed import evaluate_loss
from ..evaluate import generate_completions, perplexity, task_metrics
from ..options import VIRTUAL
from .common import TASK, jsonl_records


def context_length(n_positions: int, n_virtual: int) -> tuple[int, int]:
    """(longest example, reference perplexity block) for a model of n_positions context whose
    adapter puts n_virtual tokens in front. The reference text is scored in blocks of half
    the context (128 tokens for minift-tiny) whatever the method, so that virtual tokens fit
    and every method's perplexity compares with the base model's."""
    context = n_positions - n_virtual
    if context < 2:
        raise ValueError(f"{n_virtual} virtual tokens leave no room in the model's context "
                         f"n_positions={n_positions}")
    return context, min(n_positions // 2, context)


@dataclass
class TaskData:
    train: list                # tokenised examples
    val: list
    records: list[dict]        # {"prompt", "completion"} for the task metrics (may be empty)
    reference: str | None      # text for forgetting (None: off)
    reference_block: int       # ... scored in non-overlapping blocks of this many tokens
    reference_examples: list | None  # ... in max_length blocks, for EWC's Fisher
    reference_name: str | None
    max_length: int            # longest example, in tokens
    detail: str                # for the reports
    eval_detail: str



def load_task_data(opts: dict, tok, n_positions: int) -> TaskData:
    builtin = opts["data"] is None
    n_virtual = opts["num_virtual_tokens"] if opts["method"] in VIRTUAL else 0
    context, block = context_length(n_positions, n_virtual)
    max_len = min(opts["max_length"] or context, context)
    train_path = TASK / "train.jsonl" if builtin else Path(opts["data"])
    val_path = Path(opts["val_data"]) if opts["val_data"] else (
        TASK / "validation.jsonl" if builtin else None)
    test_path = Path(opts["test_data"]) if opts["test_data"] else (
        TASK / "test.jsonl" if builtin else None)

    def load(path):
        return load_dataset(path, tok, block_size=max_len, max_length=max_len)

    train_data = load(train_path)
    if val_path is not None:
        val, val_records = load(val_path), jsonl_records(val_path)
        split = f"validation {len(val)} ({val_path.name})"
    else:  # the same seeded split of the examples and of the lines they came from
        train_data, val = train_val_split(train_data, opts["val_fraction"], opts["seed"])
        lines = jsonl_records(train_path)
        val_records = train_val_split(lines, opts["val_fraction"], opts["seed"])[1] if lines else []
        split = f"validation {len(val)} (a {opts['val_fraction']:g} split of it)"
    if test_path is not None:
        load(test_path)  # checks every line
        records, where = jsonl_records(test_path), f"test ({test_path.name})"
    else:
        records, where = val_records, "validation"
    records = [r for r in records if "prompt" in r]
    n_all = len(records)
    room = context - opts["max_new_tokens"]  # the answer must fit in the context too
    records = [r for r in records if len(tok.encode(r["prompt"])) <= room][:opts["eval_samples"]]
    eval_detail = (f"the first {len(records)} of {n_all} {where} prompts" if records else
                   "no prompts (the data has no {\"prompt\", \"completion\"} lines)")

    ref_path = Path(opts["reference"]) if opts["reference"] else TASK / "reference.txt"
    reference = ref_examples = ref_name = None
    if opts["forgetting"]:
        try:
            reference = ref_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"{ref_path}: no such reference text file") from None
        ref_name = str(ref_path) if opts["reference"] else "the built-in reference.txt"
    if opts["ewc_lambda"] > 0:
        ref_examples = load_text(ref_path, tok, max_len)
    name = "the built-in task" if builtin else str(train_path)
    return TaskData(train_data, val, records, reference, block, ref_examples, ref_name, max_len,
                    f"{name}: train {len(train_data)}, {split}", eval_detail)


def evaluate_model(model, tok, data: TaskData, batch_size: int, max_new_tokens: int):
    """({val_loss, val_ppl, exact_match, f1, rouge_l, n, reference_ppl}, greedy answers)."""
    val_loss = evaluate_loss(model, data.val, batch_size)
    metrics = {"val_loss": val_loss, "val_ppl": math.exp(val_loss)}
    preds = []
    if data.records:
        preds = generate_completions(model, tok, [r["prompt"] for r in data.records],
                                     max_new_tokens, batch_size)
        metrics.update(task_metrics(preds, [r["completion"] for r in data.records]))
    if data.reference is not None:
        metrics["reference_ppl"] = perplexity(model, data.reference, tok, batch_size,
                                              data.reference_block)
    return metrics, preds
