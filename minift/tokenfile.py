"""Memory-mapped token files: a text corpus tokenised once, read from disk on demand.

A corpus larger than memory cannot be a list of Python ints (~36 bytes a token). It is
tokenised once, document by document, into one flat array of token ids with eos after
every document (nanoGPT's layout), `tokens.bin` (uint16 when the vocabulary fits, else
uint32), beside a small `index.json`. The cache folder is named by the SHA-256 of the
file's bytes and of the tokenizer, so an edited file or another tokenizer gets a new one
and an unchanged pair is reused. TokenBlocks cuts the array into blocks exactly as
data.load_text cuts its in-memory stream; each block is read through a fresh memmap
(as nanoGPT does), so pages read once do not stay in the process's memory.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

from .formats import DataError

MEMMAP_BYTES = 16 * 2**20  # load_dataset's memmap=None: text files above this size
FORMAT = "minift-tokens-1"
_CHUNK_CHARS = 200_000     # documents are tokenised in batches of about this many characters


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "minift" / "tokens"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def _tokenizer_key(tokenizer) -> str:
    """SHA-256 of the whole tokenizer pipeline (vocab, merges, pre-tokenizer, added tokens)."""
    backend = getattr(tokenizer, "backend", None) or tokenizer.backend_tokenizer  # minift | HF
    return hashlib.sha256(f"{backend.to_str()}|{tokenizer.eos_token_id}".encode()).hexdigest()


def documents(path: Path) -> Iterator[str]:
    """The documents of a text file, read line by line: the same as
    data.split_documents(whole text), where a whitespace-only line separates documents."""
    lines, offset = [], 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} line {n}: not UTF-8 text (invalid byte "
                                f"0x{raw[e.start]:02x} at byte offset {offset + e.start}); "
                                "re-save the file as UTF-8") from None
            offset += len(raw)
            line = line[:-1] if line.endswith("\n") else line
            if line.strip():
                lines.append(line)
            elif lines:
                doc, lines = "\n".join(lines).strip(), []
                yield doc
    if lines:
        yield "\n".join(lines).strip()


def _write_tokens(path: Path, tokenizer, out: Path) -> tuple[int, int]:
    """Tokenise path's documents into out (eos after each) -> (tokens, documents)."""
    eos, dtype = tokenizer.eos_token_id, np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    n_tokens = n_docs = 0
    with open(out, "wb") as f:
        batch, chars = [], 0
        for doc in itertools.chain(documents(path), [None]):  # streamed; None: flush the last batch
            if doc is not None:
                batch.append(doc)
                chars += len(doc)
            if batch and (doc is None or chars >= _CHUNK_CHARS):
                ids = [t for x in tokenizer(batch)["input_ids"] for t in (*x, eos)]
                np.asarray(ids, dtype=dtype).tofile(f)
                n_tokens, n_docs, batch, chars = n_tokens + len(ids), n_docs + len(batch), [], 0
    return n_tokens, n_docs


def token_file(path: str | os.PathLike, tokenizer, cache_dir=None) -> Path:
    """The cache folder holding path's tokens.bin + index.json; built on first use."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token; documents end with eos")
    file_key, tok_key = _sha256_file(path), _tokenizer_key(tokenizer)
    folder = Path(cache_dir or default_cache()) / f"{file_key[:20]}-{tok_key[:20]}"
    if _valid(folder, file_key, tok_key):
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        n_tokens, n_docs = _write_tokens(path, tokenizer, tmp / "tokens.bin")
        dtype = "uint16" if len(tokenizer) <= 2**16 else "uint32"
        index = {"format": FORMAT, "source": str(path), "file_sha256": file_key,
                 "tokenizer_sha256": tok_key, "dtype": dtype, "tokens": n_tokens,
                 "documents": n_docs, "eos_token_id": tokenizer.eos_token_id}
        (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)  # a stale or broken one
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _valid(folder: Path, file_key: str, tok_key: str) -> bool:
    try:
        index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        size = (folder / "tokens.bin").stat().st_size
    except (OSError, ValueError):
        return False
    return (isinstance(index, dict) and index.get("format") == FORMAT
            and index.get("file_sha256") == file_key and index.get("tokenizer_sha256") == tok_key
            and index.get("dtype") in ("uint16", "uint32") and isinstance(index.get("tokens"), int)
            and size == index["tokens"] * np.dtype(index["dtype"]).itemsize)


class TokenBlocks:
    """Blocks of block_size tokens over a token file, indexed like load_text's list:
    len(blocks), blocks[i] -> {"input_ids", "labels"} (labels = input_ids)."""

    def __init__(self, folder: str | os.PathLike, block_size: int, indices=None):
        self.folder, self.block_size = Path(folder), block_size
        index = json.loads((self.folder / "index.json").read_text(encoding="utf-8"))
        self.dtype, self.n_tokens = np.dtype(index["dtype"]), index["tokens"]
        n_blocks = math.ceil(self.n_tokens / block_size)
        if self.n_tokens % block_size == 1:
            n_blocks -= 1  # a tail of one token has no next token to predict
        if n_blocks == 0:
            raise DataError(f"{index['source']}: no examples (the file holds no text)")
        self.indices = range(n_blocks) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        start = self.indices[i] * self.block_size
        tokens = np.memmap(self.folder / "tokens.bin", dtype=self.dtype, mode="r")
        ids = tokens[start:start + self.block_size].tolist()  # a copy; the map closes with `tokens`
        return {"input_ids": ids, "labels": list(ids)}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def select(self, indices) -> "TokenBlocks":
        """The blocks at these positions (train_val_split uses it), still on disk."""
        out = TokenBlocks.__new__(TokenBlocks)
        out.__dict__.update(self.__dict__, indices=[self.indices[i] for i in indices])
        return out
