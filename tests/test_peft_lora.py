"""LoRA against PEFT on a tiny random GPT-2, plus what every PeftModel shares: files, errors,
trainable parameters, generation."""
import json
import math
import warnings

import pytest
import torch

from minift import GPT
from minift.peft import (LoraConfig, LoraLinear, PeftError, PeftModel, PrefixTuningConfig,
                         PromptTuningConfig, get_peft_model)
from peft_helpers import (assert_close, assert_matches_peft, batch, cross_load, pair,
                          train_steps)


@pytest.fixture
def peft():
    """The reference, for the tests that compare with it (the others run without it)."""
    return pytest.importorskip("peft")


LORA_CASES = [  # (minift/PEFT kwargs) several targets and ranks, rsLoRA, layer selection, regex
    dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
    dict(r=2, lora_alpha=16, target_modules=["c_fc", "mlp.c_proj"], use_rslora=True),
    dict(r=8, lora_alpha=4, target_modules=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
         layers_to_transform=[1]),
    dict(r=3, lora_alpha=6, target_modules=["c_proj"], layers_to_transform=0, layers_pattern="h"),
    dict(r=5, lora_alpha=5, target_modules=r".*\.h\.1\.mlp\.c_fc"),
]


@pytest.mark.parametrize("kw", LORA_CASES)
def test_lora_logits_and_loss_match_peft(hf_tiny, kw, capsys, peft):
    folder, _ = hf_tiny
    ours, theirs = pair(folder, LoraConfig(**kw), peft.LoraConfig(task_type="CAUSAL_LM", **kw))
    assert_matches_peft(ours, theirs, capsys, atol=1e-6)   # measured: <= 1.1e-7 logits, 5e-7 loss


def test_lora_starts_at_the_base_model_and_scales(hf_tiny):
    folder, _ = hf_tiny
    base = GPT.from_pretrained(folder)
    ids, _, _ = batch()
    expected = base(ids).logits
    model = get_peft_model(GPT.from_pretrained(folder), LoraConfig(r=4, lora_alpha=32))
    assert torch.equal(model(ids).logits, expected)  # B = 0: exactly the pretrained function
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraLinear) and layer.scaling == 32 / 4
    bound = 1 / math.sqrt(32)  # Kaiming-uniform, a=sqrt(5), fan_in 32: U(-1/sqrt(32), 1/sqrt(32))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 4
    assert layer.lora_A.weight.shape == (4, 32) and layer.lora_B.weight.shape == (96, 4)
    rs = get_peft_model(GPT.from_pretrained(folder), LoraConfig(r=4, lora_alpha=32, use_rslora=True))
    assert rs.base_model.model.transformer.h[0].attn.c_attn.scaling == 32 / 2


