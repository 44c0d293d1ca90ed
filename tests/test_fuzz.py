"""Hostile and broken files: every loader either loads or raises one clear error naming the
file, and nothing is ever unpickled or read from outside its folder.

Property-based (hypothesis, derandomized so CI sees the same examples every run): random
bytes, broken JSON, odd unicode (escaped lone surrogates, NUL, BOM, RTL marks, combining
marks, U+2028), blank lines and a 5 MB line go to load_jsonl / load_text / load_dataset,
and garbage config / tokenizer / weight / adapter files to Tokenizer.from_pretrained,
GPT.from_pretrained and PeftModel.from_pretrained. "Clear" means DataError, ValueError
(PeftError is one) or FileNotFoundError, with the file or folder named in the message;
any other exception (KeyError, TypeError, a Rust panic, RecursionError, ...) is a bug.
"""
import json
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import cfg, max_diff, pattern_data, tiny_model, weights
from minift.chat import BUILTIN_CHAT_TEMPLATE, chat_examples
from minift.data import DataError, load_dataset, load_jsonl, load_text, split_documents
from minift.tokenfile import documents
from minift.model import GPT
from minift.peft import LoraConfig, PeftModel, PromptTuningConfig, TaskType, get_peft_model
from minift.rundir import _sha256, list_checkpoints, verify_checkpoint_dir
from minift.tokenizer import Tokenizer
from minift.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
CLEAR = (DataError, ValueError, FileNotFoundError)
FUZZ = settings(max_examples=300, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Characters that break naive text handling: NUL, BOM, RTL override and mark, a combining
# accent, line/paragraph separators (str.splitlines breaks on them, JSONL must not), NEL,
# CR, a lone surrogate (only expressible as a JSON escape), an astral emoji, a tab.
ODD = ["\x00", "\ufeff", "\u202e", "\u200f", "e\u0301", "\u2028", "\u2029", "\x85", "\r",
       "\ud800", "\udfff", "\U0001f4a5", "\t", "\\", '"']
odd_text = st.lists(st.sampled_from(ODD) | st.text(max_size=6), max_size=8).map("".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | odd_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_text, inner, max_size=3),
    max_leaves=6)


# A data error names the line or row (and the field, by name), or is about the whole file.
LOCATED = r"(line \d+|row \d+)|: (no examples|not a readable|no such file|unknown file type)"


