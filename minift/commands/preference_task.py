"""A DPO task's data and its before/after metrics (minift finetune --objective dpo), shared by
finetune and compare: the {"prompt", "chosen", "rejected"} pairs of --data or of a built-in
preference task (minift.tasks), and reward accuracy / margin on the validation pairs
(minift.preference) instead of generated answers."""
from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F

from ..data import train_val_split
from ..evaluate import perplexity
from ..options import VIRTUAL, UsageError
from ..preference import add_reference_logps, load_preferences, reward_margins
from ..tasks import get_task
from .taskdata import TaskData, context_length, reference_text


def load_preference_task(opts: dict, tok, n_positions: int) -> TaskData:
    """TaskData with preference examples for train and val (kind "dpo", no test prompts)."""
    builtin = opts["data"] is None
    task = get_task(opts["task"]) if builtin else None
    if builtin and task.kind != "dpo":
        raise UsageError(f"--objective dpo needs preference pairs: --task preference, or --data "
                         f"with {{\"prompt\", \"chosen\", \"rejected\"}} lines (--task {task.name} "
                         "has none)")
    n_virtual = opts["num_virtual_tokens"] if opts["method"] in VIRTUAL else 0
    context, block = context_length(n_positions, n_virtual)
    max_len = min(opts["max_length"] or context, context)
    train_path = task.path("train") if builtin else Path(opts["data"])
    val_path = Path(opts["val_data"]) if opts["val_data"] else (
        task.path("validation") if builtin else None)
    train = load_preferences(train_path, tok, max_len)
    if val_path is not None:
        val = load_preferences(val_path, tok, max_len)
        split = f"validation {len(val)} pairs ({val_path.name})"
    else:
        train, val = train_val_split(train, opts["val_fraction"], opts["seed"])
        split = f"validation {len(val)} pairs (a {opts['val_fraction']:g} split of it)"
    reference, ref_examples, ref_name = reference_text(opts, tok, max_len)
    name = f"the built-in task {task.name}" if builtin else str(train_path)
    return TaskData(train, val, [], reference, block, ref_examples, ref_name, max_len,
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
    if data.reference is not None:
        metrics["reference_ppl"] = perplexity(model, data.reference, tok, batch_size,
                                              data.reference_block)
    return metrics, [], items
