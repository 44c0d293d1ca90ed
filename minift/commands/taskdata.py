"""A fine-tuning task's data and its before/after metrics, shared by finetune and compare.

The task is --data (+ --val-data, --test-data) or a built-in one (minift.tasks, --task):
tokenised train and validation examples, the test records for the task metrics (greedy
answers scored by exact match / F1 / ROUGE-L, or, for a multiple-choice task, the
log-likelihood of each choice), and the reference text for forgetting and EWC."""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from pathlib import Path

from .. import chat
from ..data import DataError, eval_records, load_dataset, load_text, train_val_split
from ..distributed import evaluate_loss
from ..evaluate import choice_accuracy, generate_completions, perplexity
from ..formats import parse_fields
from ..metrics import item_scores, score_means
from ..options import VIRTUAL, UsageError
from ..tasks import REFERENCE, Task, get_task
from .common import jsonl_records

USER_MAX_NEW_TOKENS = 48   # answers to --data prompts: one line


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
    kind: str = "generate"     # "generate", "choice" (records with "choices", "label"), "dpo"
    max_new_tokens: int = USER_MAX_NEW_TOKENS
    stop_token_id: int | None = None  # generation stops here (None: eos; chat: end of turn)


def task_records(path: Path, tok, fields: dict | None) -> tuple[str, list[dict]]:
    """(the file's kind, its records for the task metrics): a JSONL file of prompt/completion
    lines gives its own lines (extra fields such as "choices" kept); other files and kinds
    (CSV, Parquet, instruction, chat: its last assistant turn) data.eval_records' pairs."""
    kind, pairs = eval_records(path, tok, fields)
    if kind == "completion" and not fields and path.suffix.lower() == ".jsonl":
        return kind, jsonl_records(path)
    return kind, pairs



class TaskFiles(typing.NamedTuple):
    task: Task | None          # the built-in task (None: --data)
    context: int               # longest example the context allows (virtual tokens taken off)
    block: int                 # reference perplexity block
    max_len: int               # longest example, --max-length within the context
    train: Path
    val: Path | None
    test: Path | None


def task_files(opts: dict, n_positions: int) -> TaskFiles:
    """The files of --data / --val-data / --test-data, or of the built-in --task, and the
    example lengths they are cut to (shared by load_task_data and preference_task.py)."""
    builtin = opts["data"] is None
    task = get_task(opts["task"]) if builtin else None
    n_virtual = opts["num_virtual_tokens"] if opts["method"] in VIRTUAL else 0
    context, block = context_length(n_positions, n_virtual)

    def given_or_split(flag: str, split: str) -> Path | None:
        return Path(opts[flag]) if opts[flag] else (task.path(split) if builtin else None)

    return TaskFiles(task, context, block, min(opts["max_length"] or context, context),
                     task.path("train") if builtin else Path(opts["data"]),
                     given_or_split("val_data", "validation"), given_or_split("test_data", "test"))