def expect_clear(load, named, located=None):
    """Run load(); a failure must be a CLEAR error whose message names `named` (and matches
    `located`). Outcomes are counted (pytest --hypothesis-show-statistics) to see both kinds
    are exercised."""
    try:
        result = load()
    except CLEAR as e:
        assert str(named) in str(e), f"{type(e).__name__} does not name {named}: {e}"
        assert located is None or re.search(located, str(e)), f"no line/row in: {e}"
        event(f"refused: {type(e).__name__}")
        return None
    event("loaded")
    return result


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe(["the quick brown fox jumps over the lazy dog\n" * 5,
                                "def f(x):\n    return x + 1\n"], vocab_size=300)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder for hypothesis examples (function-scoped tmp_path is shared by examples)."""
    return tmp_path_factory.mktemp("fuzz")


def fresh(scratch):
    return Path(tempfile.mkdtemp(dir=scratch))


# ----------------------------------------------------------------------------- data files
ROLES = st.sampled_from(["user", "assistant", "system", "tool", ""]) | odd_text
message = st.one_of(st.fixed_dictionaries({"role": ROLES, "content": odd_text}),
                    st.dictionaries(st.sampled_from(["role", "content", "x"]), json_values,
                                    max_size=3),
                    json_values)
KIND_FIELDS = ["text", "prompt", "completion", "instruction", "input", "output", "messages", "x"]


def jsonl_line():
    record = st.one_of(
        st.fixed_dictionaries({"text": odd_text}),
        st.fixed_dictionaries({"prompt": odd_text, "completion": odd_text}),
        st.fixed_dictionaries({"instruction": odd_text, "output": odd_text},
                              optional={"input": odd_text}),
        st.fixed_dictionaries({"messages": st.lists(message, max_size=4)}),
        st.dictionaries(st.sampled_from(KIND_FIELDS), json_values | st.lists(message, max_size=2),
                        max_size=3))
    as_json = record.map(lambda r: json.dumps(r, ensure_ascii=False))
    return st.one_of(
        as_json,                                              # surrogates come out as \ud800
        record.map(json.dumps),                               # all escaped
        as_json.flatmap(lambda s: st.integers(0, len(s)).map(lambda k: s[:k])),  # cut short
        json_values.map(json.dumps),                          # valid JSON, wrong shape
        odd_text,                                             # not JSON at all
        st.sampled_from(["", "   ", "\t", "[" * 100_000, "1" * 5000, "NaN", "{}", "null"]))


def encode_file(lines, newline, bom):
    text = newline.join(lines)
    # an unpaired surrogate cannot be UTF-8: such a file is written as its escape would be
    data = text.encode("utf-8", errors="surrogatepass")
    return (b"\xef\xbb\xbf" if bom else b"") + data


@FUZZ
@given(lines=st.lists(jsonl_line(), max_size=6), newline=st.sampled_from(["\n", "\r\n"]),
       bom=st.booleans(), max_length=st.sampled_from([None, 2, 5]))
def test_load_jsonl_loads_or_names_the_line(tok, scratch, lines, newline, bom, max_length):
    path = fresh(scratch) / "data.jsonl"
    path.write_bytes(encode_file(lines, newline, bom))
    examples = expect_clear(lambda: load_jsonl(path, tok, max_length=max_length), path, LOCATED)
    for ex in examples or []:
        assert len(ex["input_ids"]) == len(ex["labels"]) >= 1
        assert max_length is None or len(ex["input_ids"]) <= max_length
        assert all(0 <= t < tok.vocab_size for t in ex["input_ids"])


@pytest.fixture(scope="module")
def chat_toks(tok, tmp_path_factory):
    """The built-in template (Python) and a ChatML Jinja template over the fuzz tokenizer."""
    folder = tmp_path_factory.mktemp("chatml")
    tok.save_pretrained(folder)
    chatml = Tokenizer.from_pretrained(folder)
    chatml.backend.add_special_tokens(["<|im_end|>"])
    chatml.chat_template = ("{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + "
                            "'<|im_end|>\n' }}{% endfor %}")
    return {"builtin": tok, "chatml": chatml}


@FUZZ
@given(lines=st.lists(jsonl_line(), max_size=4), template=st.sampled_from(["builtin", "chatml"]),
       max_length=st.sampled_from([None, 3, 40]))
def test_chat_and_instruction_records_load_or_name_the_line(chat_toks, scratch, lines, template,
                                                            max_length):
    """Chat records (any message shapes and roles, through either template) and
    instruction records: loaded examples train on something and fit max_length."""
    path = fresh(scratch) / "chat.jsonl"
    path.write_bytes(encode_file(lines, "\n", False))
    t = chat_toks[template]
    for ex in expect_clear(lambda: load_dataset(path, t, max_length=max_length), path,
                           LOCATED) or []:
        assert len(ex["input_ids"]) == len(ex["labels"]) >= 1
        assert max_length is None or len(ex["input_ids"]) <= max_length
        assert any(x != -100 for x in ex["labels"])


def table_records():
    """Rows of one kind or of mixed fields; values strings, numbers, None or nested."""
    value = odd_text.filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s))
    return st.lists(st.dictionaries(st.sampled_from(KIND_FIELDS[:-2] + ["question"]),
                                    value | st.none() | st.integers(-2**40, 2**40), min_size=1,
                                    max_size=3),
                    max_size=5)


def write_table(path, records, pa):
    """records -> a .csv/.tsv (stdlib) or .parquet/.arrow (pyarrow) file; None if pyarrow
    cannot type the columns (mixed int and str)."""
    import csv
    columns = sorted({k for r in records for k in r})
    if path.suffix in (".csv", ".tsv"):
        with open(path, "w", newline="", encoding="utf-8", errors="surrogatepass") as f:
            w = csv.writer(f, delimiter="," if path.suffix == ".csv" else "\t")
            w.writerow(columns)
            w.writerows([[r.get(c, "") for c in columns] for r in records])
        return path
    try:
        table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in records])
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a column of ints and strings
        return None
    if path.suffix == ".parquet":
        pa.parquet.write_table(table, path)
    else:
        with pa.ipc.new_file(path, table.schema) as w:
            w.write_table(table)
    return path


@FUZZ
@given(records=table_records(), suffix=st.sampled_from([".csv", ".tsv", ".parquet", ".arrow"]),
       fields=st.sampled_from([None, {"prompt": "question"}, {"completion": "text"}]),
       cut=st.none() | st.integers(0, 400))
def test_tables_load_or_name_the_row_and_column(tok, scratch, records, suffix, fields, cut):
    """CSV/TSV/Parquet/Arrow files of random rows, whole or cut short at a random byte."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet  # noqa: F401
    path = write_table(fresh(scratch) / f"data{suffix}", records, pa)
    if path is None:
        return
    if cut is not None:
        path.write_bytes(path.read_bytes()[:cut])
    for ex in expect_clear(lambda: load_dataset(path, tok, max_length=16, fields=fields),
                           path, LOCATED) or []:
        assert 1 <= len(ex["input_ids"]) == len(ex["labels"]) <= 16


