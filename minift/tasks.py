"""The built-in tasks: what `minift finetune --task NAME` trains on and how it is scored.

Each task is a folder minift/assets/tasks/NAME/ with train / validation / test JSONL files,
built by scripts/make_dataset.py from standard-library modules the embedded model never
read (see that script for the formats):

    params     structured output   exact_match   the default: a format the base model lacks
    call       structured output   exact_match   another format over the same signatures
    choice     multiple choice     accuracy      which of 4 summaries fits the signature
    docstring  generation          rouge_l, f1   the first sentence of the docstring
    preference DPO pairs           reward_accuracy   the true summary over another one

`minift tasks` lists them with their sizes. The reference text for forgetting,
minift/assets/reference.txt, is held-out pretraining text (scripts/pretrain_tiny.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
TASKS_DIR = ASSETS / "tasks"
REFERENCE = ASSETS / "reference.txt"
SPLITS = ("train", "validation", "test")
DEFAULT_TASK = "params"


@dataclass(frozen=True)
class Task:
    name: str
    kind: str                   # "generate" (greedy answers), "choice" (log-likelihoods), "dpo"
    metrics: tuple[str, ...]    # report.json keys, the first is the one compare ranks by
    max_new_tokens: int         # room for the longest answer of the test split
    description: str

    def path(self, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return TASKS_DIR / self.name / f"{split}.jsonl"

    def records(self, split: str) -> list[dict]:
        with open(self.path(split), encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


TASKS = {t.name: t for t in (
    Task("params", "generate", ("exact_match", "f1"), 64,
         "list a signature's parameters as 'name: required; name: default X'"),
    Task("call", "generate", ("exact_match", "f1"), 40,
         "write a call with the required arguments: 'shutil.copyfile(src, dst)'"),
    Task("choice", "choice", ("accuracy",), 40,
         "which of 4 docstring summaries belongs to the signature"),
    Task("docstring", "generate", ("rouge_l", "f1", "exact_match"), 40,
         "write the first sentence of the docstring"),
    Task("preference", "dpo", ("reward_accuracy", "reward_margin"), 40,
         "prefer the true docstring summary to another function's (DPO pairs)"),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the built-in tasks are {', '.join(TASKS)} "
                         "(see `minift tasks`)")
    return TASKS[name]


def task_rows() -> list[dict]:
    """One row per task for `minift tasks`: name, kind, metrics, split sizes, description."""
    rows = []
    for t in TASKS.values():
        sizes = {s: sum(1 for line in open(t.path(s), encoding="utf-8") if line.strip())
                 for s in SPLITS if t.path(s).exists()}
        rows.append({"task": t.name, "kind": t.kind, "metrics": ", ".join(t.metrics), **sizes,
                     "description": t.description})
    return rows
