"""Datasets for causal-LM fine-tuning: text and JSONL files, masking, packing, batching.

An example is a dict {"input_ids": list[int], "labels": list[int]}; a label of -100
means "no loss here" (PyTorch's cross_entropy ignore_index, Hugging Face's convention).
A dataset is a plain list of examples.

- `.txt`: documents separated by blank lines, each followed by eos, concatenated and
  cut into blocks of `block_size` tokens (labels = input_ids).
- `.jsonl`: one JSON object per line, {"text": ...} (loss on every token) or
  {"prompt": ..., "completion": ...} (loss on the completion and its eos only).

Every mistake in a data file raises `DataError` naming the file and line, so the CLI
can print one line instead of a traceback.

Augmentation (EDA, Wei & Zou 2019; back-translation, Sennrich et al. 2016) works on
raw strings before tokenisation, or on records, where it rewrites "text"/"prompt" only.
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Callable, Iterator

import torch

IGNORE_INDEX = -100  # labels with this value add no loss (F.cross_entropy's default)


class DataError(ValueError):
    """A problem in the user's data or data options; the message names the file and line."""


# ----------------------------------------------------------------------------- reading files
def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:  # a folder, no permission, a name too long, ...
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8-sig")  # -sig: drop the byte-order mark some Windows editors write
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path} line {line}: not UTF-8 text (invalid byte 0x{raw[e.start]:02x} "
                        f"at byte offset {e.start}); re-save the file as UTF-8") from None


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token; examples end with eos")
    return eos


def _encode_all(tokenizer, texts: list[str]) -> list[list[int]]:
    """Batch-encode (parallel in `tokenizers`); works with minift's and Hugging Face's tokenizers."""
    return tokenizer(texts)["input_ids"] if texts else []


def load_text(path: str | os.PathLike, tokenizer, block_size: int) -> list[dict]:
    """Pack a plain-text file into blocks of `block_size` tokens.

    Documents are separated by one or more blank lines; each is stripped of surrounding
    whitespace and followed by eos, so the model sees where documents end (as in GPT-2's
    pretraining). The short tail block is kept (collate pads it) unless it is a single
    token, which has no next token to predict.
    """
    path = Path(path)
    if not isinstance(block_size, int) or block_size < 2:
        raise DataError(f"block_size must be an integer >= 2, got {block_size!r}")
    docs = [d.strip() for d in re.split(r"\n\s*\n", _read_utf8(path))]
    eos = _eos_id(tokenizer)
    stream = [t for ids in _encode_all(tokenizer, [d for d in docs if d]) for t in ids + [eos]]
    blocks = [stream[i:i + block_size] for i in range(0, len(stream), block_size)]
    blocks = [b for b in blocks if len(b) > 1]
    if not blocks:
        raise DataError(f"{path}: no examples (the file holds no text)")
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def load_jsonl(path: str | os.PathLike, tokenizer, max_length: int | None = None) -> list[dict]:
    """Read {"text"} or {"prompt", "completion"} records, one JSON object per line.

    prompt and completion are tokenised separately and concatenated, so the boundary
    between "no loss" and "loss" is exactly where the user put it; eos follows the text
    or completion so the model learns to stop. Blank lines are skipped. Examples longer
    than max_length keep their first max_length tokens (a prompt that leaves no room for
    a single completion token is an error, as it would teach nothing).
    """
    path = Path(path)
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise DataError(f"max_length must be an integer >= 2, got {max_length!r}")
    records = []  # (line number, prompt, target): loss on target only
    # split("\n"), not splitlines(): JSON strings may hold U+2028 etc., which splitlines breaks on
    for n, line in enumerate(_read_utf8(path).split("\n"), 1):
        if line.strip():
            records.append((n, *_parse_record(line, f"{path} line {n}")))
    if not records:
        raise DataError(f"{path}: no examples (the file is empty or holds only blank lines)")
    eos = _eos_id(tokenizer)
    prompts = _encode_all(tokenizer, [p for _, p, _ in records])
    targets = _encode_all(tokenizer, [t for _, _, t in records])
    examples = []
    for (n, _, _), p, t in zip(records, prompts, targets):
        ids = p + t + [eos]
        labels = [IGNORE_INDEX] * len(p) + t + [eos]
        if max_length is not None and len(p) >= max_length:
            raise DataError(f"{path} line {n}: the prompt is {len(p)} tokens, leaving no completion "
                            f"token within max_length={max_length}")
        examples.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    return examples


