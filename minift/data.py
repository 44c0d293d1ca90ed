"""Datasets for causal-LM fine-tuning: data files to examples, batching, augmentation.

An example is a dict {"input_ids": list[int], "labels": list[int]}; a label of -100
means "no loss here" (PyTorch's cross_entropy ignore_index, Hugging Face's convention).
A dataset is a plain list of examples (or, for a large text corpus, a TokenBlocks over a
memory-mapped token file, which indexes the same way).

- `.txt`: documents separated by blank lines, each followed by eos, concatenated and
  cut into blocks of `block_size` tokens (labels = input_ids), nanoGPT-style.
- `.jsonl`, `.csv`, `.tsv`, `.parquet`, `.arrow`, a saved `datasets` folder: records of
  one kind per file (minift.formats): {"text"} (loss on every token), {"prompt",
  "completion"} and {"instruction", "input"?, "output"} (loss on the completion and its
  eos only), {"messages"} (loss on the assistant turns and their end tokens, minift.chat),
  {"prompt", "chosen", "rejected"} (DPO pairs, minift.preference: examples with chosen_ and
  rejected_ input_ids and labels, for TrainConfig(objective="dpo")).

Every mistake in a data file raises `DataError` naming the file and line, so the CLI
can print one line instead of a traceback.

Augmentation (EDA, Wei & Zou 2019; back-translation, Sennrich et al. 2016) works on
raw strings before tokenisation, or on records, where it rewrites "text"/"prompt" only.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import chat
from .formats import IGNORE_INDEX, DataError, read_records, read_utf8
from .preference import encode_preferences, preference_records
from .tokenfile import MEMMAP_BYTES, TokenBlocks, token_file

# ----------------------------------------------------------------------------- loading
def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token; examples end with eos")
    return eos


def _encode_all(tokenizer, texts: list[str]) -> list[list[int]]:
    """Batch-encode (parallel in `tokenizers`); works with minift's and Hugging Face's tokenizers."""
    return tokenizer(texts)["input_ids"] if texts else []


def _check_length(name: str, n) -> None:
    if not isinstance(n, int) or n < 2:
        raise DataError(f"{name} must be an integer >= 2, got {n!r}")


def split_documents(text: str) -> list[str]:
    """Documents: separated by one or more blank lines, stripped, empty ones dropped."""
    return [d for d in (d.strip() for d in re.split(r"\n\s*\n", text)) if d]


def load_text(path: str | os.PathLike, tokenizer, block_size: int, memmap: bool = False,
              cache_dir: str | os.PathLike | None = None) -> list[dict] | TokenBlocks:
    """Pack a plain-text file into blocks of `block_size` tokens.

    Documents are separated by one or more blank lines; each is stripped of surrounding
    whitespace and followed by eos, so the model sees where documents end (as in GPT-2's
    pretraining). The short tail block is kept (collate pads it) unless it is a single
    token, which has no next token to predict. memmap=True tokenises the file once into a
    cached token file (minift.tokenfile) and returns TokenBlocks over it: the same blocks,
    read from disk on demand, so a corpus larger than memory trains with flat RSS.
    """
    path = Path(path)
    _check_length("block_size", block_size)
    eos = _eos_id(tokenizer)
    if memmap:
        return TokenBlocks(token_file(path, tokenizer, cache_dir), block_size)
    docs = split_documents(read_utf8(path))
    stream = [t for ids in _encode_all(tokenizer, docs) for t in ids + [eos]]
    blocks = [stream[i:i + block_size] for i in range(0, len(stream), block_size)]
    blocks = [b for b in blocks if len(b) > 1]
    if not blocks:
        raise DataError(f"{path}: no examples (the file holds no text)")
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def load_records(path: str | os.PathLike, tokenizer, max_length: int | None = None,
                 fields: dict | None = None, jsonl: bool = False) -> list[dict]:
    """Read a file of records (JSONL, CSV/TSV, Parquet, Arrow, a `datasets` folder).

    A prompt and its completion are tokenised separately and concatenated, so the
    boundary between "no loss" and "loss" is exactly where the user put it; eos follows
    the text or completion so the model learns to stop. Chat records are rendered with
    the tokenizer's chat template (minift.chat). Examples longer than max_length keep
    their first max_length tokens (one that keeps no trained token is an error, as it
    would teach nothing). `fields` maps minift's field names to the file's columns.
    """
    path = Path(path)
    if max_length is not None:
        _check_length("max_length", max_length)
    kind, records = read_records(path, fields, jsonl)
    if kind == "chat":
        return chat.chat_examples(tokenizer, [m for _, m in records], [w for w, _ in records],
                                  max_length)
    if kind == "preference":
        return encode_preferences(preference_records(records), tokenizer, max_length)
    eos = _eos_id(tokenizer)
    pairs = [("", p) if kind == "text" else p for _, p in records]  # (prompt, target)
    prompts = _encode_all(tokenizer, [p for p, _ in pairs])
    targets = _encode_all(tokenizer, [t for _, t in pairs])
    examples = []
    for (where, _), p, t in zip(records, prompts, targets):
        if max_length is not None and len(p) >= max_length:
            raise DataError(f"{where}: the prompt is {len(p)} tokens, leaving no completion "
                            f"token within max_length={max_length}")
        ids = p + t + [eos]
        labels = [IGNORE_INDEX] * len(p) + t + [eos]
        examples.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    return examples


def eval_records(path: str | os.PathLike, tokenizer,
                 fields: dict | None = None) -> tuple[str, list[dict]]:
    """(the file's kind, the {"prompt", "completion"} pair of every record) for task
    metrics, one per example in file order: prompt/completion and instruction records as
    trained, chat records as their last assistant turn after the conversation before it
    (minift.chat.eval_record; generate up to chat.end_of_turn_id). Text and preference
    records have no pairs."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        return "text", []
    kind, records = read_records(path, fields)
    if kind == "chat":
        return kind, [chat.eval_record(tokenizer, m) for _, m in records]
    if kind in ("text", "preference"):
        return kind, []
    return kind, [{"prompt": p, "completion": c} for _, (p, c) in records]


def load_jsonl(path: str | os.PathLike, tokenizer, max_length: int | None = None,
               fields: dict | None = None) -> list[dict]:
    """load_records for a file read as JSONL whatever its suffix (blank lines skipped)."""
    return load_records(path, tokenizer, max_length, fields, jsonl=True)


def load_dataset(path: str | os.PathLike, tokenizer, block_size: int | None = None,
                 max_length: int | None = None, fields: dict | None = None,
                 memmap: bool | None = None, cache_dir: str | os.PathLike | None = None):
    """Load any data file minift reads (see the module docstring), by its suffix.

    Pass the model's context length (config.n_positions) as max_length; a text file is
    cut into blocks of block_size tokens (default: max_length, else 1024). memmap: for
    .txt, tokenise once into a cached memory-mapped token file (None: when the file is
    over MEMMAP_BYTES); cache_dir: where (default ~/.cache/minift/tokens).
    """
    path = Path(path)
    if path.suffix.lower() == ".txt":
        block = block_size if block_size is not None else (max_length or 1024)
        if memmap is None:
            memmap = path.is_file() and path.stat().st_size > MEMMAP_BYTES
        return load_text(path, tokenizer, block, memmap=memmap, cache_dir=cache_dir)
    return load_records(path, tokenizer, max_length, fields)


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
    """Split into (train, val) by a seeded permutation; each split keeps the original order.
    A dataset with .select(indices) (TokenBlocks, a Hugging Face Dataset) is split by it."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    n = len(dataset)
    n_val = round(n * val_fraction)
    if n_val < 1 or n_val > n - 1:
        raise DataError(f"val_fraction={val_fraction} of {n} examples leaves an empty "
                        f"{'validation' if n_val < 1 else 'training'} split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx = set(perm[:n_val])
    train_idx = [i for i in range(n) if i not in val_idx]
    if hasattr(dataset, "select"):  # TokenBlocks: the split stays on disk
        return dataset.select(train_idx), dataset.select(sorted(val_idx))
    return [dataset[i] for i in train_idx], [dataset[i] for i in sorted(val_idx)]


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
