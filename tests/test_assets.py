"""The embedded default: minift-tiny (model + tokenizer) and the docstring task.

The assets are built by scripts/pretrain_tiny.py and scripts/make_dataset.py and
committed; these tests check that they load in minift and in transformers alike, that
the task files are well formed, and that the held-out reference text stayed held out.
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from minift import GPT

ASSETS = Path(__file__).resolve().parent.parent / "minift" / "assets"
TINY, TASK = ASSETS / "minift-tiny", ASSETS / "task"
SPLITS = ("train", "validation", "test")
SAMPLES = [
    'def textwrap.shorten(text, width, **kwargs):\n    """',
    "Return the sum of a 'start' value (default: 0) plus an iterable of numbers.",
    "unicode: naïve café – 数字 😀, tabs\tand\nnewlines  <|endoftext|> after",
]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


@pytest.fixture(scope="module")
def tiny():
    return GPT.from_pretrained("minift-tiny")


def test_folder_is_small_and_complete():
    names = {p.name for p in TINY.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert sum(p.stat().st_size for p in TINY.rglob("*") if p.is_file()) <= 12 * 2**20


def test_logits_match_transformers(tiny):
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(TINY).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, tiny.config.vocab_size, (2, tiny.config.n_positions))  # full context
    with torch.no_grad():
        torch.testing.assert_close(tiny(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)


def test_tokenizer_matches_transformers(tiny):
    Tokenizer = pytest.importorskip("minift.tokenizer").Tokenizer
    from transformers import AutoTokenizer
    ours, theirs = Tokenizer.from_pretrained("minift-tiny"), AutoTokenizer.from_pretrained(TINY)
    texts = SAMPLES + (TASK / "reference.txt").read_text(encoding="utf-8").splitlines()[:50]
    for text in texts:
        assert ours.encode(text) == theirs(text)["input_ids"], text
    assert ours.eos_token_id == theirs.eos_token_id == tiny.config.eos_token_id
    assert len(ours) == len(theirs) == tiny.config.vocab_size


def test_tiny_is_pretrained(tiny):
    """Not random weights: the held-out text is far more likely than under a uniform guess."""
    Tokenizer = pytest.importorskip("minift.tokenizer").Tokenizer
    tok = Tokenizer.from_pretrained("minift-tiny")
    text = (TASK / "reference.txt").read_text(encoding="utf-8")
    ids = torch.tensor([tok.encode(text)[:tiny.config.n_positions]])
    with torch.no_grad():
        loss = tiny(ids, labels=ids).loss.item()
    assert loss < 0.6 * torch.log(torch.tensor(float(tiny.config.vocab_size))).item()
    report = json.loads((TINY / "pretrain.json").read_text())
    assert report["val_perplexity"] == pytest.approx(torch.exp(torch.tensor(report["val_loss"])).item(), rel=1e-3)


@pytest.mark.parametrize("split", SPLITS)
def test_task_split_is_well_formed(split):
    records = read_jsonl(TASK / f"{split}.jsonl")
    assert records
    for r in records:
        assert set(r) == {"prompt", "completion"}
        assert isinstance(r["prompt"], str) and isinstance(r["completion"], str)
        assert r["prompt"].startswith("def ") and r["prompt"].endswith('):\n    """')
        assert r["completion"].strip() == r["completion"] and "\n" not in r["completion"]


def test_task_splits_are_disjoint():
    splits = {s: read_jsonl(TASK / f"{s}.jsonl") for s in SPLITS}
    for key in ("prompt", "completion"):
        seen = {}
        for s, records in splits.items():
            for r in records:
                assert r[key] not in seen, f"{key} in both {seen.get(r[key])} and {s}: {r[key]!r}"
                seen[r[key]] = s


def test_reference_text_is_held_out_of_the_task():
    """No line of the held-out pretraining text shows up in the task's training records."""
    train = "\n".join(r["prompt"] + r["completion"] for r in read_jsonl(TASK / "train.jsonl"))
    lines = [s for line in (TASK / "reference.txt").read_text(encoding="utf-8").splitlines()
             if len(s := line.strip()) >= 40]
    assert lines
    assert not [s for s in lines if s in train]


def test_module_lists_are_disjoint():
    """Importing scripts/stdlib_corpus.py runs its disjointness asserts."""
    path = Path(__file__).resolve().parent.parent / "scripts" / "stdlib_corpus.py"
    spec = importlib.util.spec_from_file_location("stdlib_corpus", path)
    corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpus)
    assert not set(corpus.PRETRAIN_MODULES) & set(corpus.TASK_MODULES)
    manifest = (TASK / "README.md").read_text(encoding="utf-8")
    assert all(f"| {m} |" in manifest for m in ("textwrap", "pathlib"))  # counted per module
