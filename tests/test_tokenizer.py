"""minift.Tokenizer against transformers' GPT2TokenizerFast built from the same files."""
import json

import pytest
import torch

from minift.tokenizer import EOS, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "Fine-tuning adapts a pretrained model to a task with a little labelled data.",
    "Unicode: café, naïve, Zürich, 日本語のテキスト, Ελληνικά, emoji 🙂🚀👍🏽 and more.",
    "    indented code:\n\tdef f(x):\n\t\treturn x + 1\n\n\nTrailing   spaces   ",
] * 10

SAMPLES = [
    "Hello world",
    "The quick brown fox",
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\nnew\n\nlines\r\n",
    "café naïve Zürich",
    "日本語 Ελληνικά",
    "emoji 🙂🚀👍🏽 family 👨‍👩‍👧",
    "unseen bytes \x00\x7f ﷽ \u2028",
    "a<|endoftext|>b",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The same trained BPE saved as tokenizer.json and as GPT-2's vocab.json + merges.txt."""
    tok = Tokenizer.train_bpe(CORPUS, vocab_size=400)
    json_dir = tmp_path_factory.mktemp("tokjson")
    tok.save_pretrained(json_dir)
    vm_dir = tmp_path_factory.mktemp("vocabmerges")
    tok.backend.model.save(str(vm_dir))  # writes vocab.json + merges.txt
    return tok, json_dir, vm_dir


def hf(folder):
    from transformers import GPT2TokenizerFast
    return GPT2TokenizerFast.from_pretrained(str(folder))


def test_train_bpe_has_eos_and_bytes(folders):
    tok, _, _ = folders
    assert tok.eos_token == EOS and tok.eos_token_id == 0
    assert tok.bos_token_id == tok.pad_token_id == tok.eos_token_id  # GPT-2's defaults
    assert len(tok) == tok.vocab_size > 257  # 256 bytes + eos + merges


@pytest.mark.parametrize("layout", ["tokenizer.json", "vocab+merges"])
def test_encode_matches_transformers(folders, layout):
    _, json_dir, vm_dir = folders
    folder = json_dir if layout == "tokenizer.json" else vm_dir
    ours, ref = Tokenizer.from_pretrained(folder), hf(folder)
    assert len(ours) == len(ref) and ours.eos_token_id == ref.eos_token_id
    for s in SAMPLES:
        assert ours.encode(s) == ref(s)["input_ids"], repr(s)
        assert ours(s)["input_ids"] == ref(s)["input_ids"]
    # "<|endoftext|>" in text is the special token, as in GPT-2
    assert ours.encode("a<|endoftext|>b")[1] == ours.eos_token_id


def test_decode_round_trip(folders):
    tok, _, _ = folders
    for s in SAMPLES:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert tok.decode(torch.tensor(ids, dtype=torch.long)) == s
    ids = tok.encode("hi", add_eos=True)
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    assert tok.batch_decode([tok.encode("a b"), tok.encode("ç")]) == ["a b", "ç"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_and_masks_match_transformers(folders, side):
    tok, json_dir, _ = folders
    ref = hf(json_dir)
    ref.padding_side = side
    texts = ["a", "the quick brown fox", "café 🙂"]
    out = tok(texts, padding=True, return_tensors="pt", padding_side=side)
    exp = ref(texts, padding=True, return_tensors="pt")
    assert torch.equal(out["input_ids"], exp["input_ids"])
    assert torch.equal(out["attention_mask"], exp["attention_mask"])
    lengths = [len(tok.encode(t)) for t in texts]
    assert out["attention_mask"].sum(1).tolist() == lengths
    short = out["attention_mask"][0]
    assert (short[: lengths[0]] == 1).all() if side == "right" else (short[-lengths[0]:] == 1).all()


def test_truncation_and_max_length_padding(folders):
    tok, json_dir, _ = folders
    ref = hf(json_dir)
    texts = ["the quick brown fox jumps over the lazy dog", "a"]
    out = tok(texts, padding="max_length", truncation=True, max_length=5)
    exp = ref(texts, padding="max_length", truncation=True, max_length=5)
    assert out["input_ids"] == exp["input_ids"] and out["attention_mask"] == exp["attention_mask"]
    assert out["attention_mask"][1] == [1] + [0] * 4
    assert tok("the quick brown fox", truncation=True, max_length=2)["input_ids"] == \
        tok.encode("the quick brown fox")[:2]
    single = tok("hi there", return_tensors="pt")
    assert single["input_ids"].shape == (1, len(tok.encode("hi there")))
    with pytest.raises(ValueError, match="padding=True"):
        tok(texts, return_tensors="pt")


def test_saved_by_minift_loads_in_transformers(folders, tmp_path):
    from transformers import AutoTokenizer
    _, _, vm_dir = folders
    ours = Tokenizer.from_pretrained(vm_dir)  # built from vocab+merges, saved as tokenizer.json
    ours.save_pretrained(tmp_path)
    for ref in (AutoTokenizer.from_pretrained(str(tmp_path)), hf(tmp_path)):
        assert ref.eos_token == ref.pad_token == EOS
        for s in SAMPLES:
            assert ref(s)["input_ids"] == ours.encode(s), repr(s)
    again = Tokenizer.from_pretrained(tmp_path)
    assert [again.encode(s) for s in SAMPLES] == [ours.encode(s) for s in SAMPLES]


def test_special_tokens_from_config(folders, tmp_path):
    tok, _, _ = folders
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    # Hugging Face may store a token as a serialized AddedToken; a pad distinct from eos
    cfg.update(pad_token={"content": "<pad>", "special": True}, model_max_length=3)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.pad_token == "<pad>" and loaded.pad_token_id == len(tok)  # appended, as HF does
    assert loaded.eos_token_id == tok.eos_token_id
    assert len(loaded("a b c d e f", truncation=True)["input_ids"]) == 3  # model_max_length


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        Tokenizer.from_pretrained(tmp_path / "no-such-dir")
    (tmp_path / "vocab.json").write_text("{}")  # merges.txt missing
    with pytest.raises(FileNotFoundError) as e:
        Tokenizer.from_pretrained(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "tokenizer.json" in msg and "merges.txt" in msg
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(ValueError, match="could not load"):
        Tokenizer.from_pretrained(tmp_path)
