"""minift.data: loading, masking, packing, batching, splitting, augmentation, errors."""
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minift.data import (IGNORE_INDEX, DataError, back_translate, collate, load_dataset,
                         load_jsonl, load_text, random_deletion, random_swap, shuffled_batches,
                         synonym_replacement, train_val_split)
from minift.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    corpus = ["Question: what is two plus two? Answer: four.", "The cat sat on the mat.",
              "Unicode café 日本語 🙂", "  spaced   out\ttext\n"] * 10
    return Tokenizer.train_bpe(corpus, vocab_size=350)


def write(tmp_path, name, content):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


# ----------------------------------------------------------------------------- loading
def test_prompt_completion_masking_is_exact(tok, tmp_path):
    recs = [{"prompt": "Question: what is two plus two? Answer:", "completion": " four."},
            {"prompt": "", "completion": "café 🙂"}]
    path = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in recs) + "\n")
    data = load_jsonl(path, tok)
    assert len(data) == 2
    for ex, r in zip(data, recs):
        p, c = tok.encode(r["prompt"]), tok.encode(r["completion"])
        assert ex["input_ids"] == p + c + [tok.eos_token_id]
        assert ex["labels"] == [IGNORE_INDEX] * len(p) + c + [tok.eos_token_id]


def test_text_records_and_truncation(tok, tmp_path):
    path = write(tmp_path, "t.jsonl", '{"text": "The cat sat on the mat."}\n\n  \n{"text": "a"}')
    full = tok.encode("The cat sat on the mat.") + [tok.eos_token_id]
    data = load_jsonl(path, tok)
    assert [ex["input_ids"] for ex in data] == [full, tok.encode("a") + [tok.eos_token_id]]
    assert all(ex["labels"] == ex["input_ids"] for ex in data)
    short = load_jsonl(path, tok, max_length=3)
    assert short[0]["input_ids"] == full[:3] and short[0]["labels"] == full[:3]  # keeps the start
    qa = write(tmp_path, "qa.jsonl", json.dumps({"prompt": "The cat sat on", "completion": " the mat."}))
    p = tok.encode("The cat sat on")
    ex = load_jsonl(qa, tok, max_length=len(p) + 1)[0]
    assert ex["labels"] == [IGNORE_INDEX] * len(p) + tok.encode(" the mat.")[:1]
    with pytest.raises(DataError, match=r"qa.jsonl line 1: the prompt is"):
        load_jsonl(qa, tok, max_length=len(p))


def test_text_file_packing(tok, tmp_path):
    docs = ["The cat sat on the mat.", "Unicode café 日本語 🙂\nsecond line", "last one"]
    path = write(tmp_path, "d.txt", "\n\n".join(docs) + "\n\n \n")
    stream = [t for d in docs for t in tok.encode(d) + [tok.eos_token_id]]
    blocks = load_text(path, tok, block_size=8)
    assert [t for b in blocks for t in b["input_ids"]] == stream  # nothing lost, eos after each doc
    assert all(len(b["input_ids"]) == 8 for b in blocks[:-1]) and len(blocks[-1]["input_ids"]) <= 8
    assert all(b["labels"] == b["input_ids"] for b in blocks)
    assert load_dataset(path, tok, block_size=8) == blocks
    # a tail of one token has nothing to predict, so it is dropped
    exact = load_text(path, tok, block_size=len(stream) - 1)
    assert len(exact) == 1 and exact[0]["input_ids"] == stream[:-1]