@FUZZ
@given(text=st.lists(st.sampled_from(["\n", "\n\n", " ", "\t", "\r", "\r\n", "\u2028", "\x0c",
                                      "\ufeff", "a", "b c", "\u3000"]), max_size=30).map("".join))
def test_streamed_documents_equal_the_regex_split(scratch, text):
    """The memory-mapped path splits documents line by line; the in-memory one by regex."""
    path = fresh(scratch) / "c.txt"
    path.write_bytes(text.encode("utf-8"))
    assert list(documents(path)) == split_documents(text.removeprefix("\ufeff"))


@FUZZ
@given(blob=st.binary(max_size=300) | odd_text.map(lambda s: s.encode("utf-8", "surrogatepass")),
       suffix=st.sampled_from([".txt", ".jsonl", ".JSONL", ".csv", ".tsv", ".parquet", ".arrow",
                               ""]),
       block_size=st.sampled_from([2, 3, 64]))
def test_random_bytes_to_every_data_loader(tok, scratch, blob, suffix, block_size):
    path = fresh(scratch) / f"data{suffix}"
    path.write_bytes(blob)
    for load in (lambda: load_dataset(path, tok, block_size=block_size, max_length=block_size),
                 lambda: load_text(path, tok, block_size), lambda: load_jsonl(path, tok),
                 lambda: load_text(path, tok, block_size, memmap=True, cache_dir=path.parent)):
        for ex in expect_clear(load, path, LOCATED) or []:
            assert 1 <= len(ex["input_ids"]) == len(ex["labels"])
    for ex in expect_clear(lambda: load_text(path, tok, block_size), path) or []:
        assert 2 <= len(ex["input_ids"]) <= block_size


