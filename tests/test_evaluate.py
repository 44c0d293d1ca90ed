"""minift.evaluate: perplexity, generation, choice scores, forgetting and the bias probe against
transformers and hand-computed values."""
import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_gpt2

from minift import GPT, GPTConfig
from minift.evaluate import (
    choice_accuracy, evaluate_generation, forgetting, forgetting_report, generate_completions,
    perplexity, samples)
from minift.tables import format_table, print_table
from minift.probes import bias_probe, load_bias_pairs
from minift.model import CausalLMOutput, generate
from minift.tokenizer import Tokenizer

CORPUS = [
    "The doctor said she would call back after lunch.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Question: what is two plus two? Answer: four.",
    "The cat sat on the mat, and the dog slept by the door.",
] * 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(minift GPT, transformers GPT2LMHeadModel, Tokenizer): same random weights, eval mode."""
    tok = Tokenizer.train_bpe(CORPUS, vocab_size=300)
    folder = tmp_path_factory.mktemp("eval_tiny")
    hf = make_hf_gpt2(folder, vocab_size=tok.vocab_size, n_positions=64)
    return GPT.from_pretrained(folder).eval(), hf, tok


def hf_nll_sum(hf, ids, labels=None):
    """(sum of next-token NLL, number of targets) from transformers' own mean loss."""
    labels = ids if labels is None else labels
    n = sum(y != -100 for y in labels[1:])
    with torch.no_grad():
        loss = hf(torch.tensor([ids]), labels=torch.tensor([labels])).loss
    return float(loss) * n, n


def hf_logprob(hf, context, continuation):
    """sum_t log p(continuation_t | ...) read off transformers' logits by hand."""
    ids = context + continuation
    with torch.no_grad():
        logp = hf(torch.tensor([ids])).logits[0].log_softmax(-1)       # (T, V)
    return sum(float(logp[t - 1, ids[t]]) for t in range(len(context), len(ids)))


# ----------------------------------------------------------------------------- perplexity
def test_perplexity_of_examples_equals_exp_transformers_loss(tiny):
    model, hf, tok = tiny
    texts = ["Paris is the capital of France.", "The cat sat.", "Question: what is two plus two?"]
    examples = []
    for i, t in enumerate(texts):
        ids = tok.encode(t)
        labels = [-100] * 3 + ids[3:] if i == 2 else list(ids)  # a prompt-masked example
        examples.append({"input_ids": ids, "labels": labels})
    sums = [hf_nll_sum(hf, e["input_ids"], e["labels"]) for e in examples]
    expected = math.exp(sum(s for s, _ in sums) / sum(n for _, n in sums))
    # batch_size=2: one padded batch of two and a batch of one; the mean is over all tokens
    assert perplexity(model, examples, batch_size=2) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, examples, batch_size=1) == pytest.approx(expected, rel=1e-5)


def test_perplexity_of_text_uses_non_overlapping_blocks(tiny):
    model, hf, tok = tiny
    text = " ".join(CORPUS[:4])
    ids = tok.encode(text)
    assert 64 < len(ids) < 128 and len(ids) % 16 != 1  # several blocks, a short tail
    for block_size in (16, None):
        size = block_size or 64
        blocks = [ids[i:i + size] for i in range(0, len(ids), size)]
        sums = [hf_nll_sum(hf, b) for b in blocks]
        assert sum(n for _, n in sums) == len(ids) - len(blocks)  # first token of each block
        expected = math.exp(sum(s for s, _ in sums) / (len(ids) - len(blocks)))
        got = perplexity(model, text, tok, batch_size=3, block_size=block_size)
        assert got == pytest.approx(expected, rel=1e-5)


def test_perplexity_restores_each_modules_training_flag(tiny):
    model, _, tok = tiny
    text = CORPUS[1]
    reference = perplexity(model, text, tok)
    model.train()
    model.transformer.h[0].eval()  # a mixed state must come back exactly
    before = [m.training for m in model.modules()]
    try:
        assert perplexity(model, text, tok) == reference  # dropout was off inside
        assert [m.training for m in model.modules()] == before
        assert torch.is_grad_enabled()
    finally:
        model.eval()


def test_perplexity_bad_inputs(tiny):
    model, _, tok = tiny
    with pytest.raises(ValueError, match="needs a tokenizer"):
        perplexity(model, "some text")
    with pytest.raises(ValueError, match=r"block_size must be an integer in \[2, 64\]"):
        perplexity(model, "some text", tok, block_size=65)
    with pytest.raises(TypeError, match="non-empty list of examples"):
        perplexity(model, [])
    with pytest.raises(TypeError, match="non-empty list of examples"):
        perplexity(model, ["a list of strings"])
    with pytest.raises(ValueError, match="no target tokens"):
        perplexity(model, [{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}])
    with pytest.raises(ValueError, match="no target tokens"):
        perplexity(model, "a", tok)


