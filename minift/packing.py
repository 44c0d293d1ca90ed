"""Packing: several examples in one row, so a batch of variable-length examples (prompt /
completion pairs, chat conversations: any {"input_ids", "labels"}) carries little padding.

A micro-batch is packed on its own, so a training step sees the same examples, targets and
token count as without packing. In a packed row each example keeps its own positions
(restarting at 0) and its own segment id; the model's attention mask is block-diagonal
and causal (model.attention_mask_4d), so no token attends across examples. The first
label of every example is set to -100: in a row of its own it is never a target either
(the shift drops it); packed, the previous example's last token would otherwise predict
it. So loss and gradients equal those of the padded batch (tests/test_packing.py).

    batch = collate_packed(examples, pad_token_id)   # input_ids, attention_mask, labels,
    loss = model(**batch).loss                       # position_ids, segment_ids: (R, T)
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of indices into `lengths`, each bin's lengths summing to <= capacity: first-fit
    decreasing (longest first, into the first row with room; Johnson 1973), within 11/9 of
    the fewest rows possible, plus one. Deterministic: ties keep input order."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"an example of {max(lengths)} tokens does not fit a row of {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        j = next((j for j, r in enumerate(room) if r >= lengths[i]), None)
        if j is None:
            rows.append([])
            room.append(capacity)
            j = len(rows) - 1
        rows[j].append(i)
        room[j] -= lengths[i]
    return rows


def collate_packed(examples: list[dict], pad_token_id: int, max_length: int | None = None,
                   row_length: int | None = None) -> dict[str, torch.Tensor]:
    """Pack examples into rows of `row_length` tokens (default: the longest example, so the
    rows are as wide as data.collate's padded batch) -> input_ids, attention_mask, labels,
    position_ids, segment_ids, each (rows, T) long. Examples longer than max_length keep
    their first tokens, as in data.collate. Padding: attention_mask 0, label -100,
    position 0, segment -1."""
    if not examples:
        raise ValueError("collate_packed needs at least one example")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; GPT-2 has no pad token, pass tokenizer.eos_token_id")
    ids = [list(e["input_ids"])[:max_length] for e in examples]
    labels = [list(e.get("labels", e["input_ids"]))[:max_length] for e in examples]
    for i, (x, y) in enumerate(zip(ids, labels)):
        if len(x) != len(y):
            raise ValueError(f"example {i}: {len(x)} input_ids but {len(y)} labels")
    T = row_length or max(map(len, ids))
    rows = pack([len(x) for x in ids], T)
    out = {k: torch.full((len(rows), T), v, dtype=torch.long) for k, v in (
        ("input_ids", pad_token_id), ("attention_mask", 0), ("labels", IGNORE_INDEX),
        ("position_ids", 0), ("segment_ids", -1))}
    for r, row in enumerate(rows):
        at = 0
        for seg, i in enumerate(row):
            n = len(ids[i])
            if n == 0:
                continue
            span = slice(at, at + n)
            out["input_ids"][r, span] = torch.tensor(ids[i])
            out["labels"][r, span] = torch.tensor(labels[i])
            out["labels"][r, at] = IGNORE_INDEX   # predicted by the previous example: no target
            out["attention_mask"][r, span] = 1
            out["position_ids"][r, span] = torch.arange(n)
            out["segment_ids"][r, span] = seg
            at += n
    return out
