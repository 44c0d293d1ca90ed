"""The embedded default: minift-tiny (model + tokenizer), its held-out reference text and the
built-in tasks.

The assets are built by scripts/pretrain_tiny.py and scripts/make_dataset.py and committed;
these tests check that they load in minift and in transformers alike, that the model can copy
from its context (what every task needs), that the task files are well formed and rebuild
byte for byte, and that no task module's file was in the pretraining corpus.
"""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minift.linear as linear
from minift import GPT, Tokenizer
from minift.probes import copy_probe
from minift.tasks import REFERENCE, SPLITS, TASKS, TASKS_DIR, get_task

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "minift" / "assets" / "minift-tiny"
SAMPLES = [
    'def textwrap.shorten(text, width, **kwargs):\n    """',
    "Return the sum of a 'start' value (default: 0) plus an iterable of numbers.",
    "unicode: naïve café – 数字 😀, tabs\tand\nnewlines  <|endoftext|> after",
]


def script(name: str):
    """Import scripts/NAME.py (its folder on sys.path, as when it is run)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "scripts"))


@pytest.fixture(scope="module")
def tiny():
    return GPT.from_pretrained("minift-tiny")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained("minift-tiny")


def test_folder_is_small_and_complete(tiny):
    names = {p.name for p in TINY.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert sum(p.stat().st_size for p in TINY.rglob("*") if p.is_file()) <= 25 * 2**20
    assert tiny.num_parameters() <= 10_000_000


def test_logits_match_transformers(tiny, monkeypatch):
    """The same function as transformers' GPT-2, to the issue's 1e-5 in float32 (measured:
    0.0, with and without padding) and 1e-9 in float64. config.json names the activation
    minift-tiny was trained with, `gelu_pytorch_tanh` (torch's fused tanh GELU, in both
    stacks); under `gelu_new` transformers writes the formula out in 8 elementwise ops,
    which round differently from the fused kernel, and the logits then differ by 5.6e-5.
    transformers' own eager attention differs from its SDPA by more than that (9e-5), so
    minift's SDPA is compared with transformers' default, SDPA. The float32 comparison
    runs minift's products on torch's own kernels (linear.GEMM = "mkl"), the ones
    transformers uses: the same function computed the same way gives the same numbers.
    With oneDNN's (the default on the CPU), the next test bounds their accuracy."""
    from transformers import GPT2LMHeadModel
    theirs = GPT2LMHeadModel.from_pretrained(TINY, attn_implementation="sdpa").eval()
    assert tiny.config.activation_function == "gelu_pytorch_tanh"
    monkeypatch.setattr(linear, "GEMM", "mkl")
    torch.manual_seed(0)
    ids = torch.randint(0, tiny.config.vocab_size, (2, tiny.config.n_positions))  # full context
    mask = torch.ones_like(ids)
    mask[1, :40] = 0                                                    # a left-padded row
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            ours, ref = tiny(ids, **kwargs).logits, theirs(ids, **kwargs).logits
            keep = mask.bool() if kwargs else torch.ones_like(mask, dtype=torch.bool)
            assert (ours - ref)[keep].abs().max().item() <= 1e-5
        ours64, theirs64 = GPT.from_pretrained("minift-tiny").double(), theirs.double()
        torch.testing.assert_close(ours64(ids).logits, theirs64(ids).logits, rtol=0, atol=1e-9)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_float32_logits_with_onednn_are_as_accurate_as_transformers(tiny, monkeypatch):
    """With oneDNN's products (minift/linear.py) the float32 logits are another rounding of
    the same function: against the float64 logits (which equal transformers' to 1e-9, above)
    their error is within 1.5x of transformers' own float32 error (measured: 9.9e-5 against
    7.6e-5 at most, of logits up to 23; 1.9e-6 against 1.5e-6 on average)."""
    from transformers import GPT2LMHeadModel
    theirs = GPT2LMHeadModel.from_pretrained(TINY, attn_implementation="sdpa").eval()
    assert linear.GEMM == "onednn"
    torch.manual_seed(0)
    ids = torch.randint(0, tiny.config.vocab_size, (2, tiny.config.n_positions))
    with torch.no_grad():
        exact = GPT.from_pretrained("minift-tiny").double()(ids).logits
        logits = tiny(ids).logits
        ours = (logits.double() - exact).abs()
        ref = (theirs(ids).logits.double() - exact).abs()
        monkeypatch.setattr(linear, "GEMM", "mkl")
        assert not torch.equal(logits, tiny(ids).logits)  # oneDNN's products, not MKL's
    assert ours.max() <= 1.5 * ref.max() and ours.mean() <= 1.5 * ref.mean()