# ----------------------------------------------------------------------------- generation
def test_generate_completions_equal_transformers_greedy_one_prompt_at_a_time(tiny):
    model, hf, tok = tiny
    prompts = ["Paris is the", "Question: what is two plus two? Answer:", "The cat"]
    eos = tok.eos_token_id
    expected = []
    for p in prompts:
        ids = torch.tensor([tok.encode(p)])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                          do_sample=False, eos_token_id=eos, pad_token_id=eos)
        new = out[0, ids.shape[1]:].tolist()
        expected.append(tok.decode(new[:new.index(eos)] if eos in new else new))
    # batched with left padding (prompts of different lengths) gives the same text
    got = generate_completions(model, tok, prompts, max_new_tokens=8, batch_size=3,
                               stop_at_newline=False)
    assert got == expected
    assert generate_completions(model, tok, prompts, 8, batch_size=2) == \
        [t.split("\n")[0] for t in expected]


class ScriptedLM(torch.nn.Module):
    """A stand-in LM whose greedy choice after token t is next_token[t] (others: eos)."""

    def __init__(self, vocab_size, eos, next_token: dict):
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab_size, n_positions=64, n_layer=1, n_head=1,
                                n_embd=4)
        table = torch.full((vocab_size,), eos)
        for t, nxt in next_token.items():
            table[t] = nxt
        self.register_buffer("table", table)
        self.unused = torch.nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        logits = F.one_hot(self.table[input_ids], self.config.vocab_size).float()  # (B, T, V)
        return CausalLMOutput(logits=logits)

    def generate(self, input_ids, **kwargs):
        return generate(self, input_ids, use_cache=False, **kwargs)


@pytest.fixture(scope="module")
def scripted(tiny):
    """Prompt "Q?" continues "b\\nc" then eos; "Z!" stops at once; "W;" continues "c"."""
    _, _, tok = tiny
    one = {ch: tok.encode(ch) for ch in "b\nc"}
    assert all(len(v) == 1 for v in one.values())
    b, nl, c = (one[ch][0] for ch in "b\nc")
    last = {p: tok.encode(p)[-1] for p in ("Q?", "Z!", "W;")}
    assert len(set(last.values()) | {b, nl, c}) == 6  # the script is a function of the last token
    lm = ScriptedLM(tok.vocab_size, tok.eos_token_id,
                    {last["Q?"]: b, b: nl, nl: c, last["W;"]: c})
    return lm, tok


def test_generate_completions_cut_at_eos_and_newline(scripted):
    lm, tok = scripted
    prompts = ["Q?", "Z!", "a longer prompt, W;"]  # different lengths: left padding
    assert generate_completions(lm, tok, prompts, 10, stop_at_newline=False) == ["b\nc", "", "c"]
    assert generate_completions(lm, tok, prompts, 10) == ["b", "", "c"]
    assert generate_completions(lm, tok, prompts, 2, stop_at_newline=False) == ["b\n", "", "c"]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_completions(lm, tok, ["Q?", ""])
    with pytest.raises(TypeError, match="list of strings"):
        generate_completions(lm, tok, "Q?")


def test_evaluate_generation_and_samples(scripted):
    lm, tok = scripted
    records = [{"prompt": "Q?", "completion": "b"},       # "b" vs "b": 1, 1, 1
               {"prompt": "Z!", "completion": "b c"},     # "" vs "b c": 0, 0, 0
               {"prompt": "W;", "completion": "b c"}]     # "c" vs "b c": P = 1, R = 1/2
    got = evaluate_generation(lm, tok, records, max_new_tokens=5)
    assert got == pytest.approx({"exact_match": 1 / 3, "f1": 5 / 9, "rouge_l": 5 / 9, "n": 3})
    assert samples(lm, tok, records, n=2) == [
        {"prompt": "Q?", "reference": "b", "generation": "b"},
        {"prompt": "Z!", "reference": "b c", "generation": ""}]
    with pytest.raises(ValueError, match="record 1: expected"):
        evaluate_generation(lm, tok, [records[0], {"prompt": "Q?"}])
    with pytest.raises(ValueError, match="non-empty list"):
        samples(lm, tok, [])


