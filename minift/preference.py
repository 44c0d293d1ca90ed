"""Preference tuning with DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model").

Data: records {"prompt", "chosen", "rejected"}: two completions of one prompt, the first
preferred. The policy pi is the model being trained, the reference pi_ref the model it
started from. With log-probabilities summed over the completion tokens only (the prompt is
context, not a choice the model made), the loss of one pair is (§4, Eq. 7)

    L = -log sigmoid(beta * [(log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r))])

and beta * (log pi(y) - log pi_ref(y)) is the implicit reward of completion y (§4, Eq. 5). Reward
accuracy is the share of pairs whose chosen reward is above the rejected one; the margin is
the mean of chosen minus rejected reward.

The reference never needs a second model in memory: its log-probabilities are computed once,
before training, and stored with the examples (`add_reference_logps`). For adapter methods
that pass runs the same model with its adapter disabled (`disable_adapter`), which is the
base model; for full fine-tuning it runs the model before its first step, which is the
reference by definition. Chosen and rejected rows go through the model as one batch of 2B.
"""
from __future__ import annotations

import contextlib
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from .formats import IGNORE_INDEX, DataError, read_records

FIELDS = ("prompt", "chosen", "rejected")


# ----------------------------------------------------------------------------- data
def read_preferences(path, fields: dict | None = None) -> list[dict]:
    """Every {"prompt", "chosen", "rejected"} record of a data file (JSONL, CSV, Parquet, ...;
    `fields` maps these names to the file's columns, as for load_dataset). A record missing a
    field, or holding a non-string, is one DataError naming file and line."""
    kind, records = read_records(Path(path), fields)
    if kind != "preference":
        raise DataError(f"{records[0][0]}: a {kind!r} record; preference tuning needs "
                        '{"prompt", "chosen", "rejected"} records')
    return preference_records(records)


def preference_records(records: list[tuple[str, tuple[str, str, str]]]) -> list[dict]:
    """read_records' (where, (prompt, chosen, rejected)) payloads of a preference file ->
    the {"prompt", "chosen", "rejected", "where"} records encode_preferences takes."""
    return [{"prompt": p, "chosen": c, "rejected": r, "where": where}
            for where, (p, c, r) in records]


def encode_preferences(records: list[dict], tokenizer, max_length: int | None = None) -> list[dict]:
    """Records -> examples with chosen_input_ids / chosen_labels / rejected_input_ids /
    rejected_labels: prompt + completion + eos, the labels -100 on the prompt (as load_records
    encodes a prompt/completion record). Longer rows keep their first max_length tokens."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token; completions end with eos")
    # one batched tokenizer call per field
    prompts, chosen, rejected = (tokenizer([r[f] for r in records])["input_ids"] for f in FIELDS)
    examples = []
    for rec, p, c, r in zip(records, prompts, chosen, rejected):
        if max_length is not None and len(p) >= max_length:
            raise DataError(f"{rec.get('where', 'record')}: the prompt is {len(p)} tokens, "
                            f"leaving no completion token within max_length={max_length}")
        ex = {}
        for side, t in (("chosen", c), ("rejected", r)):
            ex[f"{side}_input_ids"] = (p + t + [eos])[:max_length]
            ex[f"{side}_labels"] = ([IGNORE_INDEX] * len(p) + t + [eos])[:max_length]
        examples.append(ex)
    return examples


def load_preferences(path, tokenizer, max_length: int | None = None,
                     fields: dict | None = None) -> list[dict]:
    """read_preferences + encode_preferences (load_dataset does the same for such a file)."""
    return encode_preferences(read_preferences(path, fields), tokenizer, max_length)


def preference_pairs(records: list[dict], seed: int = 0) -> list[dict]:
    """A preference task from prompt/completion records: chosen = the record's own completion,
    rejected = the completion of another record (a seeded draw whose text differs)."""
    completions = [r["completion"] for r in records]
    if len(set(completions)) < 2:
        raise DataError("preference_pairs needs at least two different completions")
    rng = random.Random(seed)
    out = []
    for i, rec in enumerate(records):
        j = rng.randrange(len(records))
        while completions[j] == rec["completion"]:
            j = rng.randrange(len(records))
        out.append({"prompt": rec["prompt"], "chosen": rec["completion"],
                    "rejected": completions[j]})
    return out


def collate_preferences(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B examples -> one batch of 2B rows, the chosen ones first: input_ids, attention_mask,
    labels (2B, T), right-padded, and reference_logps (2B,) when the examples carry them."""
    pairs = [(e[f"{s}_input_ids"], e[f"{s}_labels"]) for s in ("chosen", "rejected")
             for e in examples]
    T = max(len(ids) for ids, _ in pairs)

    def pad(seq, value):
        return list(seq) + [value] * (T - len(seq))

    batch = {
        "input_ids": torch.tensor([pad(i, pad_token_id) for i, _ in pairs], dtype=torch.long),
        "attention_mask": torch.tensor([pad([1] * len(i), 0) for i, _ in pairs], dtype=torch.long),
        "labels": torch.tensor([pad(y, IGNORE_INDEX) for _, y in pairs], dtype=torch.long),
    }
    if all("reference_chosen_logp" in e for e in examples):
        batch["reference_logps"] = torch.tensor(
            [e["reference_chosen_logp"] for e in examples]
            + [e["reference_rejected_logp"] for e in examples], dtype=torch.float64)
    return batch