def load_task_data(opts: dict, tok, n_positions: int) -> TaskData:
    files = task_files(opts, n_positions)
    task, builtin = files.task, files.task is not None
    if builtin and task.kind == "dpo":
        raise UsageError(f"--task {task.name} holds preference pairs: train it with --objective "
                         "dpo")
    context, block, max_len = files.context, files.block, files.max_len
    train_path, val_path, test_path = files.train, files.val, files.test
    new_tokens = opts["max_new_tokens"] or (task.max_new_tokens if builtin else USER_MAX_NEW_TOKENS)

    fields = parse_fields(opts["fields"]) if opts.get("fields") else None

    def load(path):
        return load_dataset(path, tok, block_size=max_len, max_length=max_len, fields=fields)

    train_data = load(train_path)
    train_kind, lines = task_records(train_path, tok, fields)
    if train_kind == "preference":
        raise UsageError(f"{train_path} holds preference pairs {{\"prompt\", \"chosen\", "
                         "\"rejected\"}: train them with --objective dpo")
    if train_kind == "chat" and tok.chat_template is None:
        tok.chat_template = chat.BUILTIN_CHAT_TEMPLATE  # so the run's tokenizer carries it
    if val_path is not None:
        val, val_records = load(val_path), task_records(val_path, tok, fields)[1]
        split = f"validation {len(val)} ({val_path.name})"
    else:  # the same seeded split of the examples and of the lines they came from
        train_data, val = train_val_split(train_data, opts["val_fraction"], opts["seed"])
        val_records = train_val_split(lines, opts["val_fraction"], opts["seed"])[1] if lines else []
        split = f"validation {len(val)} (a {opts['val_fraction']:g} split of it)"
    if test_path is not None:
        load(test_path)  # checks every line
        records, where = task_records(test_path, tok, fields)[1], f"test ({test_path.name})"
    else:
        records, where = val_records, "validation"
    records = [r for r in records if "prompt" in r]
    n_all = len(records)
    room = context - new_tokens  # the answer must fit in the context too
    # an empty prompt trains (its completion is the example) but has no token to continue from
    records = [r for r in records if 0 < len(tok.encode(r["prompt"])) <= room][:opts["eval_samples"]]
    eval_detail = (f"the first {len(records)} of {n_all} {where} prompts" if records else
                   "no usable prompts (none, or all empty or too long for the context)")

    reference, ref_examples, ref_name = reference_text(opts, tok, max_len)
    name = f"the built-in task {task.name}" if builtin else str(train_path)
    kind = "choice" if records and all("choices" in r and "label" in r for r in records) \
        else "generate"
    return TaskData(train_data, val, records, reference, block, ref_examples, ref_name, max_len,
                    f"{name}: train {len(train_data)}, {split}", eval_detail, kind, new_tokens,
                    stop_token_id=chat.end_of_turn_id(tok) if train_kind == "chat" else None)


def read_reference(path: Path, tok) -> str:
    """The text --forgetting scores (finetune's and eval's --reference), checked before any
    evaluation runs: perplexity needs a next token to score (a text over 1000 characters has
    more than one token)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such reference text file") from None
    if len(tok.encode(text[:1000])) < 2:
        raise DataError(f"{path}: the reference text has fewer than 2 tokens, too few for a "
                        "perplexity; give a longer --reference, or turn --forgetting off")
    return text


def reference_text(opts: dict, tok, max_len: int):
    """(text for forgetting or None, its max_len blocks for EWC or None, its name)."""
    ref_path = Path(opts["reference"]) if opts["reference"] else REFERENCE
    reference = ref_examples = ref_name = None
    if opts["forgetting"]:
        reference = read_reference(ref_path, tok)
        ref_name = str(ref_path) if opts["reference"] else "the built-in reference.txt"
    if opts["ewc_lambda"] > 0:
        ref_examples = load_text(ref_path, tok, max_len)
    return reference, ref_examples, ref_name


def evaluate_model(model, tok, data: TaskData, batch_size: int):
    """({val_loss, val_ppl, task metric means, n, reference_ppl}, answers, per-item scores).

    A generation task scores greedy answers (exact_match, f1, rouge_l); a choice task the
    choice of highest log-likelihood (accuracy, from choice_accuracy), its answers being the chosen texts.
    The per-item scores {metric: [score of test item i]} feed compare's intervals."""
    val_loss = evaluate_loss(model, data.val, batch_size)
    metrics = {"val_loss": val_loss, "val_ppl": math.exp(val_loss)}
    preds, items = [], {}
    if data.records and data.kind == "choice":
        got = choice_accuracy(model, tok, [{"context": r["prompt"], "choices": r["choices"],
                                            "label": r["label"]} for r in data.records],
                              batch_size=batch_size)
        preds = [r["choices"][p] for r, p in zip(data.records, got["predictions"])]
        items = {"accuracy": got["correct"]}
    elif data.records:
        preds = generate_completions(model, tok, [r["prompt"] for r in data.records],
                                     data.max_new_tokens, batch_size,
                                     eos_token_id=data.stop_token_id)
        items = item_scores(preds, [r["completion"] for r in data.records])
    if items:
        metrics.update(score_means(items))  # the means and n, as task_metrics gives them
    return metrics | reference_metrics(model, tok, data, batch_size), preds, items


def reference_metrics(model, tok, data: TaskData, batch_size: int) -> dict:
    """{"reference_ppl": perplexity on the forgetting text}, or {} when the task has none;
    every "before" and "after" (supervised, DPO, compare's base model) measures it here."""
    if data.reference is None:
        return {}
    return {"reference_ppl": perplexity(model, data.reference, tok, batch_size,
                                        data.reference_block)}