def test_lora_files_interoperate_with_peft(hf_tiny, tmp_path, peft):
    folder, _ = hf_tiny
    kw = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], layers_to_transform=[0, 1])
    ours, theirs = pair(folder, LoraConfig(**kw, base_model_name_or_path=str(folder)),
                        peft.LoraConfig(task_type="CAUSAL_LM", **kw))
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    # the weights file is byte-for-byte PEFT's; the config holds PEFT's value for every key
    # minift writes (PEFT writes more keys, for features minift lacks, and reads ours unchanged)
    assert ((tmp_path / "ours/adapter_model.safetensors").read_bytes()
            == (tmp_path / "theirs/adapter_model.safetensors").read_bytes())
    mine, peft_cfg = (json.loads((tmp_path / side / "adapter_config.json").read_text())
                      for side in ("ours", "theirs"))
    # PEFT writes target_modules from a set: its order changes with Python's string hashing
    assert sorted(peft_cfg.pop("target_modules")) == mine.pop("target_modules") == ["c_attn", "c_fc"]
    assert mine == {k: peft_cfg[k] for k in mine}
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "ours/adapter_model.safetensors"), load_file(
        tmp_path / "theirs/adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)  # same keys, shapes and values as PEFT writes
    # minift's file in PEFT, PEFT's file in minift: logits equal to the original models
    loaded_peft, loaded = cross_load(folder, tmp_path, ours, theirs)
    assert loaded.peft_config.r == 4 and loaded.num_parameters(trainable_only=True) == 0
    # loaded for inference, as PEFT: eval mode, so LoRA dropout is off on every module
    assert loaded_peft.training is False and loaded.training is False
    assert not any(m.training for m in loaded.modules())
    trainable = PeftModel.from_pretrained(GPT.from_pretrained(folder), tmp_path / "theirs",
                                          is_trainable=True)
    assert trainable.num_parameters(trainable_only=True) == sum(v.numel() for v in b.values())


def test_merge_unmerge_and_merge_and_unload(hf_tiny, peft):
    folder, _ = hf_tiny
    kw = dict(r=4, lora_alpha=8, target_modules=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"])
    ours, theirs = pair(folder, LoraConfig(**kw), peft.LoraConfig(task_type="CAUSAL_LM", **kw))
    ids, mask, _ = batch()
    before = ours(ids, attention_mask=mask).logits
    base_weights = {n: p.clone() for n, p in ours.named_parameters() if "base_layer" in n}
    ours.merge()
    assert all(m.merged for m in ours.base_model.lora_layers().values())
    changed = [n for n, p in ours.named_parameters() if n in base_weights
               and not torch.equal(p, base_weights[n])]
    assert len(changed) == 2 * 4          # every targeted weight of both blocks
    assert_close(ours(ids, attention_mask=mask).logits, before)
    ours.train(), ours.eval()          # merging is never a side effect of train()/eval()
    assert all(m.merged for m in ours.base_model.lora_layers().values())
    ours.unmerge()
    for n, p in ours.named_parameters():   # unmerge restores the base weights bit for bit
        if n in base_weights:
            assert torch.equal(p, base_weights[n]), n
    assert torch.equal(ours(ids, attention_mask=mask).logits, before)
    merged = ours.merge_and_unload()
    assert type(merged) is GPT and not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert sorted(merged.state_dict()) == sorted(GPT.from_pretrained(folder).state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = theirs.merge_and_unload()
    assert_close(merged(ids, attention_mask=mask).logits,
                 peft_merged(input_ids=ids, attention_mask=mask).logits)


def test_merge_refuses_tied_lm_head_and_other_methods(hf_tiny):
    folder, _ = hf_tiny
    model = get_peft_model(GPT.from_pretrained(folder), LoraConfig(target_modules=["lm_head"]))
    with pytest.raises(PeftError, match="lm_head"):
        model.merge()
    prompt = get_peft_model(GPT.from_pretrained(folder), PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(PeftError, match="PROMPT_TUNING cannot be merged"):
        prompt.merge_and_unload()


def test_only_lora_trains_and_base_stays_bit_identical(hf_tiny):
    folder, _ = hf_tiny
    model = get_peft_model(GPT.from_pretrained(folder), LoraConfig(r=4, lora_dropout=0.1,
                                                                 target_modules=["c_attn", "c_fc"]))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids, _, _ = batch()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in n), n
    train_steps(model, ids)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_greedy_generation_matches_peft_and_cache(hf_tiny, peft):
    folder, _ = hf_tiny
    kw = dict(r=4, lora_alpha=8, target_modules=["c_attn", "mlp.c_proj"])
    ours, theirs = pair(folder, LoraConfig(**kw), peft.LoraConfig(task_type="CAUSAL_LM", **kw))
    prompt = batch(B=1)[0]
    cached = ours.generate(prompt, max_new_tokens=6)
    assert torch.equal(cached, ours.generate(prompt, max_new_tokens=6, use_cache=False))
    expected = theirs.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                               max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(cached, expected)


def test_bad_configs_raise_one_clear_error(hf_tiny):
    folder, _ = hf_tiny
    model = GPT.from_pretrained(folder)
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(PeftError, match="'q_proj'"):
        get_peft_model(model, LoraConfig(target_modules=["c_attn", "q_proj"]))
    with pytest.raises(PeftError, match="ln_1"):
        get_peft_model(model, LoraConfig(target_modules=["ln_1"]))
    with pytest.raises(PeftError, match="r=0"):
        LoraConfig(r=0)
    with pytest.raises(PeftError, match="r=-2"):
        LoraConfig(r=-2)
    with pytest.raises(PeftError, match="bias"):
        LoraConfig(bias="all")
    with pytest.raises(PeftError, match="num_virtual_tokens=64"):
        get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=64))  # n_positions = 64
    with pytest.raises(PeftError, match="task_type"):
        LoraConfig(task_type="SEQ_CLS")
    # nothing was changed by the failures: same parameter names, all still trainable
    assert [n for n, _ in model.named_parameters()] == names
    assert all(p.requires_grad for p in model.parameters())


def test_bad_adapter_folders_raise_one_clear_error(hf_tiny, tmp_path):
    folder, _ = hf_tiny
    small = get_peft_model(GPT.from_pretrained(folder), LoraConfig(r=4))
    small.save_pretrained(tmp_path / "ok")
    from conftest import make_hf_gpt2
    make_hf_gpt2(tmp_path / "wide", n_embd=48)
    wide = GPT.from_pretrained(tmp_path / "wide")
    names = [n for n, _ in wide.named_parameters()]
    key = r"base_model\.model\.transformer\.h\.0\.attn\.c_attn\.lora_A\.weight"
    with pytest.raises(PeftError, match=key):
        PeftModel.from_pretrained(wide, tmp_path / "ok")
    assert [n for n, _ in wide.named_parameters()] == names      # LoRA layers taken out again
    assert all(p.requires_grad for p in wide.parameters())
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        PeftModel.from_pretrained(wide, tmp_path)                 # a folder without adapter files
    (tmp_path / "nocfg").mkdir()
    (tmp_path / "nocfg/adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(PeftError, match="adapter_config.json"):
        PeftModel.from_pretrained(wide, tmp_path / "nocfg")
    cfg = json.loads((tmp_path / "ok/adapter_config.json").read_text())
    for name, change, message in [("unknown", {"peft_type": "IA3"}, "'IA3'"),
                                  ("bias", {"lora_bias": True}, "lora_bias"),
                                  ("rank", {"r": 0}, "r=0")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(PeftError, match=message):
            PeftModel.from_pretrained(wide, tmp_path / name)
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle/adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "pickle/adapter_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(PeftError, match="pickle"):
        PeftModel.from_pretrained(wide, tmp_path / "pickle")
    (tmp_path / "pickle/adapter_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        PeftModel.from_pretrained(wide, tmp_path / "pickle")
    with pytest.raises(PeftError, match="outside"):
        PeftModel.from_pretrained(wide, tmp_path / "ok", subfolder="../pickle")
    (tmp_path / "link").mkdir()
    (tmp_path / "link/adapter_config.json").symlink_to(tmp_path / "ok/adapter_config.json")
    with pytest.raises(PeftError, match="outside"):
        PeftModel.from_pretrained(wide, tmp_path / "link")
    assert [n for n, _ in wide.named_parameters()] == names


def test_wrong_unexpected_and_missing_keys_are_named(hf_tiny, tmp_path):
    folder, _ = hf_tiny
    get_peft_model(GPT.from_pretrained(folder), LoraConfig(r=2)).save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(PeftError, match=key.replace(".", r"\.")):
        PeftModel.from_pretrained(GPT.from_pretrained(folder), tmp_path)
    extra = {**tensors, "base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight": torch.zeros(2, 32)}
    save_file(extra, tmp_path / "adapter_model.safetensors")
    with pytest.raises(PeftError, match=r"mlp\.c_fc\.lora_A"):
        PeftModel.from_pretrained(GPT.from_pretrained(folder), tmp_path)
