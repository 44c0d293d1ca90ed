"""Build minift's embedded fine-tuning task: write a function's docstring from its signature.

Each record pairs a standard-library function's signature with the first sentence of its
docstring:

    {"prompt": "def textwrap.shorten(text, width, **kwargs):\\n    \\"\\"\\"",
     "completion": "Collapse and truncate the given text to fit in the given width."}

The functions come from scripts/stdlib_corpus.py's TASK_MODULES, which share no package
with the modules minift-tiny was pretrained on: the model has seen this format (it
pretrained on docstrings written the same way) but never these functions' documentation.

    python scripts/make_dataset.py            # writes minift/assets/task/{train,validation,test}.jsonl + README.md

Deterministic: modules and names are visited in sorted order, duplicates are dropped
keeping the first, and the split is a seeded shuffle. Different Python versions document
their standard library a little differently, so the output is committed; rebuilding on
another version gives a similar, not identical, task.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import re
from collections import Counter
from pathlib import Path

from stdlib_corpus import TASK_MODULES, clean_docstring, documented_objects, header, import_module, signature

OUT = Path(__file__).resolve().parent.parent / "minift" / "assets" / "task"
PROMPT_END = '\n    """'      # the prompt stops where the docstring's text begins
MAX_PROMPT_CHARS = 160       # ~50 tokens: leaves room for the completion within max_length 128
MIN_WORDS, MAX_CHARS = 3, 160  # a completion is one real sentence, not a word or a paragraph
ABBREVIATIONS = {"e.g.", "i.e.", "etc.", "vs.", "cf.", "resp.", "approx."}  # a "." that ends no sentence


def first_sentence(doc: str) -> str | None:
    """The first sentence of a docstring's first paragraph, on one line; None if there is
    no usable one (a paragraph that ends in ':' introduces a list or an example)."""
    para = " ".join(doc.split("\n\n")[0].split())  # first paragraph, whitespace collapsed
    for m in re.finditer(r"[.!?](?=\s|$)", para):
        if para[:m.end()].rsplit(" ", 1)[-1].lower() not in ABBREVIATIONS:
            return para[:m.end()]
    return None if para.endswith(":") else para or None  # a one-liner without a full stop


def records_of(module_name: str) -> list[dict]:
    """Prompt/completion records for one module's documented functions and methods."""
    module = import_module(module_name, TASK_MODULES)
    out = []
    for kind, qualname, obj in documented_objects(module):
        if kind != "def" or signature(obj) is None:  # a builtin inspect can't read: no prompt
            continue
        prompt = header(kind, qualname, obj) + PROMPT_END
        sentence = first_sentence(clean_docstring(obj))
        if (sentence is None or len(prompt) > MAX_PROMPT_CHARS or len(sentence) > MAX_CHARS
                or len(sentence.split()) < MIN_WORDS
                or re.match(r"[\w.]+\(", sentence)  # opens with a signature: "sqrt(x) -> float"
                or re.search(r" = |<instance>|\*\(", sentence)):  # a usage line or a grammar rule
            continue
        out.append({"prompt": prompt, "completion": sentence, "module": module_name})
    return out


def split(records: list, seed: int, fractions=(0.8, 0.1, 0.1)) -> dict[str, list]:
    """A seeded shuffle cut into train / validation / test; each split keeps the sorted order."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_train, n_val = round(fractions[0] * len(order)), round(fractions[1] * len(order))
    parts = {"train": order[:n_train], "validation": order[n_train:n_train + n_val],
             "test": order[n_train + n_val:]}
    return {name: [records[i] for i in sorted(idx)] for name, idx in parts.items()}


def write_readme(path: Path, splits: dict, seed: int) -> None:
    """A short description with per-module counts, so the data says where it came from."""
    counts = {name: Counter(r["module"] for r in recs) for name, recs in splits.items()}
    modules = sorted(set().union(*counts.values()))
    example = next(r for r in splits["train"] if len(r["prompt"]) < 60)  # a short one to show
    lines = [
        "# The embedded task: docstrings from signatures",
        "",
        "Each record's prompt is a standard-library function's signature, written as the",
        "opening of a definition, and its completion is the first sentence of that",
        'function\'s docstring. Fine-tuning teaches minift-tiny to write the summary line:',
        "",
        "```",
        json.dumps({k: example[k] for k in ("prompt", "completion")}),
        "```",
        "",
        f"Built by `python scripts/make_dataset.py` (deterministic, split seed {seed}) on",
        f"Python {platform.python_version()} from the modules in `scripts/stdlib_corpus.py`'s",
        "`TASK_MODULES`, which share no package with the modules minift-tiny was pretrained",
        "on (`PRETRAIN_MODULES`). Functions with no docstring or no signature, sentences",
        "under 3 words or over 160 characters, and repeated prompts or completions are",
        "skipped.",
        "",
        f"Records: {', '.join(f'{n} {len(r)}' for n, r in splits.items())}.",
        "",
        "`reference.txt` is the slice of minift-tiny's pretraining text held out from",
        "pretraining (written by `scripts/pretrain_tiny.py`); its perplexity before and",
        "after fine-tuning measures forgetting.",
        "",
        "| module | train | validation | test |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {m} | " + " | ".join(str(counts[s][m]) for s in splits) + " |" for m in modules]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    records, seen = [], set()
    for name in TASK_MODULES:  # sorted; within a module, documented_objects sorts by name
        for r in records_of(name):
            if r["prompt"] in seen or r["completion"] in seen:  # e.g. an alias, or a method
                continue                                        # that shares its docstring
            seen.update((r["prompt"], r["completion"]))
            records.append(r)
    splits = split(records, args.seed)

    args.out.mkdir(parents=True, exist_ok=True)
    for name, recs in splits.items():
        with open(args.out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps({"prompt": r["prompt"], "completion": r["completion"]},
                                   ensure_ascii=False) + "\n")
    write_readme(args.out / "README.md", splits, args.seed)
    print(f"{len(records)} records from {len(TASK_MODULES)} modules -> {args.out}: "
          + ", ".join(f"{n} {len(r)}" for n, r in splits.items()))


if __name__ == "__main__":
    main()
