"""The file formats minift reads, as records: JSONL, CSV/TSV, Parquet, Arrow and Hugging
Face `datasets` folders; each record's kind, decided once per file.

A reader yields (where, record): `where` names the file and line or row ("d.csv row 3")
for error messages, `record` maps field -> value. `fields` maps minift's field names to
the file's own columns ({"prompt": "question"}), so a file need not be rewritten.

Kinds (the first record decides the file's kind; a later record of another kind is an
error naming its line, not a guess). Extra fields are ignored.

  text         {"text"}                                 loss on every token
  completion   {"prompt", "completion"}                 loss on the completion and eos
  instruction  {"instruction", "input"?, "output"}      a prompt/completion pair, prompt
                                                        from INSTRUCTION_TEMPLATE
  chat         {"messages": [{"role", "content"}, ...]}  loss on assistant turns (minift.chat)
  preference   {"prompt", "chosen", "rejected"}         a DPO pair (minift.preference)

CSV/TSV use the standard library (a header row names the columns; a chat file's
"messages" cell holds the JSON list). Parquet and Arrow need pyarrow (the `tables`
extra), imported on first use.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Iterator

IGNORE_INDEX = -100  # labels with this value add no loss (F.cross_entropy's default)

KINDS = {"text": ("text",), "completion": ("prompt", "completion"),
         "instruction": ("instruction", "output"), "chat": ("messages",),
         "preference": ("prompt", "chosen", "rejected")}
OPTIONAL = {"instruction": ("input",)}
# the fields that say a record's kind: "prompt" is in two kinds, so it says none (a record
# with a prompt and no other of these is a completion record missing its completion)
MARKS = {"text": ("text",), "completion": ("completion",), "instruction": ("instruction", "output"),
         "chat": ("messages",), "preference": ("chosen", "rejected")}
FIELDS = ("text", "prompt", "completion", "instruction", "input", "output", "messages",
          "chosen", "rejected")
EXPECTED = ('expected {"text"}, {"prompt", "completion"}, {"instruction", "output"}, '
            '{"messages"} or {"prompt", "chosen", "rejected"}')

# An instruction record's prompt; "### Input" only when "input" is non-empty. The output
# follows the prompt and is trained on, with eos after it.
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_INPUT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
SUFFIXES = (".txt", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow")
HUB_ID = re.compile(r"(?P<id>[\w.-]+(?:/[\w.-]+)?)(?::(?P<split>[\w.-]+))?")  # org/name:split


class DataError(ValueError):
    """A problem in the user's data or data options; the message names the file and line."""


def instruction_prompt(instruction: str, input: str = "") -> str:
    if input:
        return INSTRUCTION_INPUT_TEMPLATE.format(instruction=instruction, input=input)
    return INSTRUCTION_TEMPLATE.format(instruction=instruction)


# ----------------------------------------------------------------------------- readers
def read_utf8(path: Path) -> str:
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


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # e.g. a 5000-digit number, or [[[[... nested too deep
        raise DataError(f"{where}: invalid JSON: {type(e).__name__}: {str(e)[:100]}") from None


def jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    # split("\n"), not splitlines(): JSON strings may hold U+2028 etc., which splitlines breaks on
    for n, line in enumerate(read_utf8(path).split("\n"), 1):
        if line.strip():
            yield f"{path} line {n}", _json(line, f"{path} line {n}")


def csv_rows(path: Path, delimiter: str) -> Iterator[tuple[str, dict]]:
    reader = csv.reader(io.StringIO(read_utf8(path), newline=""), delimiter=delimiter,
                        strict=True)  # strict: a stray quote is an error, not a guess
    header, row_no, line = None, 0, 1
    try:
        for cells in reader:
            where, line = f"line {line}", reader.line_num + 1  # the line the record starts on
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue  # a blank line
            if header is None:
                header = [c.strip() for c in cells]
                if "" in header or len(set(header)) < len(header):
                    raise DataError(f"{path} {where}: the header row needs distinct, non-empty column "
                                    f"names, got {header}")
                continue
            row_no += 1
            if len(cells) != len(header):
                raise DataError(f"{path} row {row_no} ({where}): {len(cells)} cells, but the "
                                f"header has {len(header)} columns")
            yield f"{path} row {row_no}", dict(zip(header, cells))
    except csv.Error as e:  # a stray quote, a field over csv.field_size_limit(), ...
        raise DataError(f"{path} line {reader.line_num}: not valid CSV: {e}") from None


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise ImportError("reading Parquet and Arrow files needs pyarrow: "
                          "pip install 'minift[tables]'") from None
    return pyarrow


def _arrow_batches(path: Path, pa):
    """Record batches of an Arrow IPC file, or of a stream (what `datasets` writes)."""
    try:
        reader = pa.ipc.open_file(path)
        return [reader.get_batch(i) for i in range(reader.num_record_batches)]
    except pa.ArrowInvalid:
        with pa.ipc.open_stream(path) as reader:
            return list(reader)


