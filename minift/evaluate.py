"""Evaluation beyond the loss: perplexity, task metrics, choice accuracy, forgetting, bias.

Every function returns plain numbers, dicts and lists and prints nothing; minift.tables'
`format_table` / `print_table` turn any of those results into a fixed-width table.

- `perplexity`: exp(mean next-token NLL) over every target token of a dataset or text.
- metrics.py holds the string metrics the answers are scored with: `exact_match`,
  `token_f1`, `rouge_l`, `task_metrics` (SQuAD, Rajpurkar et al. 2016 §6.1; ROUGE-L, Lin 2004).
- `generate_completions`, `evaluate_generation`, `samples`: greedy answers to prompts,
  scored against references, and a few side by side for a human to read.
- `choice_accuracy`: classification through the LM by comparing the log-likelihood of
  each candidate continuation (Brown et al. 2020, "Language Models are Few-Shot
  Learners", §2.4).
- `forgetting`, `forgetting_report`: perplexity on a pre-training-like reference text
  before and after fine-tuning (catastrophic forgetting shows up as a rise).
- probes.py holds the probes that need no task: `bias_probe` (log-likelihood gaps of
  minimal pairs) and `copy_probe` (in-context copying).

Functions that run the model put it in eval mode under `torch.no_grad()` (dropout
off) and restore every module's training flag afterwards, so calling them mid-training
changes nothing. They work with minift's GPT and the PEFT wrappers, on any device.
"""
from __future__ import annotations

import itertools
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from . import chat
from .data import IGNORE_INDEX, collate
from .distributed import evaluate_loss, to_device
from .metrics import task_metrics

# ----------------------------------------------------------------------------- helpers
@contextmanager
def _inference(model):
    """eval() + no_grad for the block; then each module gets back its own training flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        for m, training in modes:
            m.training = training


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Batch-encode; works with minift's and Hugging Face's tokenizers."""
    return tokenizer(list(texts))["input_ids"] if texts else []


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _exp(x: float) -> float:
    return math.exp(x) if x < 709 else float("inf")  # exp(709.8) overflows a float64


# ----------------------------------------------------------------------------- perplexity
def _blocks(text: str, tokenizer, block_size: int) -> list[dict]:
    """Tokenise `text` and cut it into non-overlapping blocks of block_size tokens.

    The first token of each block is context only (nothing before it in the block), so
    a text of N tokens in k blocks has N - k targets, some with little context. A
    sliding window would give every token long context, at several times the cost;
    non-overlapping blocks are the cheap usual choice and give a somewhat higher
    perplexity. A final block of one token has no target and is dropped.
    """
    if tokenizer is None:
        raise ValueError("perplexity on a text needs a tokenizer")
    ids = tokenizer.encode(text)
    blocks = [ids[i:i + block_size] for i in range(0, len(ids), block_size)]
    return [{"input_ids": b, "labels": b} for b in blocks if len(b) > 1]


def perplexity(model, data_or_text, tokenizer=None, batch_size: int = 8,
               block_size: int | None = None) -> float:
    """exp(mean next-token NLL), the mean taken over all target tokens, not over batches.

    data_or_text: a list of examples {"input_ids", "labels" (optional; -100 = not a
    target)}, as minift.data produces, or a string, which is tokenised (no eos added)
    and cut into non-overlapping blocks of `block_size` tokens (default: the model's
    context, config.n_positions); the first token of each block is context only.
    """
    n_positions = model.config.n_positions
    if isinstance(data_or_text, str):
        block_size = n_positions if block_size is None else block_size
        if not isinstance(block_size, int) or not 2 <= block_size <= n_positions:
            raise ValueError(f"block_size must be an integer in [2, {n_positions}] "
                             f"(the model's context), got {block_size!r}")
        examples = _blocks(data_or_text, tokenizer, block_size)
    elif isinstance(data_or_text, (list, tuple)) and data_or_text and all(
            isinstance(e, dict) and "input_ids" in e for e in data_or_text):
        examples = list(data_or_text)
    else:
        raise TypeError("perplexity expects a string or a non-empty list of examples "
                        "{'input_ids': [...], 'labels': [...]}")
    _check_batch_size(batch_size)
    with _inference(model):  # evaluate_loss restores only the top module's training flag
        loss = evaluate_loss(model, examples, batch_size)  # the mean over all target tokens
    if math.isnan(loss):
        raise ValueError("no target tokens to score: the text is shorter than 2 tokens, or "
                         "every label is -100")
    return _exp(loss)