def test_crlf_and_bom(tok, tmp_path):
    path = write(tmp_path, "w.jsonl", b'\xef\xbb\xbf{"text": "hi"}\r\n\r\n{"text": "yo"}\r\n')
    assert len(load_jsonl(path, tok)) == 2
    # a raw U+2028 inside a JSON string is legal and must not split the line
    path = write(tmp_path, "s.jsonl", json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n")
    assert load_jsonl(path, tok)[0]["input_ids"] == tok.encode("a\u2028b", add_eos=True)
    path = write(tmp_path, "w.txt", b"one doc\r\n\r\ntwo doc\r\n")
    ids = load_text(path, tok, block_size=100)[0]["input_ids"]
    assert ids.count(tok.eos_token_id) == 2


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": "ok"\n', r"d.jsonl line 2: invalid JSON"),
    ('\n\n{"prompt": "x"}\n', r'd.jsonl line 3: .*missing "completion"'),
    ('{"text": 3}\n', r'd.jsonl line 1: field "text" must be a string, got int'),
    ('{"prompt": "a", "completion": null}\n', r'd.jsonl line 1: field "completion" must be a string'),
    ('["text"]\n', r"d.jsonl line 1: expected .* got a JSON list"),
    ('{"foo": "bar"}\n', r'd.jsonl line 1: expected \{"text"\}.* \(fields found: "foo"\)'),
    ('{"text": "a"}\n{"prompt": "b", "completion": "c"}\n',
     r"d.jsonl line 2: a record of kind 'completion' in a file of kind 'text'"),
    ('{"prompt": "a", "chosen": "b"}\n',
     r'd.jsonl line 1: missing "rejected", which a record of kind \'preference\' needs'),
    ('{"prompt": "a", "completion": "b", "chosen": "c"}\n', r"d.jsonl line 1: has both"),
    ('{"instruction": "a"}\n', r'd.jsonl line 1: missing "output", which a record of kind \'instruction\' needs'),
    ('{"messages": []}\n', r'd.jsonl line 1: field "messages" must be a non-empty list'),
    ('{"messages": [{"role": "user"}]}\n', r'd.jsonl line 1: "messages"\[0\] has no "content"'),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', r'd.jsonl line 1: .*no "assistant"'),
    ('{"text": ""}\n', r'd.jsonl line 1: "text" is empty'),
    ('{"text": "a", "prompt": "b"}\n', r"d.jsonl line 1: has both"),
    ('{"text": "\\ud800"}\n', r"d.jsonl line 1: .*invalid unicode"),
    ("[" * 100000 + "\n", r"d.jsonl line 1: invalid JSON"),
    ('{"text": ' + "1" * 5000 + "}\n", r"d.jsonl line 1: invalid JSON"),
    ("\n  \n\n", r"d.jsonl: no examples"),
    ("", r"d.jsonl: no examples"),
])
def test_jsonl_errors_name_file_and_line(tok, tmp_path, content, message):
    path = write(tmp_path, "d.jsonl", content)
    with pytest.raises(DataError, match=message):
        load_jsonl(path, tok)
    assert path.read_text() == content  # the file on disk is untouched


def test_file_errors(tok, tmp_path):
    bad = write(tmp_path, "bad.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2: not UTF-8 .*byte offset 28"):
        load_jsonl(bad, tok)
    with pytest.raises(DataError, match=r"nope.jsonl: no such file"):
        load_dataset(tmp_path / "nope.jsonl", tok)
    with pytest.raises(DataError, match=r"x.xls: unknown file type '.xls'"):
        load_dataset(write(tmp_path, "x.xls", "a,b"), tok)
    with pytest.raises(DataError, match=r"e.txt: no examples"):
        load_text(write(tmp_path, "e.txt", "\n \n"), tok, block_size=4)
    with pytest.raises(DataError, match="block_size"):
        load_text(write(tmp_path, "f.txt", "hi"), tok, block_size=1)
    assert issubclass(DataError, ValueError)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                         st.lists(st.one_of(st.none(), st.text(max_size=20), st.integers()))
                         .map(lambda xs: json.dumps({"prompt": xs[0] if xs else None, "completion":
                                                     xs[-1] if xs else 1}).encode())))
def test_odd_inputs_raise_only_data_error(tok, tmp_path, content):
    for name in ("fuzz.jsonl", "fuzz.txt"):
        path = write(tmp_path, name, content)
        try:
            data = load_dataset(path, tok, block_size=4, max_length=8)
        except DataError:
            continue
        assert data and all(len(ex["input_ids"]) == len(ex["labels"]) <= 8 for ex in data)


# ----------------------------------------------------------------------------- batching
@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_and_masks(side):
    exs = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = collate(exs, pad_token_id=0, padding_side=side)
    assert {k: v.shape for k, v in b.items()} == {k: (2, 3) for k in ("input_ids", "attention_mask", "labels")}
    assert all(v.dtype == torch.long for v in b.values())
    if side == "right":
        assert b["input_ids"][1].tolist() == [8, 0, 0] and b["attention_mask"][1].tolist() == [1, 0, 0]
        assert b["labels"][1].tolist() == [8, -100, -100]
    else:
        assert b["input_ids"][1].tolist() == [0, 0, 8] and b["attention_mask"][1].tolist() == [0, 0, 1]
        assert b["labels"][1].tolist() == [-100, -100, 8]
    assert b["labels"][0].tolist() == [-100, 6, 7] and b["attention_mask"][0].tolist() == [1, 1, 1]
    cut = collate(exs, pad_token_id=0, max_length=2)
    assert cut["input_ids"].tolist() == [[5, 6], [8, 0]] and cut["labels"][0].tolist() == [-100, 6]
    with pytest.raises(ValueError, match="pad_token_id"):
        collate(exs, pad_token_id=None)


