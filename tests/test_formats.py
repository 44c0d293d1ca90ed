"""minift.formats and minift.tokenfile: every file shape loads to the same examples as the
equivalent JSONL; instruction records, field mapping, errors naming file/row/column; the
memory-mapped token stream equals the in-memory one, and its cache is keyed and reused."""
import csv
import json
import os

import pytest

from minift.chat import chat_examples
from minift.data import (IGNORE_INDEX, DataError, load_dataset, load_text, split_documents,
                         train_val_split)
from minift.formats import INSTRUCTION_INPUT_TEMPLATE, INSTRUCTION_TEMPLATE
from minift.tokenfile import TokenBlocks, documents, token_file
from minift.tokenizer import Tokenizer

RECORDS = {
    "text": [{"text": "The cat sat on the mat."}, {"text": "café 日本語 🙂\nsecond line"}],
    "completion": [{"prompt": "Q: two plus two?\nA:", "completion": " four"},
                   {"prompt": "", "completion": "empty prompt, 🙂"}],
    "instruction": [{"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
                    {"instruction": "Say hi.", "output": "hi"},
                    {"instruction": "Say hi.", "input": "", "output": "hi"}],
    "chat": [{"messages": [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello, café"}]},
             {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "4"},
                           {"role": "user", "content": "and 3+3?"},
                           {"role": "assistant", "content": "6"}]}],
}


@pytest.fixture(scope="module")
def tok():
    corpus = [json.dumps(r, ensure_ascii=False) for rs in RECORDS.values() for r in rs] * 10
    return Tokenizer.train_bpe(corpus + ["### Instruction: Response: Input:"] * 5, vocab_size=320)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    return path


def write_csv(path, records, delimiter=","):
    columns = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(columns)
        for r in records:  # a chat file's "messages" cell holds the JSON list
            w.writerow([json.dumps(r[c]) if isinstance(r.get(c), list) else r.get(c, "")
                        for c in columns])
    return path


def test_instruction_records_use_the_documented_template(tok, tmp_path):
    data = load_dataset(write_jsonl(tmp_path / "i.jsonl", RECORDS["instruction"]), tok)
    prompts = [INSTRUCTION_INPUT_TEMPLATE.format(instruction="Add the numbers.", input="2, 3"),
               INSTRUCTION_TEMPLATE.format(instruction="Say hi."),
               INSTRUCTION_TEMPLATE.format(instruction="Say hi.")]  # an empty input is no input
    assert prompts[0] == "### Instruction:\nAdd the numbers.\n\n### Input:\n2, 3\n\n### Response:\n"
    for ex, prompt, rec in zip(data, prompts, RECORDS["instruction"]):
        p, c = tok.encode(prompt), tok.encode(rec["output"])
        assert ex["input_ids"] == p + c + [tok.eos_token_id]
        assert ex["labels"] == [IGNORE_INDEX] * len(p) + c + [tok.eos_token_id]


@pytest.mark.parametrize("kind", list(RECORDS))
def test_every_file_shape_loads_to_the_jsonl_examples(tok, tmp_path, kind):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet  # noqa: F401
    datasets = pytest.importorskip("datasets")
    records = RECORDS[kind]
    if kind != "chat":  # columns must be the same in every row of a table
        columns = list(dict.fromkeys(k for r in records for k in r))
        records = [{c: r.get(c, "") for c in columns} for r in records]
    expected = load_dataset(write_jsonl(tmp_path / "d.jsonl", records), tok, max_length=64)
    if kind == "chat":
        assert expected == chat_examples(tok, [r["messages"] for r in records], ["x"] * 2, 64)
    table = pa.Table.from_pylist(records)
    pa.parquet.write_table(table, tmp_path / "d.parquet")
    with pa.ipc.new_file(tmp_path / "d.arrow", table.schema) as w:
        w.write_table(table)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    write_csv(tmp_path / "d.csv", records)
    write_csv(tmp_path / "d.tsv", records, delimiter="\t")
    for name in ("d.csv", "d.tsv", "d.parquet", "d.arrow", "saved"):
        assert load_dataset(tmp_path / name, tok, max_length=64) == expected, name


def test_a_dataset_in_the_local_hugging_face_cache(tok, tmp_path, monkeypatch):
    """A cache entry written by datasets' own JSON builder loads offline by its name."""
    datasets = pytest.importorskip("datasets")
    from datasets.packaged_modules.json.json import Json
    source = write_jsonl(tmp_path / "qa.jsonl", RECORDS["completion"])
    expected = load_dataset(source, tok)
    cache = tmp_path / "hf-cache"
    for split in ("train", "validation"):
        Json(cache_dir=str(cache), dataset_name="toy_qa", data_files={split: str(source)},
             hash=split).download_and_prepare()
    # a hub id org/name lives in org___name (datasets' layout)
    Json(cache_dir=str(cache), dataset_name="someone___toy_qa", data_files={"train": str(source)},
         hash="x").download_and_prepare()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    assert load_dataset("toy_qa", tok) == expected == load_dataset("toy_qa:validation", tok)
    assert load_dataset("someone/toy_qa", tok) == expected
    with pytest.raises(DataError, match=r"toy_qa:test: no such file, and no 'test' split .*never "
                                        r"downloads"):
        load_dataset("toy_qa:test", tok)


def test_field_mapping(tok, tmp_path):
    rows = [{"question": r["prompt"], "answer": r["completion"], "id": "7"}
            for r in RECORDS["completion"]]
    expected = load_dataset(write_jsonl(tmp_path / "pc.jsonl", RECORDS["completion"]), tok)
    fields = {"prompt": "question", "completion": "answer"}
    assert load_dataset(write_csv(tmp_path / "q.csv", rows), tok, fields=fields) == expected
    assert load_dataset(write_jsonl(tmp_path / "q.jsonl", rows), tok, fields=fields) == expected
    # a column named like a minift field is ignored when another column is mapped onto it
    shadow = [{**r, "prompt": "ignored"} for r in rows]
    assert load_dataset(write_jsonl(tmp_path / "s.jsonl", shadow), tok, fields=fields) == expected
    with pytest.raises(DataError, match=r'q.csv row 1: missing "reply" \(as completion\), .*'
                                        r'\(fields found: "question", "answer", "id"\)'):
        load_dataset(tmp_path / "q.csv", tok, fields={"prompt": "question", "completion": "reply"})
    with pytest.raises(DataError, match=r"fields: unknown field 'answer'"):
        load_dataset(tmp_path / "q.csv", tok, fields={"answer": "answer"})
    with pytest.raises(DataError, match=r'q.csv row 1: expected \{"text"\}.*fields found: '
                                        r'"question", "answer", "id"'):
        load_dataset(tmp_path / "q.csv", tok)


def test_table_errors_name_file_row_and_column(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet  # noqa: F401
    datasets = pytest.importorskip("datasets")

    def refused(name, content, message, **kw):
        path = tmp_path / name
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        with pytest.raises(DataError, match=message):
            load_dataset(path, tok, **kw)

    refused("a.csv", "prompt,completion\nq,a\n\nq2\n", r"a.csv row 2 \(line 4\): 1 cells, "
                                                       r"but the header has 2 columns")
    refused("b.csv", "prompt,prompt\nq,a\n", r"b.csv line 1: the header row needs distinct")
    refused("c.csv", 'prompt,completion\nq,"a"b\n', r"c.csv line 2: not valid CSV: ',' expected")
    refused("c2.csv", 'text\n"' + "x" * 200_000 + '"\n', r"c2.csv line 2: not valid CSV: field "
                                                        r"larger than field limit")
    refused("d.csv", b"text\n\xff\n", r"d.csv line 2: not UTF-8")
    refused("e.csv", "messages\n[not json\n", r"e.csv row 1, field \"messages\": invalid JSON")
    refused("f.tsv", "text\n\n", r"f.tsv: no examples")
    refused("g.parquet", b"PAR1 not really", r"g.parquet: not a readable .parquet table")
    pa.parquet.write_table(pa.table({"prompt": ["a", "b"], "completion": ["x", None]}),
                           tmp_path / "h.parquet")
    with pytest.raises(DataError, match=r'h.parquet row 2: field "completion" must be a string, '
                                        r"got NoneType"):
        load_dataset(tmp_path / "h.parquet", tok)
    pa.parquet.write_table(pa.table({"question": ["a"], "answer": [3]}), tmp_path / "i.parquet")
    with pytest.raises(DataError, match=r'i.parquet row 1: field "answer" \(as completion\) must '
                                        r"be a string, got int"):
        load_dataset(tmp_path / "i.parquet", tok, fields={"prompt": "question",
                                                          "completion": "answer"})
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS["text"]),
                                   "test": datasets.Dataset.from_list(RECORDS["text"])})
    splits.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dd: a dataset with splits test, train; pass one of them"):
        load_dataset(tmp_path / "dd", tok)
    assert len(load_dataset(tmp_path / "dd" / "train", tok)) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: a folder, but not a saved dataset"):
        load_dataset(tmp_path / "empty", tok)
    state = tmp_path / "dd" / "test" / "state.json"
    state.write_text(json.dumps({"_data_files": [{"filename": "../train/x.arrow"}]}))
    with pytest.raises(DataError, match=r"state.json: data file 'x.arrow' leaves the folder"):
        load_dataset(tmp_path / "dd" / "test", tok)