def _parse_record(line: str, where: str) -> tuple[str, str]:
    """One JSONL line -> (prompt, target); a {"text"} record has an empty prompt."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # e.g. a 5000-digit number, or [[[[... nested too deep
        raise DataError(f"{where}: invalid JSON: {type(e).__name__}: {str(e)[:100]}") from None
    fields = 'expected {"text": ...} or {"prompt": ..., "completion": ...}'
    if not isinstance(rec, dict):
        raise DataError(f"{where}: {fields}, got a JSON {type(rec).__name__}")
    if "text" in rec and ("prompt" in rec or "completion" in rec):
        raise DataError(f"{where}: has both \"text\" and \"prompt\"/\"completion\"; keep one kind")
    keys = ("text",) if "text" in rec else ("prompt", "completion")
    for key in keys:
        if key not in rec:
            found = ", ".join(map(json.dumps, list(rec)[:5])) or "none"
            raise DataError(f"{where}: {fields}; missing {json.dumps(key)} (fields found: {found})")
        if not isinstance(rec[key], str):
            raise DataError(f"{where}: field {json.dumps(key)} must be a string, "
                            f"got {type(rec[key]).__name__}")
        try:  # JSON escapes can smuggle in a lone surrogate ("\\ud800"), which no tokenizer encodes
            rec[key].encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{where}: field {json.dumps(key)} holds invalid unicode "
                            f"(an unpaired surrogate at character {e.start})") from None
    if keys == ("text",):
        if not rec["text"]:
            raise DataError(f'{where}: "text" is empty')
        return "", rec["text"]
    return rec["prompt"], rec["completion"]


def load_dataset(path: str | os.PathLike, tokenizer, block_size: int = 1024,
                 max_length: int | None = None) -> list[dict]:
    """Load `.txt` (packed into block_size blocks) or `.jsonl` (truncated to max_length).

    Pass the model's context length (config.n_positions) as block_size / max_length.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return load_text(path, tokenizer, block_size)
    if suffix == ".jsonl":
        return load_jsonl(path, tokenizer, max_length)
    raise DataError(f"{path}: unknown file type {suffix or '(no suffix)'!r}; expected .txt or .jsonl")