# ----------------------------------------------------------------------------- generation
def generate_completions(model, tokenizer, prompts: list[str], max_new_tokens: int = 32,
                         batch_size: int = 8, stop_at_newline: bool = True,
                         eos_token_id: int | None = None) -> list[str]:
    """Greedy continuation of each prompt, decoded without the prompt.

    Prompts are batched with left padding, so every row's new tokens follow its prompt
    directly. A row stops at eos (not included in the text). With stop_at_newline the
    text is cut before its first "\\n", the usual end of a one-line answer (generation
    itself still runs to eos or max_new_tokens; only the text is cut). eos_token_id: the
    stop token (None: the tokenizer's eos; a chat template's end-of-turn token for chats).
    """
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    _check_batch_size(batch_size)
    encoded = _encode(tokenizer, prompts)
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} is empty; the model needs at least one token to continue")
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    texts = []
    with _inference(model) as device:
        for i in range(0, len(encoded), batch_size):
            chunk = [{"input_ids": ids} for ids in encoded[i:i + batch_size]]
            batch = to_device(collate(chunk, pad_token_id=0, padding_side="left"), device)
            ids = batch["input_ids"]                                       # (B, T), pads masked
            out = model.generate(ids, attention_mask=batch["attention_mask"],
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=pad)         # (B, T + new)
            for row in out[:, ids.shape[1]:].tolist():
                if eos is not None and eos in row:
                    row = row[:row.index(eos)]
                text = tokenizer.decode(row)
                texts.append(text.split("\n", 1)[0] if stop_at_newline else text)
    return texts


def _prompt_records(tokenizer, records) -> tuple[list, int | None]:
    """Checked test records {"prompt", "completion"} and the id to stop generating at. Chat
    records {"messages"} become {"prompt", "completion"} (the last assistant turn is the
    reference), and the template's end-of-turn id is the stop (None otherwise: eos)."""
    if not isinstance(records, (list, tuple)) or not records:
        raise ValueError("records must be a non-empty list of {'prompt', 'completion'} dicts")
    chats = [isinstance(r, dict) and "messages" in r for r in records]
    records = [chat.eval_record(tokenizer, r["messages"]) if is_chat else r
               for r, is_chat in zip(records, chats)]
    for i, r in enumerate(records):
        if not (isinstance(r, dict) and isinstance(r.get("prompt"), str)
                and isinstance(r.get("completion"), str)):
            raise ValueError(f"record {i}: expected {{'prompt': str, 'completion': str}}, "
                             f"got {r!r:.80}")
    return records, chat.end_of_turn_id(tokenizer) if any(chats) else None


def evaluate_generation(model, tokenizer, records: list[dict], max_new_tokens: int = 32,
                        batch_size: int = 8, stop_at_newline: bool = True,
                        eos_token_id: int | None = None) -> dict:
    """Greedy answers to each record's "prompt", scored against its "completion":
    task_metrics' exact_match / f1 / rouge_l means and n. Chat records {"messages"} are
    scored on their last assistant turn. eos_token_id: as in generate_completions."""
    records, stop = _prompt_records(tokenizer, records)
    stop = eos_token_id if eos_token_id is not None else stop
    preds = generate_completions(model, tokenizer, [r["prompt"] for r in records],
                                 max_new_tokens, batch_size, stop_at_newline, stop)
    return task_metrics(preds, [r["completion"] for r in records])


def samples(model, tokenizer, records: list[dict], n: int = 5, max_new_tokens: int = 32,
            stop_at_newline: bool = True) -> list[dict]:
    """The first n records as rows {prompt, reference, generation}, for print_table."""
    records, stop = _prompt_records(tokenizer, records)
    chosen = records[:n]
    gens = generate_completions(model, tokenizer, [r["prompt"] for r in chosen], max_new_tokens,
                                stop_at_newline=stop_at_newline, eos_token_id=stop)
    return [{"prompt": r["prompt"], "reference": r["completion"], "generation": g}
            for r, g in zip(chosen, gens)]