# ----------------------------------------------------------------------------- token files
def corpus(n_docs, seed=0):
    """Documents with the separators and odd whitespace load_text must agree on."""
    import random
    rng = random.Random(seed)
    words = ["the", "cat", "café", "日本語", "🙂", "naïve", "mat.", "x\u2028y", "tab\there", "\r"]
    seps = ["\n\n", "\n \t\n", "\r\n\r\n", "\n\n\n\n", "\n\u3000\n", "\n\x0c\n"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randrange(1, 60)))
            + rng.choice(["", "\nsecond line", "  "]) for _ in range(n_docs)]
    return "\ufeff" + "".join(d + rng.choice(seps) for d in docs)


def test_streamed_documents_equal_the_in_memory_split(tmp_path):
    for text in (corpus(300, seed=1), "  \n a\n\n", "a\n\n", "\n\n\nb", "a\nb\n \nc", "", "\n"):
        path = tmp_path / "c.txt"
        path.write_text(text, encoding="utf-8", newline="")
        assert list(documents(path)) == split_documents(text.removeprefix("\ufeff")), repr(text)


def test_memmap_token_stream_equals_the_in_memory_one(tok, tmp_path):
    path = tmp_path / "corpus.txt"
    text = corpus(12000)
    path.write_text(text, encoding="utf-8", newline="")   # ~2 MB
    assert path.stat().st_size > 2_000_000
    cache = tmp_path / "cache"
    for block in (257, 1024):
        in_memory = load_text(path, tok, block)
        mapped = load_text(path, tok, block, memmap=True, cache_dir=cache)
        assert isinstance(mapped, TokenBlocks) and len(mapped) == len(in_memory)
        assert list(mapped) == in_memory
    (folder,) = [p for p in cache.iterdir()]
    index = json.loads((folder / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["documents"] == len(split_documents(text[1:]))
    train, val = train_val_split(mapped, 0.1, seed=0)     # stays on disk, same split as a list
    ref_train, ref_val = train_val_split(in_memory, 0.1, seed=0)
    assert isinstance(val, TokenBlocks) and list(train) == ref_train and list(val) == ref_val


def test_token_cache_is_keyed_by_file_and_tokenizer_and_reused(tok, tmp_path, monkeypatch):
    path = tmp_path / "small.txt"
    path.write_text("one doc\n\ntwo doc\n", encoding="utf-8")
    cache = tmp_path / "cache"
    first = token_file(path, tok, cache)
    stamp = (first / "tokens.bin").stat().st_mtime_ns
    assert token_file(path, tok, cache) == first                       # reused, not rewritten
    assert (first / "tokens.bin").stat().st_mtime_ns == stamp
    other = Tokenizer.train_bpe(["something else entirely"] * 5, vocab_size=280)
    assert token_file(path, other, cache) != first                     # another tokenizer
    path.write_text("one doc\n\nthree doc\n", encoding="utf-8")
    edited = token_file(path, tok, cache)
    assert edited != first and list(TokenBlocks(edited, 64)) == load_text(path, tok, 64)
    (edited / "tokens.bin").write_bytes(b"\x00")                        # broken: rebuilt
    assert list(TokenBlocks(token_file(path, tok, cache), 64)) == load_text(path, tok, 64)
    # load_dataset maps files above MEMMAP_BYTES, into ~/.cache/minift/tokens by default
    monkeypatch.setattr("minift.data.MEMMAP_BYTES", 10)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    auto = load_dataset(path, tok, max_length=64)
    assert isinstance(auto, TokenBlocks) and list(auto) == load_text(path, tok, 64)
    assert (tmp_path / "xdg" / "minift" / "tokens").is_dir()
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"bad.txt line 3: not UTF-8 .*byte offset 9"):
        load_text(bad, tok, 8, memmap=True, cache_dir=cache)
    with pytest.raises(DataError, match=r"bad.txt line 3: not UTF-8 .*byte offset 9"):
        load_text(bad, tok, 8)
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(DataError, match="blank.txt: no examples"):
        load_text(tmp_path / "blank.txt", tok, 8, memmap=True, cache_dir=cache)
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]     # no half-written folders
    assert os.environ["XDG_CACHE_HOME"] == str(tmp_path / "xdg")


