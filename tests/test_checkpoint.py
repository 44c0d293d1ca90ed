"""Hugging Face folders in and out: both key layouts, shards, save, errors."""
import json

import pytest
import torch
from conftest import TINY, make_hf_gpt2
from safetensors.torch import load_file, save_file

from minift import GPT
from minift.checkpoint import resolve_source


def ids(vocab=TINY["vocab_size"]):
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(0))


def test_original_gpt2_layout_without_prefix_and_with_bias_buffers(hf_tiny, tmp_path):
    """OpenAI's release: keys 'h.0.attn.c_attn.weight' and causal 'attn.bias' buffers."""
    folder, hf = hf_tiny
    sd = load_file(folder / "model.safetensors")
    old = {k.removeprefix("transformer."): v for k, v in sd.items()}
    n = TINY["n_positions"]
    for i in range(TINY["n_layer"]):
        old[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        old[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(old, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with torch.no_grad():
        diff = (GPT.from_pretrained(tmp_path)(ids()).logits - hf(ids()).logits).abs().max()
    assert diff <= 1e-5


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf_gpt2(tmp_path, seed=3)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    with torch.no_grad():
        assert (GPT.from_pretrained(tmp_path)(ids()).logits - hf(ids()).logits).abs().max() <= 1e-5


def test_saved_folder_loads_in_transformers(hf_tiny, tmp_path):
    from transformers import GPT2LMHeadModel
    folder, _ = hf_tiny
    ours = GPT.from_pretrained(folder)
    with torch.no_grad():  # change the weights so the test can tell a save from a stale copy
        ours.transformer.h[0].mlp.c_fc.weight.mul_(1.5)
    ours.save_pretrained(tmp_path / "out")
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (ours(ids()).logits - theirs(ids()).logits).abs().max() <= 1e-5
    again = GPT.from_pretrained(tmp_path / "out")
    for (n, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n


def test_dtype_option(hf_tiny):
    model = GPT.from_pretrained(hf_tiny[0], dtype=torch.bfloat16)
    assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.transformer.wte.weight


def test_hub_id_from_local_cache(hf_tiny, tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--someone--tiny-gpt2" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (snap / f).write_bytes((hf_tiny[0] / f).read_bytes())
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert resolve_source("someone/tiny-gpt2") == snap
    with torch.no_grad():
        diff = (GPT.from_pretrained("someone/tiny-gpt2")(ids()).logits - hf_tiny[1](ids()).logits)
    assert diff.abs().max() <= 1e-5


# ---------------------------------------------------------------- errors name the problem
def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        GPT.from_pretrained(tmp_path / "nope")


def test_missing_weights_file(hf_tiny, tmp_path):
    (tmp_path / "config.json").write_text((hf_tiny[0] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        GPT.from_pretrained(tmp_path)


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(tmp_path)


def test_pickle_file_is_refused(hf_tiny, tmp_path):
    (tmp_path / "config.json").write_text((hf_tiny[0] / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even opened")
    with pytest.raises(ValueError, match="never unpickles"):
        GPT.from_pretrained(tmp_path)


def test_shape_mismatch_names_the_key(hf_tiny, tmp_path):
    cfg = json.loads((hf_tiny[0] / "config.json").read_text())
    cfg["n_positions"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((hf_tiny[0] / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"'transformer.wpe.weight' has shape \(64, 32\)"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("change,message", [
    ({"activation_function": "swish"}, "unsupported activation_function 'swish'"),
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
])
def test_unsupported_config_is_refused(hf_tiny, tmp_path, change, message):
    cfg = json.loads((hf_tiny[0] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    (tmp_path / "model.safetensors").write_bytes((hf_tiny[0] / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=message):
        GPT.from_pretrained(tmp_path)


def test_missing_weight_is_named(hf_tiny, tmp_path):
    sd = load_file(hf_tiny[0] / "model.safetensors")
    del sd["transformer.h.1.mlp.c_fc.bias"]
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((hf_tiny[0] / "config.json").read_text())
    with pytest.raises(ValueError, match="transformer.h.1.mlp.c_fc.bias"):
        GPT.from_pretrained(tmp_path)


def test_shard_index_cannot_escape_folder(hf_tiny, tmp_path):
    (tmp_path / "config.json").write_text((hf_tiny[0] / "config.json").read_text())
    index = {"weight_map": {"transformer.wte.weight": "../../etc/model.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="leaves the folder"):
        GPT.from_pretrained(tmp_path)