def test_tokenizer_matches_transformers(tiny, tok):
    from transformers import AutoTokenizer
    theirs = AutoTokenizer.from_pretrained(TINY)
    for text in SAMPLES + REFERENCE.read_text(encoding="utf-8").splitlines()[:50]:
        assert tok.encode(text) == theirs(text)["input_ids"], text
    assert tok.eos_token_id == theirs.eos_token_id == tiny.config.eos_token_id
    assert len(tok) == len(theirs) == tiny.config.vocab_size


def test_reference_perplexity_is_what_pretrain_json_says(tok):
    """pretrain.json's held-out perplexity, recomputed with transformers' GPT-2 on the same
    non-overlapping 256-token blocks (first token of a block is context only)."""
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(TINY).eval()
    ids = tok.encode(REFERENCE.read_text(encoding="utf-8"))
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), 256):
            block = torch.tensor([ids[i:i + 256]])
            if block.shape[1] < 2:
                continue
            logits = hf(block).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits, block[0, 1:], reduction="sum").item()
            count += block.shape[1] - 1
    report = json.loads((TINY / "pretrain.json").read_text())
    assert math.exp(nll / count) == pytest.approx(report["reference_perplexity"], rel=1e-3)
    assert report["reference_perplexity"] < 0.05 * tok.vocab_size   # far from a uniform guess


def test_base_model_copies_a_repeated_random_sequence(tiny):
    """Induction (Olsson et al. 2022): 8 sequences of 50 random token ids, each written
    twice; on the second copy the model's top-1 prediction is the next token of the first
    >= 90% of the time (measured 100%; stage 1 of pretraining alone gave 0%)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(100, tiny.config.vocab_size, (8, 50), generator=g)
    ids = torch.cat([x, x], 1)
    with torch.no_grad():
        logits = tiny(ids).logits
    assert (logits[:, 50:-1].argmax(-1) == ids[:, 51:]).float().mean() >= 0.9


def test_base_model_copies_identifiers_from_its_context(tiny, tok):
    """Greedy continuation of a line of random identifiers (random letters, 1-2 parts),
    started again, on the 1,000 lines the README quotes: >= 90% of the tokens copied at
    their position, the issue's target (measured 91.5%, 95% interval 90.0-93.0%; the
    first 40 of these lines alone give 84.4%, interval 74.5-93.0%, which is what the
    README quoted before; the previous minift-tiny got 77.5% on those 40, the first one,
    trained on 1.8M tokens of docstrings, 4%)."""
    got = copy_probe(tiny, tok, n_trials=1000, seed=0)
    assert got["token_accuracy"] >= 0.9, got
    assert got["low"] < got["token_accuracy"] < got["high"], got


def test_copy_probe_scores_the_same_batched_and_one_line_at_a_time(tiny, tok):
    """Left padding moves each line's positions back to 0, so batching changes nothing."""
    assert copy_probe(tiny, tok, n_trials=12, batch_size=12) == copy_probe(
        tiny, tok, n_trials=12, batch_size=1)


