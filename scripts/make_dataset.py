"""Build minift's built-in tasks from the standard library's signatures and docstrings.

Four tasks, each with train / validation / test splits, written to minift/assets/tasks/NAME/:

- params (structured output, exact match): list a function's parameters in a fixed format
  the base model has never seen.
      def shutil.copyfile(src, dst, *, follow_symlinks=True):
      # parameters:  ->  src: required; dst: required; follow_symlinks: default True
- call (structured output, exact match): write a call with the required arguments.
      def shutil.copyfile(src, dst, *, follow_symlinks=True):
      # call:  ->  shutil.copyfile(src, dst)
- choice (multiple choice, accuracy): which of 4 docstring summaries belongs to the
  signature; scored by the log-likelihood of each choice after the prompt.
- docstring (generative, ROUGE-L and token F1): write the first sentence of the docstring.
- preference (DPO pairs, reward accuracy): the docstring prompts with chosen = the true
  summary and rejected = the first wrong choice of the choice task.

The functions come from scripts/stdlib_corpus.py's TASK_MODULES, none of whose files the
base model was pretrained on. The splits are by module (a seeded assignment of modules to
train / validation / test), so no test function shares a module with a training one: the
model must read the signature in its context rather than recall a module.

    python scripts/make_dataset.py            # writes minift/assets/tasks/*/ and build.json
    python scripts/make_dataset.py --more-train runs/more   # and a larger train split

--more-train DIR also writes DIR/{params,call,docstring}/train.jsonl: the train split, then
the same records made from the pretraining modules' functions (about 1,200 more). Their
source was in the pretraining corpus, so they are kept out of the built-in tasks, whose
every module is held out; the validation and test splits stay as they are.

Deterministic: modules and names are visited in sorted order, duplicates are dropped keeping
the first, and the splits and the distractors come from seeded generators. Different Python
versions document their standard library a little differently, so the output is committed;
rebuilding on another version gives a similar, not identical, task.
"""
from __future__ import annotations

import argparse
import inspect
import json
import platform
import random
import re
import sys
from collections import Counter
from pathlib import Path

from stdlib_corpus import PRETRAIN_MODULES, TASK_MODULES, clean_docstring, documented_objects, header, import_module, signature

OUT = Path(__file__).resolve().parent.parent / "minift" / "assets" / "tasks"
MAX_PROMPT_CHARS = 120       # ~40 tokens: the answer fits in max_length 128 with it
MIN_WORDS, MAX_CHARS = 3, 120  # a summary is one real sentence, not a word or a paragraph
ABBREVIATIONS = {"e.g.", "i.e.", "etc.", "vs.", "cf.", "resp.", "approx."}  # a "." that ends no sentence
N_CHOICES = 4
MACHINE_PATHS = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})  # in no committed file
FRACTIONS = (0.8, 0.1, 0.1)  # train / validation / test, counted in functions


def first_sentence(doc: str) -> str | None:
    """The first sentence of a docstring's first paragraph, on one line; None if there is
    no usable one (a paragraph that ends in ':' introduces a list or an example)."""
    para = " ".join(doc.split("\n\n")[0].split())  # first paragraph, whitespace collapsed
    for m in re.finditer(r"[.!?](?=\s|$)", para):
        if para[:m.end()].rsplit(" ", 1)[-1].lower() not in ABBREVIATIONS:
            return para[:m.end()]
    return None if para.endswith(":") else para or None  # a one-liner without a full stop


def usable_summary(sentence: str | None) -> bool:
    return (sentence is not None and len(sentence) <= MAX_CHARS
            and len(sentence.split()) >= MIN_WORDS
            and not re.match(r"[\w.]+\(", sentence)          # opens with a signature
            and not re.search(r" = |<instance>|\*\(", sentence))  # a usage line or a grammar rule


def parameters_line(sig: inspect.Signature) -> str:
    """'src: required; dst: required; follow_symlinks: default True' (the params format)."""
    parts = []
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            parts.append(f"*{p.name}: variadic")
        elif p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}: keywords")
        elif p.default is p.empty:
            parts.append(f"{p.name}: required")
        else:
            parts.append(f"{p.name}: default {str(p).split('=', 1)[1]}")
    return "; ".join(parts) if parts else "none"


def call_line(qualname: str, sig: inspect.Signature) -> str:
    """'shutil.copyfile(src, dst)': the required positional arguments, self/cls left out."""
    names = [p.name for p in sig.parameters.values()
             if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
             and p.name not in ("self", "cls")]
    return f"{qualname}({', '.join(names)})"


def functions_of(module_name: str, allowed: tuple[str, ...] = TASK_MODULES) -> list[dict]:
    """One entry per documented function or method with a plain signature (no annotations,
    no memory addresses in defaults) and a parameter besides self/cls: its def line, the
    params and call answers, and its docstring summary (None when none is usable)."""
    module = import_module(module_name, allowed)
    out = []
    for kind, qualname, obj in documented_objects(module):
        text = signature(obj)
        if kind != "def" or text is None or ":" in text.replace("lambda", "") or "<" in text:
            continue   # no signature inspect can read, an annotation, or an unprintable default
        if any(p in text for p in MACHINE_PATHS):
            continue   # a default that names this machine (platform.architecture's executable)
        head = header(kind, qualname, obj)
        if len(head) > MAX_PROMPT_CHARS:
            continue
        sig = inspect.signature(obj)
        if not [n for n in sig.parameters if n not in ("self", "cls")]:
            continue   # "self: required" would be a free answer
        summary = first_sentence(clean_docstring(obj))
        out.append({"module": module_name, "head": head, "qualname": qualname,
                    "params": parameters_line(sig), "call": call_line(qualname, sig),
                    "summary": summary if usable_summary(summary) else None})
    return out