def test_a_5_megabyte_line(tok, tmp_path):
    """One huge line, three ways: broken JSON, a valid record of the wrong shape, and a
    200 kB text that really loads (tokenising 5 MB takes ~10 s on this machine's CPU)."""
    path = tmp_path / "huge.jsonl"
    path.write_text('{"text": "' + "lorem ipsum " * 437_000 + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path} line 1: invalid JSON"):
        load_jsonl(path, tok)
    path.write_text(json.dumps({"text": 1, "pad": "x" * 5_000_000}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path} line 1: field \"text\" must be a string"):
        load_jsonl(path, tok)
    path.write_text(json.dumps({"text": "lorem ipsum " * 17_000}) + "\n\n\n", encoding="utf-8")
    (ex,) = load_jsonl(path, tok, max_length=64)
    assert len(ex["input_ids"]) == 64


def test_odd_unicode_round_trips_through_load_jsonl(tok, tmp_path):
    """Every odd character except the lone surrogates survives, in place."""
    text = "".join(c for c in ODD if not 0xD800 <= ord(c[0]) <= 0xDFFF)
    path = tmp_path / "odd.jsonl"
    path.write_text("\ufeff" + json.dumps({"text": text}) + "\n"
                    + json.dumps({"text": "x\u2028y"}, ensure_ascii=False) + "\n", "utf-8")
    first, second = load_jsonl(path, tok)
    assert tok.decode(first["input_ids"][:-1]) == text
    assert tok.decode(second["input_ids"][:-1]) == "x\u2028y"   # one record, not split in two
    path.write_text(json.dumps({"text": "a\ud800b"}) + "\n", "utf-8")
    with pytest.raises(DataError, match=rf"{path} line 1: .*unpaired surrogate"):
        load_jsonl(path, tok)


# ----------------------------------------------------------------------------- model folders
@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok):
    """A real minift model + tokenizer folder, and a LoRA and a prompt-tuning adapter."""
    folder = tmp_path_factory.mktemp("saved")
    tiny_model().save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    tensors = load_file(folder / "model" / "model.safetensors")   # the same, in two shards
    (folder / "sharded").mkdir()
    shutil.copy(folder / "model" / "config.json", folder / "sharded")
    weight_map = {k: f"part-{i % 2}.safetensors" for i, k in enumerate(sorted(tensors))}
    for part in set(weight_map.values()):
        save_file({k: t for k, t in tensors.items() if weight_map[k] == part},
                  folder / "sharded" / part)
    (folder / "sharded" / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    chat = Tokenizer.from_pretrained(folder / "model")   # with a Jinja chat template
    chat.chat_template = "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    chat.save_pretrained(folder / "chat")
    (folder / "chat" / "chat_template.jinja").write_text(chat.chat_template)
    (folder / "bpe").mkdir()   # GPT-2's original layout: vocab.json + merges.txt
    tok.backend.model.save(str(folder / "bpe"))
    for name, config in (("lora", LoraConfig(task_type=TaskType.CAUSAL_LM, r=2)),
                         ("prompt", PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                       num_virtual_tokens=3))):
        get_peft_model(tiny_model(), config).save_pretrained(folder / name)
    return folder


def garbage_for(original: bytes):
    """Ways to break a file: random bytes, random JSON, a cut, a flipped byte."""
    return st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.integers(0, len(original)).map(lambda k: original[:k]),
        st.integers(0, max(len(original) - 1, 0)).map(
            lambda k: original[:k] + bytes([original[k] ^ 0x5A]) + original[k + 1:]))


def edited_json(original: bytes):
    """The original JSON object with some fields set to random values (reaches the checks
    after parsing)."""
    base = json.loads(original)
    return st.dictionaries(st.sampled_from(sorted(base)) | odd_text, json_values,
                           min_size=1, max_size=3).map(
        lambda edits: json.dumps({**base, **edits}).encode())


def broken_copy(data, src: Path, dst: Path, name: str) -> Path:
    """A copy of folder `src` at `dst` whose file `name` is broken in a way drawn from `data`
    (garbage_for, or edited_json for a JSON file)."""
    original = (src / name).read_bytes()
    content = data.draw(garbage_for(original) | (edited_json(original) if name.endswith("json")
                                                 else st.nothing()))
    shutil.copytree(src, dst)
    (dst / name).write_bytes(content)
    return dst


