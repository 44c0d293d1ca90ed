"""A DPO task's data and its before/after metrics (minift finetune --objective dpo), shared by
finetune and compare: the {"prompt", "chosen", "rejected"} pairs of --data or of a built-in
preference task (minift.tasks), and reward accuracy / margin on the validation pairs
(minift.preference) instead of generated answers."""
from __future__ import annotations

import torch.nn.functional as F

from ..data import train_val_split
from ..formats import parse_fields
from ..options import UsageError
from ..preference import add_reference_logps, load_preferences, reward_margins
from .taskdata import TaskData, reference_metrics, reference_text, task_files


def load_preference_task(opts: dict, tok, n_positions: int) -> TaskData:
    """TaskData with preference examples for train and val (kind "dpo", no test prompts)."""
    files = task_files(opts, n_positions)
    task, max_len, train_path, val_path = files.task, files.max_len, files.train, files.val
    if task is not None and task.kind != "dpo":
        raise UsageError(f"--objective dpo needs preference pairs: --task preference, or --data "
                         f"with {{\"prompt\", \"chosen\", \"rejected\"}} lines (--task {task.name} "
                         "has none)")
    fields = parse_fields(opts["fields"]) if opts.get("fields") else None
    train = load_preferences(train_path, tok, max_len, fields)
    if val_path is not None:
        val = load_preferences(val_path, tok, max_len, fields)
        split = f"validation {len(val)} pairs ({val_path.name})"
    else:
        train, val = train_val_split(train, opts["val_fraction"], opts["seed"])
        split = f"validation {len(val)} pairs (a {opts['val_fraction']:g} split of it)"
    reference, ref_examples, ref_name = reference_text(opts, tok, max_len)
    name = f"the built-in task {task.name}" if task is not None else str(train_path)
    return TaskData(train, val, [], reference, files.block, ref_examples, ref_name, max_len,
                    f"{name}: train {len(train)} pairs, {split}",
                    f"reward accuracy on the {len(val)} validation pairs", kind="dpo")


def with_reference(model, data: TaskData, pad_token_id: int, batch_size: int) -> None:
    """Before training: the reference log-probabilities of every pair, from the model as it is
    (the base model: the adapter is not added yet), stored with the examples."""
    data.train = add_reference_logps(model, data.train, pad_token_id, batch_size)
    data.val = add_reference_logps(model, data.val, pad_token_id, batch_size)


def evaluate_preferences(model, tok, data: TaskData, batch_size: int, beta: float):
    """({val_loss (the DPO loss), reward_accuracy, reward_margin, n, reference_ppl}, no
    answers, per-pair scores) on the validation pairs; the shape evaluate_model returns."""
    margins = reward_margins(model, data.val, tok.eos_token_id, beta, batch_size)
    items = {"reward_accuracy": (margins > 0).double().tolist()}
    metrics = {"val_loss": -F.logsigmoid(margins).mean().item(),
               "reward_accuracy": sum(items["reward_accuracy"]) / len(margins),
               "reward_margin": margins.mean().item(), "n": len(margins)}
    return metrics | reference_metrics(model, tok, data, batch_size), [], items