def split_modules(functions: list[dict], seed: int) -> dict[str, set[str]]:
    """Modules to splits: a seeded order of modules, filled into test, then validation, until
    each holds its share of the functions; the rest is train."""
    counts = Counter(f["module"] for f in functions)
    order = sorted(counts)
    random.Random(seed).shuffle(order)
    total, parts, i = sum(counts.values()), {"test": set(), "validation": set()}, 0
    for name, share in (("test", FRACTIONS[2]), ("validation", FRACTIONS[1])):
        while sum(counts[m] for m in parts[name]) < share * total:
            parts[name].add(order[i])
            i += 1
    parts["train"] = set(order[i:])
    return parts


def with_summary(fns: list[dict]) -> list[dict]:
    """The functions with a usable docstring summary: the docstring, choice and preference
    tasks' items."""
    return [f for f in fns if f["summary"]]


def docstring_prompt(f: dict) -> str:
    """The docstring, choice and preference tasks' prompt: the def line, then the opening quotes."""
    return f["head"] + '\n    """'


def generation_records(fns: list[dict]) -> dict[str, list[dict]]:
    """The params, call and docstring records of these functions (docstring: only those with
    a usable summary)."""
    return {"params": [{"prompt": f["head"] + "\n# parameters:", "completion": " " + f["params"]}
                       for f in fns],
            "call": [{"prompt": f["head"] + "\n# call:", "completion": " " + f["call"]}
                     for f in fns],
            "docstring": [{"prompt": docstring_prompt(f), "completion": f["summary"]}
                          for f in with_summary(fns)]}


def build(functions: list[dict], seed: int) -> dict[str, dict[str, list[dict]]]:
    """{task: {split: records}}."""
    modules = split_modules(functions, seed)
    tasks = {"params": {}, "call": {}, "choice": {}, "docstring": {}, "preference": {}}
    for split, names in modules.items():
        fns = [f for f in functions if f["module"] in names]
        for task, records in generation_records(fns).items():
            tasks[task][split] = records
        with_doc = with_summary(fns)
        rng = random.Random(f"{seed}-{split}")
        choice = []
        for f in with_doc:
            others = [g["summary"] for g in with_doc if g["summary"] != f["summary"]]
            options = rng.sample(others, N_CHOICES - 1) + [f["summary"]]
            rng.shuffle(options)
            choice.append({"prompt": docstring_prompt(f), "completion": f["summary"],
                           "choices": options, "label": options.index(f["summary"])})
        tasks["choice"][split] = choice
        tasks["preference"][split] = [
            {"prompt": c["prompt"], "chosen": c["completion"],
             "rejected": next(o for o in c["choices"] if o != c["completion"])} for c in choice]
    return tasks


def all_functions(modules: tuple[str, ...]) -> list[dict]:
    """functions_of every module, in order (sorted; within a module, documented_objects
    sorts by name), an alias defined twice kept once."""
    functions, seen = [], set()
    for name in modules:
        for f in functions_of(name, modules):
            if f["head"] not in seen:
                seen.add(f["head"])
                functions.append(f)
    return functions


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_more_train(folder: Path, tasks: dict) -> None:
    """FOLDER/{params,call,docstring}/train.jsonl: each task's train split, then the same
    records made from PRETRAIN_MODULES' functions. The base model read those modules' source
    in pretraining, so this is not the built-in task (whose every module is held out of the
    corpus); the validation and test splits, whose modules the model never read, are
    unchanged, and the README measures what the extra examples are worth."""
    extra = generation_records(all_functions(PRETRAIN_MODULES))
    for task, records in extra.items():
        write_jsonl(folder / task / "train.jsonl", tasks[task]["train"] + records)
        print(f"{task} (--more-train): train {len(tasks[task]['train'])} + {len(records)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--more-train", type=Path, metavar="DIR",
                        help="also write DIR/{params,call,docstring}/train.jsonl: the train "
                             "split plus records from the pretraining modules' functions")
    args = parser.parse_args()

    functions = all_functions(TASK_MODULES)
    tasks = build(functions, args.seed)
    for task, splits in tasks.items():
        for split, recs in splits.items():
            write_jsonl(args.out / task / f"{split}.jsonl", recs)
        print(f"{task}: " + ", ".join(f"{s} {len(r)}" for s, r in splits.items()))
    if args.more_train:
        write_more_train(args.more_train, tasks)
    meta = {"python": platform.python_version(), "seed": args.seed, "functions": len(functions),
            "modules": {s: sorted(m) for s, m in split_modules(functions, args.seed).items()}}
    (args.out / "build.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