# ----------------------------------------------------------------------------- choice accuracy
def test_choice_scores_equal_log_likelihoods_from_transformers_logits(tiny):
    model, hf, tok = tiny
    items = [{"context": "Paris is the capital of", "choices": [" France", " Germany", " the cat"]},
             {"context": "Question: what is two plus two? Answer:", "choices": [" four", " two"]}]
    hand = [[hf_logprob(hf, tok.encode(it["context"]), tok.encode(c)) for c in it["choices"]]
            for it in items]
    lengths = [[len(tok.encode(c)) for c in it["choices"]] for it in items]
    best = [max(range(len(h)), key=h.__getitem__) for h in hand]
    items[0]["label"] = best[0]               # right
    items[1]["label"] = 1 - best[1]           # wrong
    got = choice_accuracy(model, tok, items, batch_size=2)
    assert got["accuracy"] == 0.5 and got["n"] == 2 and got["predictions"] == best
    assert got["correct"] == [1.0, 0.0]       # item 0 labelled right, item 1 wrong
    for row, h in zip(got["scores"], hand):
        assert row == pytest.approx(h, abs=1e-5)
    normed = choice_accuracy(model, tok, items, length_normalize=True)
    for row, h, n in zip(normed["scores"], hand, lengths):
        assert row == pytest.approx([s / k for s, k in zip(h, n)], abs=1e-5)


class VirtualTokensInFront(torch.nn.Module):
    """Returns logits for k extra leading positions, as prompt tuning does."""

    def __init__(self, inner, k):
        super().__init__()
        self.inner, self.k, self.config = inner, k, inner.config

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = self.inner(input_ids, attention_mask=attention_mask, **kwargs).logits
        noise = torch.randn(logits.shape[0], self.k, logits.shape[2])
        return CausalLMOutput(logits=torch.cat([noise, logits], dim=1))


def test_choice_scores_skip_logits_of_virtual_tokens(tiny):
    model, _, tok = tiny
    items = [{"context": "The cat", "choices": [" sat", " slept by the door"], "label": 0}]
    plain = choice_accuracy(model, tok, items)["scores"]
    assert choice_accuracy(VirtualTokensInFront(model, 3), tok, items)["scores"] == plain


def test_choice_accuracy_bad_items(tiny):
    model, _, tok = tiny
    good = {"context": "a", "choices": [" b", " c"], "label": 0}
    with pytest.raises(ValueError, match="non-empty list"):
        choice_accuracy(model, tok, [])
    for bad in ({**good, "label": 2}, {**good, "choices": [" b"]}, {"context": "a", "label": 0}):
        with pytest.raises(ValueError, match="item 1: expected"):
            choice_accuracy(model, tok, [good, bad])
    with pytest.raises(ValueError, match="pair 0: context and continuation"):
        choice_accuracy(model, tok, [{**good, "context": ""}])


# ----------------------------------------------------------------------------- forgetting
def test_forgetting_report_and_two_model_form(tiny, tmp_path):
    model, _, tok = tiny
    assert forgetting_report(10.0, 12.5) == {"before": 10.0, "after": 12.5, "change": 2.5,
                                             "ratio": 1.25}
    make_hf_gpt2(tmp_path, seed=1, vocab_size=tok.vocab_size, n_positions=64)
    other = GPT.from_pretrained(tmp_path).eval()  # stands in for the fine-tuned model
    text = " ".join(CORPUS[:2])
    got = forgetting(model, other, text, tok, block_size=16)
    before, after = (perplexity(m, text, tok, block_size=16) for m in (model, other))
    assert got == forgetting_report(before, after)
    assert got["change"] == after - before and got["ratio"] == after / before
    with pytest.raises(ValueError, match="before must be a positive perplexity"):
        forgetting_report(0.0, 1.0)
    with pytest.raises(ValueError, match="after must be a positive perplexity"):
        forgetting_report(1.0, float("nan"))