def table_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """Rows of a .parquet or .arrow file, or of a `datasets` save_to_disk folder."""
    pa = _pyarrow()
    if path.is_dir():
        files = _dataset_folder_files(path)
    elif not path.is_file():
        raise DataError(f"{path}: no such file")
    else:
        files = [path]
    row = 0
    for file in files:
        try:
            if file.suffix.lower() == ".parquet":
                batches = pa.parquet.ParquetFile(file).iter_batches(batch_size=1024)
            else:
                batches = _arrow_batches(file, pa)
            for batch in batches:
                batch.validate(full=True)  # a flipped byte must not reach to_pylist (it crashes)
                for rec in batch.to_pylist():
                    row += 1
                    yield f"{path} row {row}", rec
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{file}: not a readable {file.suffix or 'Arrow'} table "
                            f"({type(e).__name__}: {str(e)[:200]})") from None


def _dataset_folder_files(folder: Path) -> list[Path]:
    """The Arrow files of a `datasets` Dataset.save_to_disk folder, in order (state.json)."""
    if (folder / "dataset_dict.json").is_file():
        splits = [p.name for p in sorted(folder.iterdir()) if (p / "state.json").is_file()]
        raise DataError(f"{folder}: a dataset with splits {', '.join(splits) or '(none)'}; "
                        f"pass one of them, e.g. {folder / (splits[0] if splits else 'train')}")
    state = folder / "state.json"
    if not state.is_file():
        raise DataError(f"{folder}: a folder, but not a saved dataset (no state.json)")
    names = _json(read_utf8(state), str(state))
    names = names.get("_data_files") if isinstance(names, dict) else None
    if not isinstance(names, list) or not all(isinstance(f, dict) and isinstance(
            f.get("filename"), str) for f in names):
        raise DataError(f"{state}: expected \"_data_files\": [{{\"filename\": ...}}, ...]")
    files = [folder / f["filename"] for f in names]
    for f in files:  # never read outside the folder
        if f.resolve().parent != folder.resolve():
            raise DataError(f"{state}: data file {f.name!r} leaves the folder")
    return files


def hub_rows(spec: str) -> Iterator[tuple[str, dict]]:
    """Rows of a Hugging Face dataset already in the local datasets cache: "org/name" or
    "org/name:split" (default train), read offline through `datasets` (never downloads).
    The cache holds {org}___{name}/{config}/{version}/{hash}/{name}-{split}[-k-of-n].arrow;
    the most recently written config is used, as datasets does offline."""
    try:
        import datasets
        from datasets.naming import camelcase_to_snakecase
    except ImportError:
        raise ImportError(f"{spec}: no such file; reading a Hugging Face dataset id needs "
                          "datasets: pip install 'minift[hf]'") from None
    m = HUB_ID.fullmatch(spec)
    parts = m["id"].split("/")
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "___".join(
        parts[:-1] + [camelcase_to_snakecase(parts[-1])])
    split = m["split"] or "train"
    files = [*folder.glob(f"*/*/*/*-{split}.arrow"), *folder.glob(f"*/*/*/*-{split}-*-of-*.arrow")]
    if not files:
        raise DataError(f"{spec}: no such file, and no {split!r} split of a dataset {m['id']!r} "
                        f"in the local datasets cache ({folder}); minift reads the cache, "
                        "it never downloads")
    newest = max({f.parent for f in files}, key=lambda d: d.stat().st_mtime)
    shards = sorted(f for f in files if f.parent == newest)
    table = datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in shards])
    for i, rec in enumerate(table, 1):
        yield f"{spec} row {i}", rec


def rows(path: Path) -> Iterator[tuple[str, object]]:
    """The reader for a path, by its suffix (a folder: a saved `datasets` dataset; a
    name that is no file: a dataset id in the local Hugging Face cache)."""
    suffix = path.suffix.lower()
    if path.is_dir():
        return table_rows(path)
    if not path.exists() and suffix not in SUFFIXES and HUB_ID.fullmatch(str(path)):
        return hub_rows(str(path))
    if suffix == ".jsonl":
        return jsonl_rows(path)
    if suffix in (".csv", ".tsv"):
        return csv_rows(path, "," if suffix == ".csv" else "\t")
    if suffix in (".parquet", ".arrow"):
        return table_rows(path)
    raise DataError(f"{path}: unknown file type {suffix or '(no suffix)'!r}; expected .txt, "
                    ".jsonl, .csv, .tsv, .parquet, .arrow or a saved `datasets` folder")


# ----------------------------------------------------------------------------- records
def check_fields(fields: dict | None) -> dict:
    """{minift name: the file's column}; checked once, before reading."""
    fields = dict(fields or {})
    for key, col in fields.items():
        if key not in FIELDS:
            raise DataError(f"fields: unknown field {key!r}; the fields are {', '.join(FIELDS)}")
        if not isinstance(col, str) or not col:
            raise DataError(f"fields: {key!r} must map to a column name, got {col!r}")
    return fields