def test_eval_records_and_fields_option(tok, tmp_path):
    from minift.chat import eval_record
    from minift.data import eval_records
    from minift.formats import parse_fields
    assert parse_fields("prompt=question, completion=answer") == {"prompt": "question",
                                                                  "completion": "answer"}
    for bad, message in (("prompt", "expected FIELD=COLUMN"), ("prompt=", "expected FIELD"),
                         ("prompt=a,prompt=b", "mapped twice"), ("answer=x", "unknown field")):
        with pytest.raises(DataError, match=message):
            parse_fields(bad)
    pairs = write_jsonl(tmp_path / "p.jsonl", RECORDS["completion"])
    assert eval_records(pairs, tok) == ("completion", RECORDS["completion"])
    kind, alpaca = eval_records(write_jsonl(tmp_path / "i.jsonl", RECORDS["instruction"]), tok)
    assert kind == "instruction"
    assert [r["completion"] for r in alpaca] == ["5", "hi", "hi"]
    assert alpaca[1]["prompt"] == INSTRUCTION_TEMPLATE.format(instruction="Say hi.")
    kind, chats = eval_records(write_jsonl(tmp_path / "c.jsonl", RECORDS["chat"]), tok)
    assert kind == "chat"
    assert chats == [eval_record(tok, r["messages"]) for r in RECORDS["chat"]]
    assert chats[1] == {"prompt": "### System:\nBe brief.\n\n### User:\n2+2?\n\n### Assistant:\n4"
                                  "<|endoftext|>\n\n### User:\nand 3+3?\n\n### Assistant:\n",
                        "completion": "6"}
    assert eval_records(write_jsonl(tmp_path / "t.jsonl", RECORDS["text"]), tok) == ("text", [])