@FUZZ
@given(data=st.data(), layout_name=st.sampled_from([
    ("model", "config.json"), ("model", "model.safetensors"),
    ("sharded", "model.safetensors.index.json"), ("sharded", "part-1.safetensors")]))
def test_gpt_from_pretrained_on_garbage(saved, scratch, data, layout_name):
    layout, name = layout_name
    folder = broken_copy(data, saved / layout, fresh(scratch) / "m", name)
    model = expect_clear(lambda: GPT.from_pretrained(folder), folder)
    if model is not None:   # it loaded: then it runs
        assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size


@FUZZ
@given(data=st.data(), layout_name=st.sampled_from([
    ("model", "tokenizer.json"), ("model", "tokenizer_config.json"),
    ("model", "special_tokens_map.json"), ("bpe", "vocab.json"), ("bpe", "merges.txt"),
    ("chat", "tokenizer_config.json"), ("chat", "chat_template.jinja")]))
def test_tokenizer_from_pretrained_on_garbage(saved, scratch, data, layout_name):
    layout, name = layout_name
    folder = broken_copy(data, saved / layout, fresh(scratch) / "t", name)
    tokenizer = expect_clear(lambda: Tokenizer.from_pretrained(folder), folder)
    if tokenizer is not None:   # it loaded: then it encodes and decodes (a tokenizer.json
        ids = tokenizer.encode("the fox")   # edited to have no decoder decodes differently)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert isinstance(tokenizer.decode(ids), str)
        if layout == "chat":    # and its (possibly broken) chat template renders or refuses
            conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
            expect_clear(lambda: chat_examples(tokenizer, [conv], ["line 1"]), "line 1")


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory):
    """A `datasets` save_to_disk folder of three prompt/completion rows."""
    datasets = pytest.importorskip("datasets")
    folder = tmp_path_factory.mktemp("dataset") / "d"
    datasets.Dataset.from_list([{"prompt": "the quick", "completion": " fox"}] * 3).save_to_disk(
        str(folder))
    return folder


@FUZZ
@given(data=st.data(), name=st.sampled_from(["state.json", "dataset_info.json",
                                             "data-00000-of-00001.arrow"]))
def test_saved_dataset_folder_on_garbage(tok, saved_dataset, scratch, data, name):
    folder = broken_copy(data, saved_dataset, fresh(scratch) / "d", name)
    for ex in expect_clear(lambda: load_dataset(folder, tok, max_length=8), folder) or []:
        assert 1 <= len(ex["input_ids"]) == len(ex["labels"]) <= 8


@FUZZ
@given(data=st.data(), kind=st.sampled_from(["lora", "prompt"]),
       name=st.sampled_from(["adapter_config.json", "adapter_model.safetensors"]))
def test_peft_from_pretrained_on_garbage(saved, scratch, data, kind, name):
    folder = broken_copy(data, saved / kind, fresh(scratch) / "a", name)
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = expect_clear(lambda: PeftModel.from_pretrained(model, folder), folder)
    if peft_model is None:   # refused: the model is as it was
        assert {n: p for n, p in model.named_parameters()}.keys() == before.keys()
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    else:   # it loaded: then it runs (a flipped byte in a tensor may well load as nan)
        assert peft_model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == 97


# ----------------------------------------------------------------------------- security
class Marker:
    """Unpickling this calls Path(marker).touch(): proof that a pickle ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def malicious_pickle(path: Path, marker: Path) -> None:
    torch.save({"optimizer": Marker(marker), "scheduler": {}}, path)
    assert not marker.exists()


def test_pickled_model_files_are_never_opened(saved, tmp_path):
    """A .bin next to config.json is refused without being unpickled; next to a safetensors
    file it is ignored."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "model"
    shutil.copytree(saved / "model", folder)
    malicious_pickle(folder / "pytorch_model.bin", marker)
    GPT.from_pretrained(folder)                              # safetensors wins, .bin untouched
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*never unpickles"):
        GPT.from_pretrained(folder)
    adapter = tmp_path / "adapter"
    shutil.copytree(saved / "lora", adapter)
    (adapter / "adapter_model.safetensors").unlink()
    malicious_pickle(adapter / "adapter_model.bin", marker)
    with pytest.raises(ValueError, match="adapter_model.bin.*could run code"):
        PeftModel.from_pretrained(tiny_model(), adapter)
    assert not marker.exists()


