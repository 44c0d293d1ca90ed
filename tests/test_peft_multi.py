"""Several adapters on one model against PEFT: load_adapter, set_adapter, disable_adapter,
add_weighted_adapter ("linear", "cat", "ties", "svd"), PEFT's subfolder layout."""
import json
import warnings

import pytest
import torch

from minift import GPT
from minift.peft import (AdapterConfig, LoraConfig, PeftError, PeftModel, PromptTuningConfig,
                         get_peft_model)
from peft_helpers import assert_close, batch, hf_model

peft = pytest.importorskip("peft")

A = dict(r=4, lora_alpha=8, target_modules=["c_attn"])
B = dict(r=4, lora_alpha=16, target_modules=["c_attn", "mlp.c_proj"], use_rslora=True)
C = dict(r=2, lora_alpha=4, target_modules=["c_fc"])       # another rank, other layers


@pytest.fixture(scope="module")
def saved(hf_tiny, tmp_path_factory):
    """PEFT's model with adapters a, b, c (random values), saved in PEFT's layout."""
    folder, _ = hf_tiny
    out = tmp_path_factory.mktemp("multi")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(hf_model(folder), peft.LoraConfig(**A), adapter_name="a")
        theirs.add_adapter("b", peft.LoraConfig(**B))
        theirs.add_adapter("c", peft.LoraConfig(**C))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    theirs.save_pretrained(out)
    return folder, out, theirs


def ours_with_abc(folder, out):
    ours = PeftModel.from_pretrained(GPT.from_pretrained(folder), out / "a", adapter_name="a")
    ours.load_adapter(out / "b", adapter_name="b")
    ours.load_adapter(out / "c", adapter_name="c")
    return ours


def peft_logits(theirs, ids, mask):
    return theirs(input_ids=ids, attention_mask=mask).logits


def test_load_set_and_disable_adapters_match_peft(saved):
    folder, out, theirs = saved
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["a", "b", "c"]  # PEFT's layout
    ours = ours_with_abc(folder, out)
    ids, mask, _ = batch()
    for name in ("a", "b", "c"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        assert ours.active_adapter == name
        assert_close(ours(ids, attention_mask=mask).logits, peft_logits(theirs, ids, mask))
        with ours.disable_adapter(), theirs.disable_adapter():
            assert_close(ours(ids, attention_mask=mask).logits, peft_logits(theirs, ids, mask))
    base = hf_model(folder)(input_ids=ids, attention_mask=mask).logits
    with ours.disable_adapter():
        assert_close(ours(ids, attention_mask=mask).logits, base)
    # as PEFT's set_adapter: the adapter switched to trains (though loaded for inference),
    # every other parameter is frozen; inference_mode=True freezes it too
    trainable = lambda m: {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable(ours) == set(ours.adapter_parameters("c")) and len(trainable(ours)) == 2 * 2
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.set_adapter("a", inference_mode=True)
    theirs.set_adapter("a", inference_mode=True)
    assert not trainable(ours) and not trainable(theirs)
    ours.load_adapter(out / "b", adapter_name="b2")               # frozen until switched to
    theirs.load_adapter(out / "b", adapter_name="b2")
    assert not trainable(ours) and not trainable(theirs)
    ours.load_adapter(out / "a", adapter_name="a2", is_trainable=True)  # trains, as in PEFT
    assert trainable(ours) == set(ours.adapter_parameters("a2"))
    ours.set_adapter("b", inference_mode=True)
    ours.set_adapter("a2")                                        # only the active one trains
    assert trainable(ours) == set(ours.adapter_parameters("a2")) and len(trainable(ours)) == 2 * 2


def test_saved_adapters_use_peft_subfolders_and_load_in_peft(saved, tmp_path):
    folder, out, theirs = saved
    ours = ours_with_abc(folder, out)
    ours.save_pretrained(tmp_path)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    theirs_files = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                          if p.is_file() and p.name != "README.md")
    assert files == theirs_files
    ids, mask, _ = batch()
    for name in ("b", "c"):
        loaded = peft.PeftModel.from_pretrained(hf_model(folder), tmp_path / name)
        theirs.set_adapter(name)
        assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                     peft_logits(theirs, ids, mask))


@pytest.mark.parametrize("kind, names, weights, kw", [
    ("linear", ["a", "b"], [0.7, -0.4], {}),
    ("cat", ["a", "b", "c"], [0.5, 1.5, -1.0], {}),
    ("ties", ["a", "b"], [0.6, 0.9], dict(density=0.5)),
    ("ties", ["a", "b"], [1.0, 0.5], dict(density=0.7, majority_sign_method="frequency")),
    ("svd", ["a", "c"], [1.0, 0.8], {}),
])
def test_add_weighted_adapter_matches_peft(saved, kind, names, weights, kw):
    folder, out, theirs = saved
    ours = ours_with_abc(folder, out)
    ours.add_weighted_adapter(names, weights, "mix", combination_type=kind, **kw)
    theirs.add_weighted_adapter(names, weights, "mix", combination_type=kind, **kw)
    try:
        ours.set_adapter("mix")
        theirs.set_adapter("mix")
        assert ours.peft_config.r == theirs.peft_config["mix"].r
        ids, mask, _ = batch()
        assert_close(ours(ids, attention_mask=mask).logits, peft_logits(theirs, ids, mask),
                     atol=1e-4 if kind == "svd" else 1e-5)
        base = hf_model(folder)(input_ids=ids, attention_mask=mask).logits
        assert (ours(ids, attention_mask=mask).logits - base).abs().max() > 1e-2  # not a no-op
    finally:
        theirs.delete_adapter("mix")