def test_train_val_split_deterministic_and_disjoint():
    data = [{"input_ids": [i]} for i in range(50)]
    train, val = train_val_split(data, 0.2, seed=1)
    assert (train, val) == train_val_split(data, 0.2, seed=1)
    assert len(val) == 10 and len(train) == 40
    assert sorted(x["input_ids"][0] for x in train + val) == list(range(50))
    assert val != train_val_split(data, 0.2, seed=2)[1]
    with pytest.raises(DataError, match="empty validation split"):
        train_val_split(data[:3], 0.1, seed=0)
    with pytest.raises(DataError, match="empty training split"):
        train_val_split(data[:2], 0.9, seed=0)


def test_shuffled_batches_per_seed_and_epoch():
    data = list(range(10))
    run = lambda **kw: list(shuffled_batches(data, 3, **kw))  # noqa: E731
    e0 = run(seed=0, epoch=0)
    assert e0 == run(seed=0, epoch=0) and sorted(sum(e0, [])) == data
    assert [len(b) for b in e0] == [3, 3, 3, 1]
    assert e0 != run(seed=0, epoch=1) and e0 != run(seed=1, epoch=0)
    assert run(seed=0, epoch=0, start=2) == e0[2:]  # resume mid-epoch
    assert [len(b) for b in run(seed=0, epoch=0, drop_last=True)] == [3, 3, 3]


# ----------------------------------------------------------------------------- augmentation
TEXTS = ["The quick brown fox jumps over the lazy dog", "", "  ", "one", "café 日本語 🙂 naïve",
         "Q: is the cat happy?\nA:"]
SYNONYMS = {"cat": ["feline"], "quick": ["fast", "rapid"], "café": ["bar"]}


@pytest.mark.parametrize("augment", [
    lambda t, s: random_deletion(t, 0.3, seed=s),
    lambda t, s: random_swap(t, 2, seed=s),
    lambda t, s: synonym_replacement(t, SYNONYMS, 2, seed=s),
])
def test_augmentation_deterministic_count_and_words(augment):
    out = augment(TEXTS, 0)
    assert out == augment(TEXTS, 0) and len(out) == len(TEXTS)
    assert out[1:4] == TEXTS[1:4]  # empty, blank and too-short strings come back unchanged or whole
    assert any(augment(TEXTS, s) != out for s in range(1, 5))  # the seed matters
    recs = [{"prompt": t, "completion": " yes", "id": i} for i, t in enumerate(TEXTS)]
    out_recs = augment(recs, 0)
    assert [r["prompt"] for r in out_recs] == out  # same edits on the "prompt" field ...
    assert all(r["completion"] == " yes" and r["id"] == i for i, r in enumerate(out_recs))  # ... labels kept
    assert [r["prompt"] for r in recs] == TEXTS  # inputs not modified in place


def test_eda_operations_semantics():
    words = "a b c d e f g h".split()
    swapped = random_swap([" ".join(words)], 3, seed=0)[0]
    assert sorted(swapped.split()) == words
    kept = random_deletion(["a b c d e f g h"], 0.5, seed=0)[0].split()
    assert 1 <= len(kept) < 8 and kept == [w for w in words if w in kept]  # order kept
    assert len(random_deletion(["x y z"], 1.0, seed=3)[0].split()) == 1  # never empty
    assert random_deletion(["keep\nlines ok"], 0.0, seed=0) == ["keep\nlines ok"]
    assert random_swap(["line one\nline two"], 1, seed=0)[0].count("\n") == 1  # layout kept
    assert synonym_replacement(["The Cat, sat."], {"cat": ["dog"]}, 5, seed=0) == ["The dog, sat."]
    with pytest.raises(DataError, match="item 0"):
        random_swap([3], 1, seed=0)


def test_back_translate():
    texts = ["hello world", "", {"text": "café", "x": 1}]
    out = back_translate(texts, lambda xs: [x.upper() for x in xs], lambda xs: [x + "!" for x in xs])
    assert out == ["HELLO WORLD!", "!", {"text": "CAFÉ!", "x": 1}]
    with pytest.raises(DataError, match="from_pivot must return 3 strings"):
        back_translate(texts, lambda xs: xs, lambda xs: xs[:-1])