def test_a_malicious_optimizer_pickle_is_refused_not_run(tmp_path):
    """optimizer.pt is read with weights_only=True. Replaced by a pickle whose __reduce__
    would create a file (and its manifest entry updated, as an attacker would), resume
    refuses it with a clear error and the file is never created."""
    data = pattern_data(8, seed=1)
    train(tiny_model(), data, config=cfg(output_dir=str(tmp_path / "run"), max_steps=2))
    last = list_checkpoints(tmp_path / "run")[-1]
    marker = tmp_path / "pwned"
    malicious_pickle(last / "optimizer.pt", marker)
    manifest = json.loads((last / "manifest.json").read_text())
    manifest["files"]["optimizer.pt"] = {"sha256": _sha256(last / "optimizer.pt"),
                                         "bytes": (last / "optimizer.pt").stat().st_size}
    (last / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"optimizer\.pt: refused: .*Unsupported global: GLOBAL "
                                         r"getattr.*never unpickles"):
        train(tiny_model(), data, config=cfg(output_dir=str(tmp_path / "run"), max_steps=4,
                                             resume=True))
    assert not marker.exists()
    # the pickle module itself would have run it: the test is not vacuous
    with pytest.raises(pickle.UnpicklingError):
        torch.load(last / "optimizer.pt", weights_only=True)
    torch.load(last / "optimizer.pt", weights_only=False)
    assert marker.exists()


def test_paths_inside_files_cannot_leave_their_folder(saved, tmp_path):
    """A shard index naming an absolute path or ../, a checkpoint manifest naming ../, and a
    tokenizer_config.json naming another tokenizer file: none is read."""
    folder = tmp_path / "model"
    shutil.copytree(saved / "model", folder)
    outside = tmp_path / "outside.safetensors"
    shutil.move(folder / "model.safetensors", outside)
    for shard in (str(outside), "../outside.safetensors", "sub/../../outside.safetensors"):
        index = {"weight_map": {"transformer.wte.weight": shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match="leaves the folder"):
            GPT.from_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "tokenizer.json").write_text("{not json")
    config.update(tokenizer_file=str(tmp_path / "evil" / "tokenizer.json"),
                  vocab_file="../evil/vocab.json", merges_file="/etc/passwd")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_pretrained(folder).decode([5, 6]) == \
        Tokenizer.from_pretrained(saved / "model").decode([5, 6])

    run = tmp_path / "run"
    data = pattern_data(8, seed=2)
    first = tiny_model()
    straight = train(first, data, config=cfg(output_dir=str(run), max_steps=4, save_every=2))
    secret = run / "run.json"
    last = list_checkpoints(run)[-1]
    manifest = json.loads((last / "manifest.json").read_text())
    manifest["files"] = {"../../run.json": {"sha256": "0", "bytes": secret.stat().st_size}}
    (last / "manifest.json").write_text(json.dumps(manifest))
    assert verify_checkpoint_dir(last) == "../../run.json is missing"   # though it exists
    resumed = tiny_model()
    again = train(resumed, data, config=cfg(output_dir=str(run), max_steps=4, save_every=2,
                                            resume=True))    # falls back to step 2
    assert again.step == 4 and again.train_loss == straight.train_loss   # steps 3-4 redone
    assert max_diff(weights(first), weights(resumed)) <= 1e-7