# ----------------------------------------------------------------------------- the loss
def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(completion | prompt) per row: the sum over target positions (labels != -100) of
    log softmax(logits[t - 1])[labels[t]]. logits (N, T, V), labels (N, T) -> (N,) float32."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]                 # predict t from < t
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none")     # (N * (T - 1),)
    return -nll.view(labels.shape).sum(dim=1)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.1):
    """The sigmoid DPO loss per pair and the implicit rewards (§4 Eqs. 7 and 5): each (B,) ->
    (losses, chosen_rewards, rejected_rewards); the rewards are detached."""
    chosen = policy_chosen - reference_chosen                              # log ratios
    rejected = policy_rejected - reference_rejected
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def policy_logps(model, batch: dict) -> torch.Tensor:
    """(2B,) sequence log-probabilities of a collate_preferences batch under `model`."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, -batch["labels"].shape[1]:]   # virtual tokens (prompt tuning) cut
    return sequence_logps(logits, batch["labels"])


def dpo_batch_loss(model, batch: dict, beta: float):
    """(loss summed over the B pairs, chosen_rewards, rejected_rewards) for one batch; the
    reference log-probabilities come with the batch (add_reference_logps)."""
    if "reference_logps" not in batch:
        raise ValueError("DPO batches need reference_logps: run add_reference_logps first")
    logps = policy_logps(model, batch)
    ref = batch["reference_logps"].to(logps.device, logps.dtype)
    pc, pr = logps.chunk(2)
    rc, rr = ref.chunk(2)
    losses, cr, rr_ = dpo_loss(pc, pr, rc, rr, beta)
    return losses.sum(), cr, rr_


def reference_context(model):
    """The reference model: `model` with its adapter disabled (a PeftModel), else as it is."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if disable is not None else contextlib.nullcontext()


@torch.no_grad()
def add_reference_logps(model, examples: list[dict], pad_token_id: int, batch_size: int = 8,
                        device=None) -> list[dict]:
    """Copies of `examples` with reference_chosen_logp / reference_rejected_logp, computed once
    in eval mode under reference_context(model); the model's train/eval mode is restored."""
    was_training, device = model.training, device or next(model.parameters()).device
    model.eval()
    out = []
    try:
        with reference_context(model):
            for i in range(0, len(examples), batch_size):
                chunk = examples[i:i + batch_size]
                batch = {k: v.to(device) for k, v in
                         collate_preferences(chunk, pad_token_id).items()}
                c, r = policy_logps(model, batch).double().cpu().chunk(2)
                out += [e | {"reference_chosen_logp": float(a), "reference_rejected_logp": float(b)}
                        for e, a, b in zip(chunk, c, r)]
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def reward_margins(model, examples: list[dict], pad_token_id: int, beta: float = 0.1,
                   batch_size: int = 8, device=None) -> torch.Tensor:
    """Per held-out pair (with reference log-probabilities), chosen minus rejected implicit
    reward: (n,) float64, in eval mode (the model's mode is restored)."""
    was_training, device = model.training, device or next(model.parameters()).device
    model.eval()
    margins = []
    try:
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in
                     collate_preferences(examples[i:i + batch_size], pad_token_id).items()}
            _, cr, rr = dpo_batch_loss(model, batch, beta)
            margins.append((cr - rr).double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(margins)


def preference_metrics(model, examples: list[dict], pad_token_id: int, beta: float = 0.1,
                       batch_size: int = 8, device=None) -> dict[str, float]:
    """reward_accuracy (share of pairs with chosen reward > rejected reward), reward_margin
    (mean margin) and dpo_loss (mean; -log sigmoid(margin), as margin = beta times the
    difference of log ratios) on held-out pairs."""
    margin = reward_margins(model, examples, pad_token_id, beta, batch_size, device)
    return {"reward_accuracy": (margin > 0).double().mean().item(),
            "reward_margin": margin.mean().item(),
            "dpo_loss": -F.logsigmoid(margin).mean().item()}
