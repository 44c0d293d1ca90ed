"""What train() optimises: one object per TrainConfig.objective, so the loop and the step call
the same six methods whatever the objective.

  check(data, what, vocab_size)   the examples have this objective's shape
  prepare(model, data, config)    once, before training (DPO: the reference log-probs)
  collate(examples, config, T)    examples -> one batch on the CPU
  count(batch)                    the units the step's loss is a mean over
  loss(model, batch)              the batch's mean loss over those units (differentiable)
  evaluate(model, data, ...)      (val_loss, other metrics) on held-out examples

"sft": next-token cross-entropy, a mean over target tokens (step.py normalises accumulation
by the step's target tokens). "dpo": the sigmoid DPO loss (preference.py), a mean over the
step's preference pairs, normalised the same way over pairs.
"""
from __future__ import annotations

import operator

from .data import collate
from .distributed import count_targets, evaluate_loss
from .formats import IGNORE_INDEX, DataError
from .packing import collate_packed
from .preference import (add_reference_logps, collate_preferences, dpo_batch_loss,
                         preference_metrics)


def _int_list(seq, where: str, key: str) -> list[int]:
    """seq as a list of ints: Python ints, or numpy / 0-d torch integers (operator.index
    takes exactly the integer types; a float, str or nested list would reach torch or the
    comparisons below as a TypeError naming no example)."""
    if isinstance(seq, (str, bytes, dict)) or not hasattr(seq, "__len__"):
        raise DataError(f"{where}: {key} must be a list of integer token ids, got "
                        f"{type(seq).__name__}")
    if set(map(type, seq)) <= {int}:   # the common case, checked at C speed
        return seq
    ids = []
    for t in seq:
        try:
            ids.append(operator.index(t))
        except TypeError:
            raise DataError(f"{where}: {key} must be a list of integer token ids, got an "
                            f"element {t!r}") from None
    return ids


def _check_ids(ex: dict, ids_key: str, labels_key: str, where: str, vocab_size) -> None:
    ids = _int_list(ex[ids_key], where, ids_key)
    labels = _int_list(ex[labels_key], where, labels_key) if labels_key in ex else ids
    if len(ids) == 0 or len(labels) != len(ids):
        raise DataError(f"{where}: {ids_key} is empty or {labels_key} has another length")
    if vocab_size is not None and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        raise DataError(f"{where}: token id {bad} is outside the model's vocabulary "
                        f"(vocab_size={vocab_size}); was it made with another tokenizer?")
    top = vocab_size if vocab_size is not None else float("inf")
    # a label is a token id to predict, or IGNORE_INDEX (no loss); min/max first, at C speed:
    # a text corpus's labels are all token ids, and only rows with -100 need the walk
    if labels is not ids and not 0 <= min(labels) <= max(labels) < top:
        bad = next((t for t in labels if t != IGNORE_INDEX and not 0 <= t < top), None)
        if bad is not None:
            raise DataError(f"{where}: label {bad} in {labels_key} is neither {IGNORE_INDEX} "
                            "(ignored) nor a token id of the model's vocabulary"
                            + (f" (vocab_size={vocab_size})" if vocab_size is not None else ""))


def _check(data, what: str, vocab_size, keys: tuple[str, ...], shape: str) -> None:
    if data is None or len(data) == 0:
        raise DataError(f"{what} is empty")
    for i, ex in enumerate(data):
        if not isinstance(ex, dict) or any(f"{k}input_ids" not in ex for k in keys):
            raise DataError(f"{what}[{i}]: expected a dict with {shape}, got "
                            f"{type(ex).__name__ if not isinstance(ex, dict) else sorted(ex)}")
        for k in keys:
            _check_ids(ex, f"{k}input_ids", f"{k}labels", f"{what}[{i}]", vocab_size)


class SFT:
    """Supervised fine-tuning: the mean next-token loss over target tokens."""
    name = "sft"

    def check(self, data, what: str, vocab_size=None) -> None:
        _check(data, what, vocab_size, ("",), "'input_ids' and 'labels'")

    def prepare(self, model, data, config):
        return data

    def collate(self, examples, config, max_length):
        if config.packing:  # several examples a row: the same targets, less padding
            return collate_packed(examples, config.pad_token_id, max_length)
        return collate(examples, config.pad_token_id, max_length)

    def count(self, batch) -> int:
        return count_targets(batch)

    def loss(self, model, batch):
        return model(**batch, return_logits=False).loss          # mean over target tokens

    def evaluate(self, model, data, config, max_length, autocast, rank, world):
        return evaluate_loss(model, data, config.eval_batch_size or config.batch_size,
                             config.pad_token_id, max_length, autocast, rank, world), {}


class DPO:
    """Direct preference optimisation (Rafailov et al. 2023), against the reference
    log-probabilities `prepare` computes once (the model with its adapter disabled, or the
    model before training: see preference.py)."""
    name = "dpo"

    def __init__(self, beta: float):
        self.beta = beta

    def check(self, data, what: str, vocab_size=None) -> None:
        _check(data, what, vocab_size, ("chosen_", "rejected_"),
               "chosen_/rejected_ input_ids and labels (minift.preference.load_preferences)")

    def prepare(self, model, data, config):
        if data is None or all("reference_chosen_logp" in e for e in data):
            return data      # (given with the dataset, e.g. computed earlier)
        return add_reference_logps(model, data, config.pad_token_id,
                                   config.eval_batch_size or config.batch_size)

    def collate(self, examples, config, max_length):
        return collate_preferences(examples, config.pad_token_id)

    def count(self, batch) -> int:
        return batch["input_ids"].shape[0] // 2                    # pairs

    def loss(self, model, batch):
        return dpo_batch_loss(model, batch, self.beta)[0] / self.count(batch)  # mean over pairs

    def evaluate(self, model, data, config, max_length, autocast, rank, world):
        with autocast():
            m = preference_metrics(model, data, config.pad_token_id, self.beta,
                                   config.eval_batch_size or config.batch_size)
        return m.pop("dpo_loss"), m            # reward_accuracy, reward_margin


def objective_for(config):
    """The objective TrainConfig.objective names."""
    return DPO(config.dpo_beta) if config.objective == "dpo" else SFT()