def test_valid_python_probe_ends_the_function_where_its_body_dedents():
    """scripts/capability.py's rule: the body runs until a line indented less than its first
    line; what follows (the next method of an imagined class) is not judged, a body at
    column 0 is no function, and a real syntax error inside the body still fails."""
    cap = script("capability")
    head = "def shutil.copyfile(src, dst):"
    body = "\n        n = len(src)\n\n        return dst"
    method_like = body + "\n    def next(self):\n        x = (\n"
    assert cap.function_text(head, method_like) == head + body
    assert cap.parses(cap.function_text(head, method_like))
    assert cap.function_text(head, "\nx = 1\n") == head and not cap.parses(head)
    assert not cap.parses(cap.function_text(head, "\n    if src.:\n        pass\n    return dst"))
    # ran out of tokens mid-statement: judged on the complete lines before it
    assert cap.parses(cap.function_text(head, "\n    n = len(src)\n    return copy(src,"))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_splits_are_well_formed_and_disjoint(name):
    task, seen = get_task(name), {}
    build = json.loads((TASKS_DIR / "build.json").read_text())
    for split in SPLITS:
        records = task.records(split)
        assert records, split
        for r in records:
            assert r["prompt"].startswith("def ") and r["prompt"] not in seen
            seen[r["prompt"]] = split
            module = r["prompt"][4:].split("(")[0]
            assert any(module.startswith(m + ".") for m in build["modules"][split]), module
            if task.kind == "dpo":
                assert r["chosen"] != r["rejected"]
            else:
                assert r["completion"].strip() and "\n" not in r["completion"]
            if task.kind == "choice":
                assert len(r["choices"]) == 4 and r["choices"][r["label"]] == r["completion"]
    assert not set.intersection(*map(set, build["modules"].values()))


def test_task_files_rebuild_byte_for_byte(tmp_path):
    """make_dataset.py is deterministic given the Python version the files were built on."""
    build = json.loads((TASKS_DIR / "build.json").read_text())
    if build["python"] != ".".join(map(str, sys.version_info[:3])):
        pytest.skip(f"tasks were built on Python {build['python']}")
    # a fresh interpreter, as from the command line: which names a module holds depends on
    # which of its submodules were imported before (pytest has imported many)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_dataset.py"), "--out",
                    str(tmp_path)], check=True, capture_output=True)
    for path in sorted(TASKS_DIR.rglob("*.json*")):
        assert (tmp_path / path.relative_to(TASKS_DIR)).read_bytes() == path.read_bytes(), path


def test_more_train_adds_only_pretraining_modules_functions(tmp_path):
    """--more-train writes the built-in train split unchanged, then records of the same
    format from PRETRAIN_MODULES only: none from a task module, none repeating a prompt,
    none a validation or test prompt, and the built-in task files are left as they were."""
    corpus = script("stdlib_corpus")
    out, more = tmp_path / "tasks", tmp_path / "more"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_dataset.py"), "--out", str(out),
                    "--more-train", str(more)], check=True, capture_output=True)
    assert sorted(p.name for p in more.iterdir()) == ["call", "docstring", "params"]
    for name in ("params", "call", "docstring"):
        built = (out / name / "train.jsonl").read_text(encoding="utf-8")
        text = (more / name / "train.jsonl").read_text(encoding="utf-8")
        assert text.startswith(built) and len(text) > 2 * len(built)
        extra = [json.loads(line) for line in text[len(built):].splitlines()]
        prompts = [r["prompt"] for r in extra]
        assert len(set(prompts)) == len(prompts)
        held = {r["prompt"] for split in ("validation", "test") for r in get_task(name).records(split)}
        assert not held & set(prompts)
        for r in extra:
            qualname = r["prompt"][4:].split("(")[0]
            assert any(qualname.startswith(m + ".") for m in corpus.PRETRAIN_MODULES), qualname
            assert not any(qualname.startswith(m + ".") for m in corpus.TASK_MODULES), qualname
            assert r["prompt"].endswith(get_task(name).records("test")[0]["prompt"][-6:])
            assert r["completion"].strip() and "\n" not in r["completion"]


def test_no_task_module_file_is_in_the_pretraining_corpus():
    """The corpus leaves out every file of every task module (sources found through the
    modules' own __file__, and their tests), and the reference text is held-out corpus text."""
    corpus = script("stdlib_corpus")
    files = corpus.corpus_files()
    corpus.check_disjoint(files)                      # raises on a leak
    rel = [str(f.relative_to(corpus.STDLIB)) for f in files]
    names = set(rel)
    assert "textwrap.py" not in names and "test/test_textwrap.py" not in names
    assert "inspect.py" in names and "test/test_ast.py" in names
    report = json.loads((TINY / "pretrain.json").read_text())
    assert set(report["reference_files"]) <= set(report["held_out_files"]) <= names
    every_50th = [n for i, n in enumerate(rel) if i % 50 == 49]   # pretrain_tiny's rule
    assert set(report["held_out_files"]) <= set(every_50th)         # (empty files skipped)
    assert len(report["held_out_files"]) >= 0.8 * len(every_50th)