# ----------------------------------------------------------------------------- log-likelihoods
def continuation_logprobs(model, pairs: list[tuple[list[int], list[int]]],
                          batch_size: int = 8) -> list[float]:
    """sum_t log p(x_t | context, x_<t) for each (context ids, continuation ids) pair.

    Each sequence context + continuation runs once (batched, right-padded); the
    continuation's tokens are the only targets. The context needs at least one token.
    """
    _check_batch_size(batch_size)
    examples = []
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ValueError(f"pair {i}: context and continuation need at least one token each")
        examples.append({"input_ids": list(ctx) + list(cont),
                         "labels": [IGNORE_INDEX] * len(ctx) + list(cont)})
    scores = []
    with _inference(model) as device:
        for i in range(0, len(examples), batch_size):  # right-padded; pads are masked out
            batch = to_device(collate(examples[i:i + batch_size], pad_token_id=0), device)
            T = batch["input_ids"].shape[1]
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            # prompt tuning puts virtual tokens' logits in front (as PEFT): keep the last T
            logits = logits[:, -T:]                                              # (B, T, V)
            # position t predicts token t + 1; cross_entropy wants classes on dim 1
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), batch["labels"][:, 1:],
                                  ignore_index=IGNORE_INDEX, reduction="none")  # (B, T - 1)
            scores += (-nll.sum(dim=1)).tolist()  # ignored positions contribute 0
    return scores


def choice_accuracy(model, tokenizer, items: list[dict], length_normalize: bool = False,
                    batch_size: int = 8) -> dict:
    """Multiple choice through the LM (Brown et al. 2020 §2.4).

    items: {"context": str, "choices": [str, ...], "label": index of the correct choice}.
    Each choice is scored by log p(choice | context), summed over its tokens, or with
    length_normalize the mean per token (GPT-3's normalisation, which keeps long
    choices from losing just for being long). Context and choice are tokenised
    separately and concatenated, so include the space: context "Q: ... A:", choice
    " Paris". The prediction is the highest score (the first on ties).
    Returns {"accuracy", "n", "predictions": [int], "scores": [[float per choice]],
    "correct": [1.0 or 0.0 per item]} (accuracy is correct's mean).
    """
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError("items must be a non-empty list of {'context', 'choices', 'label'} dicts")
    for i, it in enumerate(items):
        ok = (isinstance(it, dict) and isinstance(it.get("context"), str)
              and isinstance(it.get("choices"), (list, tuple)) and len(it["choices"]) >= 2
              and all(isinstance(c, str) for c in it["choices"])
              and isinstance(it.get("label"), int) and 0 <= it["label"] < len(it["choices"]))
        if not ok:
            raise ValueError(f"item {i}: expected {{'context': str, 'choices': [>= 2 strings], "
                             f"'label': index into choices}}, got {it!r:.120}")
    contexts = _encode(tokenizer, [it["context"] for it in items])
    choices = iter(_encode(tokenizer, [c for it in items for c in it["choices"]]))
    pairs = [(contexts[i], next(choices)) for i, it in enumerate(items) for _ in it["choices"]]
    flat = continuation_logprobs(model, pairs, batch_size)
    if length_normalize:
        flat = [s / len(cont) for s, (_, cont) in zip(flat, pairs)]
    ends = list(itertools.accumulate(len(it["choices"]) for it in items))
    scores = [flat[end - len(it["choices"]):end] for it, end in zip(items, ends)]
    preds = [max(range(len(row)), key=row.__getitem__) for row in scores]
    correct = [float(p == it["label"]) for p, it in zip(preds, items)]
    return {"accuracy": sum(correct) / len(items), "n": len(items), "predictions": preds,
            "scores": scores, "correct": correct}


# ----------------------------------------------------------------------------- forgetting
def forgetting_report(before: float, after: float) -> dict:
    """Compare two perplexities on the same reference text: {before, after, change, ratio}.

    change = after - before (positive: the model got worse on the reference),
    ratio = after / before (1.0: no forgetting).
    """
    for name, v in (("before", before), ("after", after)):
        if not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name} must be a positive perplexity, got {v!r}")
    return {"before": before, "after": after, "change": after - before, "ratio": after / before}


def forgetting(model_before, model_after, reference, tokenizer=None, batch_size: int = 8,
               block_size: int | None = None) -> dict:
    """Perplexity of two models on a reference (text or examples) -> forgetting_report.

    Needs both models in memory. To avoid that, measure the one model before training
    and again after it:
        before = perplexity(model, reference, tok); train(...)
        report = forgetting_report(before, perplexity(model, reference, tok))
    """
    ppl = [perplexity(m, reference, tokenizer, batch_size, block_size)
           for m in (model_before, model_after)]
    return forgetting_report(*ppl)
