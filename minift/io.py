"""Writing files so that a crash never leaves half of one: every file minift writes (model and
adapter folders, run folders, reports) goes through these helpers.

Each writes `path.tmp` next to the target and renames it over the target with os.replace,
which is atomic on POSIX and Windows: a reader sees the old file or the new one, never a
truncated mix. (A checkpoint folder, several files that belong together, is made atomic a
level up: rundir.write_checkpoint_dir writes a temporary folder and renames it.)

Files are JSON and safetensors only; nothing minift writes needs pickle to read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) for a temporary path next to `path`, then rename it to `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)   # only left over when write() or the rename failed


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj) -> None:
    """`obj` as indented JSON (nan and inf as JavaScript's NaN / Infinity, as json does)."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> None:
    """A safetensors file; tensors must not share memory (safetensors refuses that)."""
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