def test_cat_is_exactly_the_weighted_sum_of_updates(saved):
    """cat's B A equals sum_i w_i s_i B_i A_i, the formula written out here."""
    folder, out, _ = saved
    ours = ours_with_abc(folder, out)
    ours.add_weighted_adapter(["a", "b"], [0.5, 2.0], "mix", combination_type="cat")
    layer = ours.get_base_model().transformer.h[1].attn.c_attn
    expected = sum(w * layer.parts(n).scaling * layer.parts(n).lora_B.weight
                   @ layer.parts(n).lora_A.weight for n, w in (("a", 0.5), ("b", 2.0)))
    mix = layer.parts("mix")
    assert mix.scaling == 1.0
    assert_close(mix.lora_B.weight @ mix.lora_A.weight, expected, atol=1e-6)


def test_weighted_adapter_and_switching_errors_are_clear(saved, tmp_path):
    folder, out, _ = saved
    ours = ours_with_abc(folder, out)
    with pytest.raises(PeftError, match="3 weights for 2 adapters"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0, 1.0], "m", combination_type="linear")
    with pytest.raises(PeftError, match="one rank.*r=\\[4, 2\\]"):
        ours.add_weighted_adapter(["a", "c"], [1.0, 1.0], "m", combination_type="linear")
    with pytest.raises(PeftError, match="no adapter named \\['zz'\\]"):
        ours.add_weighted_adapter(["a", "zz"], [1.0, 1.0], "m", combination_type="cat")
    with pytest.raises(PeftError, match="density"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m", combination_type="ties")
    with pytest.raises(PeftError, match="dare_linear"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m", combination_type="dare_linear")
    with pytest.raises(PeftError, match="no adapter named 'm'"):
        ours.set_adapter("m")                       # none of the failures added anything
    with pytest.raises(PeftError, match="already loaded"):
        ours.load_adapter(out / "b", adapter_name="b")
    prompt = get_peft_model(GPT.from_pretrained(folder), PromptTuningConfig(num_virtual_tokens=2))
    prompt.save_pretrained(tmp_path / "prompt")
    names = [n for n, _ in ours.named_parameters()]
    with pytest.raises(PeftError, match="PROMPT_TUNING adapter; only LoRA"):
        ours.load_adapter(tmp_path / "prompt", adapter_name="p")
    assert [n for n, _ in ours.named_parameters()] == names
    ours.merge()
    with pytest.raises(PeftError, match="unmerge"):
        ours.set_adapter("b")
    with pytest.raises(PeftError, match="unmerge"):
        with ours.disable_adapter():
            pass


def test_disable_adapter_gives_the_base_model_for_every_method(hf_tiny):
    folder, _ = hf_tiny
    ids, mask, _ = batch()
    base = GPT.from_pretrained(folder)(ids, attention_mask=mask).logits
    for config in (PromptTuningConfig(num_virtual_tokens=3),
                   AdapterConfig(bottleneck_size=4, init_std=0.3),
                   LoraConfig(r=2, init_lora_weights=False)):
        model = get_peft_model(GPT.from_pretrained(folder), config).eval()
        assert (model(ids, attention_mask=mask).logits[:, -7:] - base).abs().max() > 1e-4
        with model.disable_adapter():
            assert torch.equal(model(ids, attention_mask=mask).logits, base)
        assert (model(ids, attention_mask=mask).logits[:, -7:] - base).abs().max() > 1e-4


def test_minift_merge_combines_several_runs_with_weights(hf_tiny, tmp_path, capsys):
    """`minift merge --run A --run B --weights 0.7,0.3`: the merged model's logits are the
    base model plus 0.7 and 0.3 of the two LoRA updates (cat combines them exactly)."""
    from minift.cli import main
    from minift.tokenizer import Tokenizer
    folder, _ = hf_tiny
    tok = Tokenizer.from_pretrained("minift-tiny")   # the run's adapter/ carries one, as finetune's
    runs, deltas = [], []
    for i, target in enumerate((["c_attn"], ["c_attn", "c_fc"])):
        torch.manual_seed(i)
        model = get_peft_model(GPT.from_pretrained(folder),
                               LoraConfig(r=2, init_lora_weights=False, target_modules=target))
        run = tmp_path / f"run{i}"
        model.save_pretrained(run / "adapter")
        tok.save_pretrained(run / "adapter")
        (run / "config.json").write_text(json.dumps({"model": str(folder)}))
        runs.append(run)
        deltas.append({n: m.delta_weight() for n, m in model.base_model.lora_layers().items()})
    code = main(["merge", "--run", str(runs[0]), "--run", str(runs[1]), "--weights", "0.7,0.3",
                 "--out", str(tmp_path / "mix")])
    assert code == 0, capsys.readouterr().err
    merged = GPT.from_pretrained(tmp_path / "mix").state_dict()
    base = GPT.from_pretrained(folder).state_dict()
    name = "transformer.h.0.mlp.c_fc"
    assert_close(merged[name + ".weight"], base[name + ".weight"] + 0.3 * deltas[1][name],
                 atol=1e-6)
    name = "transformer.h.1.attn.c_attn"
    expected = base[name + ".weight"] + 0.7 * deltas[0][name] + 0.3 * deltas[1][name]
    assert_close(merged[name + ".weight"], expected, atol=1e-6)
    code = main(["merge", "--run", str(runs[0]), "--run", str(runs[1]), "--weights", "1",
                 "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code != 0 and "--weights has 1 values for 2 adapters" in err.splitlines()[-1]
    assert "Traceback" not in err and not (tmp_path / "bad").exists()