def parse_fields(text: str) -> dict:
    """--fields "prompt=question,completion=answer" -> {"prompt": "question", ...}, checked."""
    fields = {}
    for item in (x.strip() for x in text.split(",")):
        key, eq, col = item.partition("=")
        if not eq or not key.strip() or not col.strip():
            raise DataError(f"--fields: expected FIELD=COLUMN[,FIELD=COLUMN...], got {item!r}")
        if key.strip() in fields:
            raise DataError(f"--fields: {key.strip()!r} is mapped twice")
        fields[key.strip()] = col.strip()
    return check_fields(fields)


def _rename(rec: dict, fields: dict) -> dict:
    source = {col: key for key, col in fields.items()}
    return {source.get(k, k): v for k, v in rec.items() if k in source or k not in fields}


def _string(value, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name} must be a string, got {type(value).__name__}")
    try:  # JSON escapes can smuggle in a lone surrogate ("\\ud800"), which no tokenizer encodes
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: field {name} holds invalid unicode "
                        f"(an unpaired surrogate at character {e.start})") from None
    return value


def _messages(value, where: str, name: str) -> list[dict]:
    if isinstance(value, str):  # a CSV cell holds the JSON list
        value = _json(value, f"{where}, field {name}")
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {name} must be a non-empty list of "
                        f"{{\"role\", \"content\"}} messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {name}[{i}] must be a {{\"role\", \"content\"}} object, "
                            f"got {type(m).__name__}")
        m = {k: v for k, v in m.items() if v is not None}  # as transformers: None = absent
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"{where}: {name}[{i}] has no \"{key}\"")
            _string(m[key], where, f'{name}[{i}]["{key}"]')
        out.append(m)
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: field {name} has no \"assistant\" message, so nothing to train on")
    return out


def _kind(rec, where: str, fields: dict) -> str:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: {EXPECTED}, got a JSON {type(rec).__name__}")
    kinds = [k for k, marks in MARKS.items() if any(f in rec for f in marks)]
    if "prompt" in rec and not {"completion", "preference"} & set(kinds):
        kinds.append("completion")
    if len(kinds) > 1:
        a, b = (next(f for f in MARKS[k] + KINDS[k] if f in rec) for k in kinds[:2])
        raise DataError(f"{where}: has both {_name(a, fields)} and {_name(b, fields)} "
                        f"(fields of {kinds[0]!r} and {kinds[1]!r} records); keep one kind per file")
    if not kinds:
        found = ", ".join(map(json.dumps, list(rec)[:8])) or "none"
        raise DataError(f"{where}: {EXPECTED} (fields found: {found}); map other column names "
                        f"with fields / --fields, e.g. prompt=question")
    return kinds[0]


def _name(field: str, fields: dict) -> str:
    col = fields.get(field, field)
    return json.dumps(col) + ("" if col == field else f" (as {field})")


def parse(rec, where: str, kind: str | None, fields: dict):
    """Check one record -> (kind, payload): text -> str, completion and instruction ->
    (prompt, completion), chat -> messages, preference -> (prompt, chosen, rejected).
    `kind`: the file's kind (None: decide it)."""
    columns = ", ".join(map(json.dumps, list(rec)[:8])) if isinstance(rec, dict) else ""
    if isinstance(rec, dict):
        rec = _rename(rec, fields)
    this = _kind(rec, where, fields)
    if kind is not None and this != kind:
        raise DataError(f"{where}: a record of kind {this!r} in a file of kind {kind!r} "
                        f"(decided by its first record); a file holds one kind")
    for f in KINDS[this]:
        if f not in rec:
            raise DataError(f"{where}: missing {_name(f, fields)}, which a record of kind "
                            f"{this!r} needs (fields found: {columns or 'none'})")
    if this == "chat":
        return this, _messages(rec["messages"], where, _name("messages", fields))
    values = {f: _string(rec[f], where, _name(f, fields))
              for f in KINDS[this] + OPTIONAL.get(this, ()) if f in rec}
    if this == "text":
        if not values["text"]:
            raise DataError(f"{where}: {_name('text', fields)} is empty")
        return this, values["text"]
    if this == "instruction":
        prompt = instruction_prompt(values["instruction"], values.get("input", ""))
        return this, (prompt, values["output"])
    if this == "preference":
        return this, (values["prompt"], values["chosen"], values["rejected"])
    return this, (values["prompt"], values["completion"])


def read_records(path: Path, fields: dict | None = None,
                 jsonl: bool = False) -> tuple[str, list[tuple[str, object]]]:
    """Every record of a data file, checked -> (kind, [(where, payload), ...]).
    jsonl=True reads the file as JSONL whatever its suffix."""
    fields = check_fields(fields)
    kind, records = None, []
    for where, rec in (jsonl_rows(path) if jsonl else rows(path)):
        kind, payload = parse(rec, where, kind, fields)
        records.append((where, payload))
    if not records:
        raise DataError(f"{path}: no examples (the file is empty or holds only blank lines)")
    return kind, records
