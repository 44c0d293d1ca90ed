"""DoRA (LoraConfig(use_dora=True)) against PEFT's: logits, losses, gradients, files both ways,
merging on every GPT-2 layer (the square c_proj included), and the op's gradients."""
import json
import warnings

import pytest
import torch

from minift import GPT
from minift.peft import LoraConfig, LoraLinear, PeftError, PeftModel, get_peft_model, merge_lora
from minift.peft.dora import dora_linear
from conftest import reference_keep
from peft_helpers import assert_close, assert_matches_peft, batch, cross_load, pair, peft_params

peft = pytest.importorskip("peft")

EVERY_LAYER = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]  # attn.c_proj is (C, C)


def dora_pair(folder, **kw):
    kw = dict(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
              target_modules=EVERY_LAYER, **kw)
    return pair(folder, LoraConfig(**kw), peft.LoraConfig(task_type="CAUSAL_LM", **kw))


def test_dora_logits_loss_and_gradients_match_peft(hf_tiny, capsys):
    folder, _ = hf_tiny
    ours, theirs = dora_pair(folder)
    names = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert sum("lora_magnitude_vector" in n for n in names) == 2 * 4     # one per layer
    assert_matches_peft(ours, theirs, capsys)
    ids, mask, labels = batch()
    # eval mode: GPT-2's own dropouts differ between the stacks (the grads are the same)
    ours(ids, attention_mask=mask, labels=labels).loss.backward()
    theirs(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    other = peft_params(theirs)
    for n in names:   # the magnitude's and A/B's gradients (the norm detached, DoRA §4.3)
        assert_close(ours.get_parameter(n).grad, other[n].grad, atol=1e-6)


def test_dora_starts_as_lora_and_magnitude_is_the_row_norm(hf_tiny):
    """m starts at ||W + s B A|| over each output row of the (out, in) weight, so a fresh
    DoRA layer computes the same as LoRA with the same A, B."""
    folder, _ = hf_tiny
    torch.manual_seed(0)
    dora = get_peft_model(GPT.from_pretrained(folder), LoraConfig(
        r=4, use_dora=True, init_lora_weights=False, target_modules=EVERY_LAYER))
    layer = dora.get_base_model().transformer.h[0].attn.c_proj
    W, A, B = layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight
    expected = torch.sqrt(((W + layer.scaling * B @ A) ** 2).sum(dim=1))  # (out,)
    assert_close(layer.lora_magnitude_vector, expected, atol=1e-6)
    lora = get_peft_model(GPT.from_pretrained(folder), LoraConfig(
        r=4, init_lora_weights=False, target_modules=EVERY_LAYER))
    lora.load_adapter_state_dict({k: v for k, v in dora.adapter_state_dict().items()
                                  if "magnitude" not in k})
    ids, _, _ = batch()
    assert_close(dora(ids).logits, lora(ids).logits)


def test_dora_files_move_both_ways_with_peft(hf_tiny, tmp_path):
    folder, _ = hf_tiny
    ours, theirs = dora_pair(folder)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file
    a = load_file(tmp_path / "ours/adapter_model.safetensors")
    b = load_file(tmp_path / "theirs/adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    assert "base_model.model.transformer.h.0.attn.c_proj.lora_magnitude_vector" in a
    assert json.loads((tmp_path / "ours/adapter_config.json").read_text())["use_dora"] is True
    loaded_peft, loaded = cross_load(folder, tmp_path, ours, theirs)
    assert loaded.peft_config.use_dora


def test_dora_merge_unmerge_are_exact_inverses_on_every_layer(hf_tiny):
    folder, _ = hf_tiny
    ours, theirs = dora_pair(folder)
    ids, mask, _ = batch()
    before = ours(ids, attention_mask=mask).logits
    layers = ours.base_model.lora_layers()
    assert len(layers) == 8
    base = {n: m.base_layer.weight.clone() for n, m in layers.items()}
    ours.merge()
    for n, m in layers.items():                         # every weight changed, square ones too
        assert not torch.equal(m.base_layer.weight, base[n]), n
    assert_close(ours(ids, attention_mask=mask).logits, before)
    ours.unmerge()
    for n, m in layers.items():
        assert torch.equal(m.base_layer.weight, base[n]), n
    assert torch.equal(ours(ids, attention_mask=mask).logits, before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs.merge_and_unload()(input_ids=ids, attention_mask=mask).logits
    assert_close(ours.merge_and_unload()(ids, attention_mask=mask).logits, expected)


def test_merge_lora_is_pure_and_matches_the_merged_layer(hf_tiny):
    """merge_lora over a state dict: the input untouched, plain GPT keys out, and on the
    square c_proj the magnitude scales the rows of the (out, in) weight (the columns would
    fit the shape too, and give PEFT-different numbers)."""
    folder, _ = hf_tiny
    ours, _ = dora_pair(folder)
    state = {k: v.clone() for k, v in ours.get_base_model().state_dict().items()}
    merged = merge_lora(state, ours.peft_config)
    assert all(torch.equal(v, ours.get_base_model().state_dict()[k]) for k, v in state.items())
    assert sorted(merged) == sorted(GPT.from_pretrained(folder).state_dict())
    p = "transformer.h.1.attn.c_proj."
    W, A, B, m = (state[p + "base_layer.weight"], state[p + "lora_A.weight"],
                  state[p + "lora_B.weight"], state[p + "lora_magnitude_vector"])
    s = ours.peft_config.scaling
    V = W + s * B @ A
    rows = m[:, None] * V / V.norm(dim=1, keepdim=True)
    assert_close(merged[p + "weight"], rows, atol=1e-6)
    assert (merged[p + "weight"] - V * m[None, :] / V.norm(dim=0)).abs().max() > 1e-2
    with pytest.raises(PeftError, match="use_dora"):
        merge_lora(state, LoraConfig(r=4))


def test_dora_op_gradcheck_and_dropout():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 5, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    m = torch.rand(6, dtype=torch.float64, requires_grad=True) + 0.5
    # the norm is a constant in the backward (§4.3), so gradcheck runs on x, b and m,
    # and A/B's gradients are compared with the plain formula's (norm detached)
    torch.autograd.gradcheck(lambda x, b, m: dora_linear(x, W, b, A.detach(), B.detach(), m, 2.0),
                             (x, b, m))

    def plain(x, keep=None, p=0.0):
        n = (W + 2.0 * B @ A).norm(dim=1).detach()
        xd = x if keep is None else x * keep / (1 - p)
        return x @ W.T + b + (m / n - 1) * (xd @ W.T) + (m / n) * 2.0 * (xd @ A.T @ B.T)
    y = dora_linear(x, W, b, A, B, m, 2.0)
    grads = torch.autograd.grad(y.sum(), (x, A, B, m, b))
    expected = torch.autograd.grad(plain(x).sum(), (x, A, B, m, b))
    for g, e in zip(grads, expected):
        assert_close(g, e, atol=1e-10)
    torch.manual_seed(7)                     # with dropout: PEFT's form under the same mask
    y = dora_linear(x, W, b, A, B, m, 2.0, dropout_p=0.25)
    torch.manual_seed(7)
    keep = reference_keep(x.shape, 0.25)    # keep_mask's draws
    assert_close(y, plain(x, keep, 0.25), atol=1e-10)


def test_dora_layer_keeps_half_precision_base_and_float32_adapter():
    base = torch.nn.Linear(8, 8).to(torch.bfloat16)
    layer = LoraLinear(base, r=2, lora_alpha=4, use_dora=True, init_lora_weights=False)
    assert layer.lora_magnitude_vector.dtype == torch.float32
    y = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_magnitude_vector.grad is not None


def test_use_dora_on_other_methods_is_one_clear_error(hf_tiny, tmp_path):
    folder, _ = hf_tiny
    from minift.peft import PromptTuningConfig
    prompt = get_peft_model(GPT.from_pretrained(folder), PromptTuningConfig(num_virtual_tokens=2))
    prompt.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(PeftError, match="use_dora.*LoRA only"):
        PeftModel.from_pretrained(GPT.from_pretrained(folder), tmp_path)
