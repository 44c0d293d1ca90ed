"""Houlsby adapters (checked against transformers' GPT-2 with the same adapters added by test
hooks) and partial / full fine-tuning."""
import json

import pytest
import torch
import torch.nn.functional as F

from minift import GPT
from minift.peft import (AdapterConfig, PeftError, PeftModel, freeze_all_but_top,
                         get_peft_model, unfreeze_all)
from peft_helpers import assert_close, batch, hf_model, train_steps

D, M, L, V = 32, 8, 2, 97    # tiny config: n_embd, bottleneck, blocks, vocabulary


def adapter_model(folder, **kw):
    return get_peft_model(GPT.from_pretrained(folder), AdapterConfig(bottleneck_size=M, **kw))


@torch.no_grad()
def randomize(model, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_adapters_match_transformers_with_the_same_adapters(hf_tiny):
    """Placement check: the adapter acts on attn.c_proj's and mlp.c_proj's output, before the
    residual add; the same maths hooked onto transformers' GPT-2 gives the same logits."""
    folder, _ = hf_tiny
    ours = adapter_model(folder)
    randomize(ours)
    reference = hf_model(folder)
    gpt = ours.get_base_model()
    for i, block in enumerate(reference.transformer.h):
        for name, module in (("attn", block.attn.c_proj), ("mlp", block.mlp.c_proj)):
            a = getattr(gpt.transformer.h[i], name).c_proj.adapter
            module.register_forward_hook(lambda m, inp, out, a=a: out + F.linear(
                F.gelu(F.linear(out, a.down.weight, a.down.bias)), a.up.weight, a.up.bias))
        for ln in ("ln_1", "ln_2"):
            getattr(block, ln).load_state_dict(getattr(gpt.transformer.h[i], ln).state_dict())
    reference.transformer.ln_f.load_state_dict(gpt.transformer.ln_f.state_dict())
    ids, mask, labels = batch()
    a = ours(ids, attention_mask=mask, labels=labels)
    b = reference(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(a.logits, b.logits)
    assert_close(a.loss, b.loss)


def test_near_identity_at_init(hf_tiny):
    folder, _ = hf_tiny
    ids, _, _ = batch()
    base = GPT.from_pretrained(folder)(ids).logits
    exact = adapter_model(folder, init_up_zero=True)(ids).logits
    assert torch.equal(exact, base)              # up = 0: the adapter adds exactly zero
    near = adapter_model(folder)(ids).logits     # N(0, 1e-2) truncated: O(1e-4) off
    assert 0 < (near - base).abs().max() < 1e-3


@pytest.mark.parametrize("kw, blocks, norms", [(dict(), L, True),
                                               (dict(train_layer_norms=False), L, False),
                                               (dict(layers_to_transform=[1]), 1, True)])
def test_parameter_count_by_formula(hf_tiny, kw, blocks, norms, capsys):
    folder, _ = hf_tiny
    model = adapter_model(folder, **kw)
    per_adapter = 2 * M * D + D + M              # Houlsby §2.1: 2md + d + m
    layer_norms = (2 * L + 1) * 2 * D            # ln_1, ln_2 per block and ln_f: weight + bias
    expected = 2 * blocks * per_adapter + (layer_norms if norms else 0)
    base = GPT.from_pretrained(folder).num_parameters()
    assert model.get_nb_trainable_parameters() == (expected, base + 2 * blocks * per_adapter)
    model.print_trainable_parameters()
    total = base + 2 * blocks * per_adapter
    assert capsys.readouterr().out == (f"trainable params: {expected:,d} || all params: {total:,d}"
                                       f" || trainable%: {100 * expected / total:.4f}\n")


def test_only_adapters_and_layer_norms_train(hf_tiny):
    folder, _ = hf_tiny
    model = adapter_model(folder)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not any(".adapter." in n or "ln_" in n for n in frozen)
    ids, _, _ = batch()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (".adapter." in n or ".ln_" in n), n
    before, after = train_steps(model, ids, steps=5)
    assert after < before
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_save_load_roundtrip_and_generation(hf_tiny, tmp_path):
    folder, _ = hf_tiny
    model = adapter_model(folder)
    randomize(model)
    ids, mask, _ = batch()
    expected = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "HOULSBY_ADAPTER" and config["bottleneck_size"] == M
    from safetensors.torch import load_file
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.transformer.h.0.attn.c_proj.adapter.down.weight" in keys
    assert "base_model.model.transformer.ln_f.weight" in keys      # trained, so saved
    loaded = PeftModel.from_pretrained(GPT.from_pretrained(folder), tmp_path)
    assert torch.equal(loaded(ids, attention_mask=mask).logits, expected)
    cached = loaded.generate(ids, attention_mask=mask, max_new_tokens=5)
    assert torch.equal(cached, loaded.generate(ids, attention_mask=mask, max_new_tokens=5,
                                               use_cache=False))
    with pytest.raises(PeftError, match="cannot be merged"):
        loaded.merge_and_unload()
    plain = loaded.unload()
    assert sorted(plain.state_dict()) == sorted(GPT.from_pretrained(folder).state_dict())


def test_partial_fine_tuning_counts_by_formula(hf_tiny):
    folder, _ = hf_tiny
    model = GPT.from_pretrained(folder)
    # c_attn 3d²+3d, attn.c_proj d²+d, c_fc 4d²+4d, mlp.c_proj 4d²+d, ln_1 and ln_2 4d
    block = 12 * D * D + 13 * D
    assert freeze_all_but_top(model, 1) == block + 2 * D
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if n.startswith(("transformer.h.1.", "transformer.ln_f."))}
    ids, _, _ = batch()
    model(ids, labels=ids).loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    assert freeze_all_but_top(model, 0, train_ln_f=False) == 0
    # lm_head is tied to wte: training the head trains the input embeddings too
    assert freeze_all_but_top(model, 2, train_head=True) == 2 * block + 2 * D + V * D
    assert model.transformer.wte.weight.requires_grad
    assert unfreeze_all(model) == model.num_parameters() == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="k=3"):
        freeze_all_but_top(model, 3)