# ----------------------------------------------------------------------------- batching
def collate(examples: list[dict], pad_token_id: int, max_length: int | None = None,
            padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad examples to the longest one -> input_ids, attention_mask, labels, each (B, T) long.

    Sequences longer than max_length (the model's context) keep their first tokens.
    Padding gets attention_mask 0 and label -100, so the pad id's value never matters.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; GPT-2 has no pad token, pass tokenizer.eos_token_id")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    ids = [list(e["input_ids"])[:max_length] for e in examples]
    labels = [list(e.get("labels", e["input_ids"]))[:max_length] for e in examples]
    T = max(map(len, ids))

    def pad(seq, value):
        fill = [value] * (T - len(seq))
        return seq + fill if padding_side == "right" else fill + seq

    return {
        "input_ids": torch.tensor([pad(x, pad_token_id) for x in ids], dtype=torch.long),
        "attention_mask": torch.tensor([pad([1] * len(x), 0) for x in ids], dtype=torch.long),
        "labels": torch.tensor([pad(y, IGNORE_INDEX) for y in labels], dtype=torch.long),
    }


def train_val_split(dataset: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Split into (train, val) by a seeded permutation; each split keeps the original order."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    n = len(dataset)
    n_val = round(n * val_fraction)
    if n_val < 1 or n_val > n - 1:
        raise DataError(f"val_fraction={val_fraction} of {n} examples leaves an empty "
                        f"{'validation' if n_val < 1 else 'training'} split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx = set(perm[:n_val])
    return ([x for i, x in enumerate(dataset) if i not in val_idx],
            [x for i, x in enumerate(dataset) if i in val_idx])


def shuffled_batches(dataset: list, batch_size: int, seed: int, epoch: int, start: int = 0,
                     drop_last: bool = False) -> Iterator[list]:
    """Yield lists of examples in an order fixed by (seed, epoch), from batch index `start`.

    The order depends only on (seed, epoch), never on earlier epochs, so a run resumed at
    (epoch, batch) sees exactly the batches the interrupted run would have seen.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)  # one stream per pair
    perm = torch.randperm(len(dataset), generator=g).tolist()
    stop = len(perm) - len(perm) % batch_size if drop_last else len(perm)
    for i in range(start * batch_size, stop, batch_size):
        yield [dataset[j] for j in perm[i:i + batch_size]]


# ----------------------------------------------------------------------------- augmentation
# EDA's operations act on words. A string is kept as (whitespace, word) pairs plus trailing
# whitespace, so swaps and replacements leave line breaks and indentation where they were.
def _split_words(text: str) -> tuple[list[str], list[str], str]:
    pairs = re.findall(r"(\s*)(\S+)", text)
    seps, words = [s for s, _ in pairs], [w for _, w in pairs]
    return seps, words, text[len("".join(s + w for s, w in pairs)):]


def _join_words(seps: list[str], words: list[str], tail: str) -> str:
    return "".join(s + w for s, w in zip(seps, words)) + tail


def _augment(items: list, fn: Callable[[str], str]) -> list:
    """Apply fn to each string, or to a record's "text" (else "prompt"); other fields are kept."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append(fn(item))
        elif isinstance(item, dict) and isinstance(item.get("text", item.get("prompt")), str):
            key = "text" if "text" in item else "prompt"
            out.append({**item, key: fn(item[key])})
        else:
            raise DataError(f"item {i}: expected a string or a record with a \"text\" or "
                            f"\"prompt\" string, got {type(item).__name__}")
    return out


def random_deletion(texts: list, p: float, seed: int) -> list:
    """EDA's random deletion: drop each word with probability p, always keeping one word.

    A deleted word takes the whitespace before it, so the next kept word keeps its own
    (a line break before a kept word survives).
    """
    if not 0 <= p <= 1:
        raise DataError(f"p must be between 0 and 1, got {p}")
    rng = random.Random(seed)

    def delete(text):
        seps, words, tail = _split_words(text)
        keep = [i for i in range(len(words)) if rng.random() >= p]
        if words and not keep:
            keep = [rng.randrange(len(words))]
        if not keep:
            return text
        # the first kept word takes the text's leading whitespace, the others their own
        return seps[0] + words[keep[0]] + _join_words([seps[i] for i in keep[1:]],
                                                      [words[i] for i in keep[1:]], tail)

    return _augment(texts, delete)


def random_swap(texts: list, n: int, seed: int) -> list:
    """EDA's random swap: n times, swap two randomly chosen words (texts under 2 words unchanged)."""
    if n < 0:
        raise DataError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)

    def swap(text):
        seps, words, tail = _split_words(text)
        if len(words) < 2:
            return text
        for _ in range(n):
            i, j = rng.sample(range(len(words)), 2)
            words[i], words[j] = words[j], words[i]
        return _join_words(seps, words, tail)

    return _augment(texts, swap)


def synonym_replacement(texts: list, table: dict[str, list[str]], n: int, seed: int) -> list:
    """EDA's synonym replacement: replace up to n distinct words that have an entry in table.

    A word matches as is or lowercased, ignoring punctuation around it ("Cat," matches
    "cat"; the comma stays). The synonym is chosen uniformly from its list.
    """
    if n < 0:
        raise DataError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)

    def lookup(core):
        return table.get(core) or table.get(core.lower())

    def replace(text):
        seps, words, tail = _split_words(text)
        # (leading punctuation, core, trailing punctuation); \w is unicode-aware
        parts = [re.fullmatch(r"(\W*)(.*?)(\W*)", w).groups() for w in words]
        candidates = [i for i, (_, core, _) in enumerate(parts) if core and lookup(core)]
        for i in rng.sample(candidates, min(n, len(candidates))):
            pre, core, post = parts[i]
            words[i] = pre + rng.choice(lookup(core)) + post
        return _join_words(seps, words, tail)

    return _augment(texts, replace)


def back_translate(texts: list, to_pivot: Callable[[list[str]], list[str]],
                   from_pivot: Callable[[list[str]], list[str]]) -> list:
    """Paraphrase by translating to a pivot language and back (Sennrich et al. 2016, sec. 3.2).

    to_pivot / from_pivot are any batch translators list[str] -> list[str] (a model, an
    API, a dictionary); each must return one string per input.
    """
    originals = _augment(texts, lambda s: s)  # validates items before calling the translators
    sources = [x if isinstance(x, str) else x.get("text", x.get("prompt")) for x in originals]
    result = sources
    for name, fn in (("to_pivot", to_pivot), ("from_pivot", from_pivot)):
        result = list(fn(list(result)))
        if len(result) != len(sources) or not all(isinstance(s, str) for s in result):
            raise DataError(f"back_translate: {name} must return {len(sources)} strings, one per "
                            f"input, got {len(result)} items")
    paraphrases = iter(result)
    return _augment(texts, lambda s: next(paraphrases))