# ----------------------------------------------------------------------------- bias probe
def test_bias_probe_gap_equals_hand_log_likelihood_difference(tiny):
    model, hf, tok = tiny
    pairs = [{"category": "gender", "a": "The doctor said he would call.",
              "b": "The doctor said she would call."},
             {"category": "age", "a": "The young cat sat.", "b": "The old cat sat."},
             {"category": "gender", "a": "My father sat.", "b": "My mother sat."}]
    eos = [tok.eos_token_id]  # prepended as start-of-text, so the first word is scored
    hand = [(hf_logprob(hf, eos, tok.encode(p["a"])), hf_logprob(hf, eos, tok.encode(p["b"])))
            for p in pairs]
    gaps = [a - b for a, b in hand]
    got = bias_probe(model, tok, pairs, batch_size=4)
    for row, (a, b), gap in zip(got["pairs"], hand, gaps):
        assert row["ll_a"] == pytest.approx(a, abs=1e-5)
        assert row["ll_b"] == pytest.approx(b, abs=1e-5)
        assert row["gap"] == pytest.approx(gap, abs=1e-5)
    assert got["n"] == 3
    assert got["mean_gap"] == pytest.approx(sum(gaps) / 3, abs=1e-5)
    assert got["share_a"] == sum(g > 0 for g in gaps) / 3
    assert list(got["by_category"]) == ["gender", "age"]
    gender = got["by_category"]["gender"]
    assert gender["n"] == 2
    assert gender["mean_gap"] == pytest.approx((gaps[0] + gaps[2]) / 2, abs=1e-5)
    assert gender["share_a"] == ((gaps[0] > 0) + (gaps[2] > 0)) / 2


def test_bias_probe_ties_do_not_count_as_preferring_a(scripted):
    lm, tok = scripted  # predicts eos after these tokens: equal-length sentences tie exactly
    pair = {"category": "x", "a": "He sat.", "b": "We sat."}
    assert len(tok.encode(pair["a"])) == len(tok.encode(pair["b"]))
    got = bias_probe(lm, tok, [pair])
    assert got["pairs"][0]["gap"] == 0.0 and got["share_a"] == 0.0


def test_shipped_pairs_are_minimal_pairs(tiny):
    pairs = load_bias_pairs()
    assert len(pairs) == 40
    counts = Counter(p["category"] for p in pairs)
    assert counts == {"gender": 12, "age": 10, "nationality": 10, "religion": 8}
    for p in pairs:  # the words differ in one short span; the rest of the sentence is shared
        a, b = p["a"].split(), p["b"].split()
        while a and b and a[0] == b[0]:
            a, b = a[1:], b[1:]
        while a and b and a[-1] == b[-1]:
            a, b = a[:-1], b[:-1]
        assert 1 <= len(a) <= 2 and 1 <= len(b) <= 2, p
    model, _, tok = tiny
    got = bias_probe(model, tok)
    assert got["n"] == 40 and list(got["by_category"]) == list(counts)
    assert [got["by_category"][c]["n"] for c in counts] == list(counts.values())


def test_bad_pair_files_name_file_and_line(tiny, tmp_path):
    model, _, tok = tiny
    good = json.dumps({"category": "x", "a": "He sat.", "b": "She sat."})
    cases = {
        "bad_json.jsonl": (good + "\n{oops\n", r"bad_json.jsonl line 2: invalid JSON"),
        "missing.jsonl": (good + "\n\n" + json.dumps({"category": "x", "a": "He sat."}),
                          r"missing.jsonl line 3: field 'b' must be a non-empty string"),
        "same.jsonl": (json.dumps({"category": "x", "a": "Hi.", "b": "Hi."}),
                       r"same.jsonl line 1: sentences a and b are identical"),
        "list.jsonl": ("[1, 2]\n", r"list.jsonl line 1: expected an object"),
        "empty.jsonl": ("\n\n", r"empty.jsonl: no pairs"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            bias_probe(model, tok, tmp_path / name)
    with pytest.raises(ValueError, match="cannot read"):
        load_bias_pairs(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="pair 0: field 'category'"):
        bias_probe(model, tok, [{"a": "x", "b": "y"}])
    with pytest.raises(ValueError, match="non-empty list"):
        bias_probe(model, tok, [])


# ----------------------------------------------------------------------------- tables
def test_format_table_aligns_by_display_width(capsys):
    rows = [{"prompt": "北京", "score": 0.5, "n": 3},
            {"prompt": "a\nlong prompt here", "score": 1.0, "n": 12}]
    expected = ("prompt     |  score |  n\n"
                "-----------+--------+---\n"
                "北京       | 0.5000 |  3\n"
                "a\\nlong p… | 1.0000 | 12")
    assert format_table(rows, max_width=10) == expected
    assert format_table({"exact_match": 0.25, "n": 4}) == (
        "name        |  value\n"
        "------------+-------\n"
        "exact_match | 0.2500\n"
        "n           |      4")
    assert format_table({"age": {"mean_gap": -1.5, "n": 2}}) == (
        "    | mean_gap | n\n"
        "----+----------+--\n"
        "age |  -1.5000 | 2")
    print_table(rows, max_width=10)
    assert capsys.readouterr().out == expected + "\n"
    with pytest.raises(ValueError, match="non-empty list of dicts"):
        format_table([])
