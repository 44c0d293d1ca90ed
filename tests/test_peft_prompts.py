"""Prompt tuning, P-tuning and prefix tuning against PEFT on a tiny random GPT-2."""
import json

import pytest
import torch

from minift import GPT
from minift.peft import (PeftError, PeftModel, PrefixTuningConfig, PromptEncoderConfig,
                         PromptTuningConfig, get_peft_model)
from peft_helpers import (assert_close, assert_matches_peft, batch, cross_load, hf_model, pair,
                          train_steps)

peft = pytest.importorskip("peft")

CASES = {  # name: (minift config class, PEFT config class, shared kwargs)
    "prompt": ("PromptTuningConfig", dict(num_virtual_tokens=3)),
    "p-mlp": ("PromptEncoderConfig", dict(num_virtual_tokens=4, encoder_hidden_size=16)),
    "p-lstm": ("PromptEncoderConfig", dict(num_virtual_tokens=3, encoder_hidden_size=8,
                                           encoder_reparameterization_type="LSTM")),
    "prefix": ("PrefixTuningConfig", dict(num_virtual_tokens=3)),
    "prefix-mlp": ("PrefixTuningConfig", dict(num_virtual_tokens=2, prefix_projection=True,
                                              encoder_hidden_size=16)),
}
MINIFT = dict(PromptTuningConfig=PromptTuningConfig, PromptEncoderConfig=PromptEncoderConfig,
              PrefixTuningConfig=PrefixTuningConfig)


def make_pair(folder, name):
    cls, kw = CASES[name]
    return pair(folder, MINIFT[cls](**kw), getattr(peft, cls)(task_type="CAUSAL_LM", **kw))


@pytest.mark.parametrize("name", CASES)
def test_logits_loss_and_counts_match_peft(hf_tiny, name, capsys):
    folder, _ = hf_tiny
    ours, theirs = make_pair(folder, name)
    n = CASES[name][1]["num_virtual_tokens"]
    # PEFT returns logits for the virtual positions too when they are input embeddings
    assert_matches_peft(ours, theirs, capsys, positions=7 if name.startswith("prefix") else n + 7)


def test_prompt_tuning_with_inputs_embeds_matches_peft(hf_tiny):
    folder, _ = hf_tiny
    ours, theirs = make_pair(folder, "prompt")
    ids, mask, labels = batch()
    embeds = ours.get_base_model().transformer.wte(ids)
    a = ours(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    b = theirs(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    assert_close(a.logits, b.logits)
    assert_close(a.loss, b.loss)


@pytest.mark.parametrize("name", CASES)
def test_files_interoperate_with_peft(hf_tiny, tmp_path, name):
    folder, _ = hf_tiny
    ours, theirs = make_pair(folder, name)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file
    a = load_file(tmp_path / "ours/adapter_model.safetensors")
    b = load_file(tmp_path / "theirs/adapter_model.safetensors")
    assert list(a) == list(b) == ["prompt_embeddings"]   # the final tokens only, as PEFT
    assert_close(a["prompt_embeddings"], b["prompt_embeddings"])
    cfg = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    assert cfg["token_dim"] == 32 and cfg["num_layers"] == 2 and cfg["inference_mode"] is True
    _, loaded = cross_load(folder, tmp_path, ours, theirs)
    assert loaded.num_parameters(trainable_only=True) == 0
    again = PeftModel.from_pretrained(GPT.from_pretrained(folder), tmp_path / "ours",
                                      is_trainable=True)
    assert again.num_parameters(trainable_only=True) == a["prompt_embeddings"].numel()


@pytest.mark.parametrize("name", CASES)
def test_only_the_prompt_trains_and_base_stays_bit_identical(hf_tiny, name):
    folder, _ = hf_tiny
    ours, _ = make_pair(folder, name)
    base = {n: p.clone() for n, p in ours.get_base_model().named_parameters()}
    assert not any(p.requires_grad for p in ours.get_base_model().parameters())
    ids, _, _ = batch()
    ours(ids, labels=ids).loss.backward()
    for n, p in ours.named_parameters():
        assert (p.grad is not None) == n.startswith("prompt_encoder."), n
    before, after = train_steps(ours, ids, steps=5)
    assert after < before
    for n, p in ours.get_base_model().named_parameters():
        assert torch.equal(p, base[n]), n


@pytest.mark.parametrize("name", CASES)
def test_generation_kv_cache_and_peft(hf_tiny, name):
    folder, _ = hf_tiny
    ours, theirs = make_pair(folder, name)
    ids, mask, _ = batch()
    cached = ours.generate(ids, attention_mask=mask, max_new_tokens=5)
    uncached = ours.generate(ids, attention_mask=mask, max_new_tokens=5, use_cache=False)
    assert torch.equal(cached, uncached)
    # a left-padded row continues exactly like the same row unpadded (positions follow the mask)
    assert torch.equal(cached[0, 2:], ours.generate(ids[:1, 2:], max_new_tokens=5)[0])
    # PEFT's generate with use_cache=False, which equals greedy decoding with its forward. Its
    # cached path disagrees with its own forward here (PEFT 0.21.2 + transformers 5.24: for
    # prompt/P-tuning each decode step re-feeds n cached tokens; for prefix tuning the prefill
    # drops the attention mask), so it is no reference.
    expected = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5,
                               do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached[1], expected[1])   # the unpadded row (PEFT ignores position_ids)


def test_prompt_tuning_inits(hf_tiny, tmp_path):
    """SAMPLE_VOCAB copies rows of wte; TEXT repeats the text's token embeddings to length n,
    equal to PEFT's for the same tokenizer, given as an object (a transformers tokenizer, or
    anything with encode)."""
    folder, _ = hf_tiny
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = "[UNK] classify the sentiment of this review".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    hf_tok.save_pretrained(tmp_path / "tok")
    text = dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="classify the sentiment",
                num_virtual_tokens=5)
    theirs = peft.get_peft_model(hf_model(folder), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", tokenizer_name_or_path=str(tmp_path / "tok"), **text))

    class EncodeOnly:  # the smallest tokenizer minift accepts
        def encode(self, s):
            return [words.index(w) for w in s.split()]

    wte = GPT.from_pretrained(folder).transformer.wte.weight
    for tok in (hf_tok, EncodeOnly()):
        ours = get_peft_model(GPT.from_pretrained(folder), PromptTuningConfig(tokenizer=tok, **text))
        got = ours.prompt_encoder.embedding.weight
        assert torch.equal(got, wte[[1, 2, 3, 1, 2]])
        assert torch.equal(got, theirs.prompt_encoder["default"].embedding.weight)
    ours.save_pretrained(tmp_path / "text")   # PEFT loads it although no tokenizer path was given
    loaded = peft.PeftModel.from_pretrained(hf_model(folder), tmp_path / "text")
    assert torch.equal(loaded.prompt_encoder["default"].embedding.weight, got)
    vocab = get_peft_model(GPT.from_pretrained(folder), PromptTuningConfig(
        num_virtual_tokens=6, prompt_tuning_init="SAMPLE_VOCAB"))
    for row in vocab.prompt_encoder.embedding.weight:
        assert (wte == row).all(dim=1).any()
    with pytest.raises(PeftError, match="tokenizer"):
        get_peft_model(GPT.from_pretrained(folder), PromptTuningConfig(**text))


def test_hand_written_prompt_tuning_loop(hf_tiny):
    """Prompt tuning as users write it with transformers, on the plain GPT: embeddings from
    model.transformer.wte, a learned prompt in front, model(inputs_embeds=...)."""
    folder, _ = hf_tiny
    model = GPT.from_pretrained(folder)
    for p in model.parameters():
        p.requires_grad_(False)
    n, ids = 4, torch.full((2, 7), 5)   # a learnable target: the same token throughout
    torch.manual_seed(0)
    prompt = torch.nn.Parameter(torch.randn(n, model.config.n_embd))
    reference = get_peft_model(GPT.from_pretrained(folder), PromptTuningConfig(num_virtual_tokens=n))
    with torch.no_grad():
        reference.prompt_encoder.embedding.weight.copy_(prompt)
    optimizer = torch.optim.AdamW([prompt], lr=0.1)
    losses = []
    for step in range(15):
        embeds = model.transformer.wte(ids)                                   # (B, T, C)
        inputs_embeds = torch.cat([prompt.expand(ids.shape[0], -1, -1), embeds], dim=1)
        labels = torch.cat([torch.full((ids.shape[0], n), -100), ids], dim=1)
        out = model(inputs_embeds=inputs_embeds, labels=labels)
        if step == 0:   # the same computation PeftModel does
            assert torch.equal(out.logits, reference(ids, labels=ids).logits)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05 and losses == sorted(losses, reverse=True), losses


def test_prompt_config_errors(hf_tiny):
    folder, _ = hf_tiny
    model = GPT.from_pretrained(folder)
    for config in (PromptTuningConfig(num_virtual_tokens=64),
                   PromptEncoderConfig(num_virtual_tokens=100)):
        with pytest.raises(PeftError, match="n_positions=64"):
            get_peft_model(model, config)
    with pytest.raises(PeftError, match="num_virtual_tokens"):
        PrefixTuningConfig(num_virtual_tokens=0)
    with pytest.raises(PeftError, match="token_dim=48"):
        get_peft_model(model, PromptTuningConfig(num_virtual_tokens=2, token_dim=48))
    with pytest.raises(PeftError, match="GRU"):
        PromptEncoderConfig(encoder_reparameterization_type="GRU")
    assert all(p.requires_grad for p in model.parameters())
