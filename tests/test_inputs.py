"""Inputs a user can get wrong: each gives one clear error naming the argument, option, file
or field, from Python (ValueError / DataError) and from the command line (one line on
stderr, no traceback, exit 2 for options and 1 for files). All fast: the checks run before
any training or generation, on tiny models."""
import json
import shutil

import pytest
import torch
from conftest import cfg, make_hf_gpt2, tiny_model

from minift import GPT, Tokenizer, train
from minift.checkpoint import EMBEDDED, check_tokenizer_fits
from minift.cli import main
from minift.config import TrainConfig
from minift.formats import DataError
from minift.generation import filter_logits
from minift.plan import plan

pytestmark = pytest.mark.usefixtures("one_thread")


def run_main(capsys, *args) -> tuple[int, str]:
    """main() in this process -> (exit code, stderr)."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_one_line_error(err: str, *fragments):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("minift: error: "), err
    assert "Traceback" not in err and sum(ln.startswith("minift: error") for ln in lines) == 1
    for f in fragments:
        assert f in lines[-1], (f, lines[-1])


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine as one without CUDA, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("kwargs, name", [
    (dict(top_k=-5), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=-1.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=0.0), "temperature")])
def test_generate_refuses_bad_sampling_arguments(kwargs, name):
    model = tiny_model().eval()
    with pytest.raises(ValueError, match=f"^{name} "):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=True, **kwargs)


def test_top_k_0_is_no_filter_and_top_p_0_is_greedy():
    model, ids = tiny_model().eval(), torch.tensor([[1, 2, 3]])
    sampled = model.generate(ids, max_new_tokens=6, do_sample=True, seed=3)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=True, top_k=0, seed=3),
                       sampled)
    greedy = model.generate(ids, max_new_tokens=6)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=True, top_p=0.0, seed=3),
                       greedy)
    logits = torch.randn(2, 10)
    assert torch.equal(filter_logits(logits, top_p=0.0).argmax(-1), logits.argmax(-1))
    # greedy decoding ignores the temperature, as transformers does: 0 is no error there
    assert torch.equal(model.generate(ids, max_new_tokens=6, temperature=0.0), greedy)


@pytest.mark.parametrize("flags, named", [
    (["--top-k", "-5"], "--top-k"), (["--top-p", "-1"], "--top-p"), (["--top-p", "1.5"], "--top-p"),
    (["--temperature", "0"], "--temperature"), (["--temperature", "-1"], "--temperature")])
def test_cli_generate_refuses_bad_sampling_flags(capsys, flags, named):
    code, err = run_main(capsys, "generate", "--prompt", "hi", *flags)
    assert code == 2
    assert_one_line_error(err, named)


def test_cli_generate_top_k_0_samples(capsys):
    code = main(["generate", "--prompt", "def f(a):", "--top-k", "0", "--max-new-tokens", "3"])
    assert code == 0 and capsys.readouterr().out.startswith("def f(a):")


# ----------------------------------------------------------------------------- devices
COMMANDS = {"generate": ["generate", "--prompt", "hi"], "eval": ["eval"],
            "plan": ["plan", "--no-measure"],
            "finetune": ["finetune", "--max-steps", "1", "--output-dir", "{tmp}/run"]}


@pytest.mark.parametrize("command, device", [  # plan --device cuda: see the next test
    *((COMMANDS[c], "bogus") for c in COMMANDS),
    *((COMMANDS[c], "cuda") for c in ("generate", "eval", "finetune"))])
def test_cli_device_is_checked(capsys, tmp_path, no_cuda, command, device):
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    code, err = run_main(capsys, *args, "--device", device)
    assert code == 2
    assert_one_line_error(err, "device", "available here: cpu", repr(device))
    assert not (tmp_path / "run").exists()


def test_cli_plan_for_a_gpu_elsewhere(capsys, no_cuda):
    assert main(["plan", "--device", "cuda", "--no-measure", "--method", "lora"]) == 0
    assert "lora" in capsys.readouterr().out


def test_trainconfig_device(no_cuda):
    with pytest.raises(ValueError, match=r"TrainConfig.device names CUDA.*available here: cpu"):
        TrainConfig(device="cuda")
    with pytest.raises(ValueError, match=r"TrainConfig.device must be a device"):
        TrainConfig(device="bogus")
    assert TrainConfig(device="cpu").device == "cpu"


# ----------------------------------------------------------------------------- tokenizers
def _tiny_tokenizer_into(folder):
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(EMBEDDED["minift-tiny"] / f, folder / f)


def test_tokenizer_larger_than_the_model_is_named(tmp_path):
    make_hf_gpt2(tmp_path, vocab_size=500)
    _tiny_tokenizer_into(tmp_path)
    tok, model = Tokenizer.from_pretrained(tmp_path), GPT.from_pretrained(tmp_path)
    with pytest.raises(ValueError) as e:
        check_tokenizer_fits(tok, model.config.vocab_size, tmp_path)
    assert str(tmp_path) in str(e.value) and "vocab_size=500" in str(e.value)
    assert f"{tok.vocab_size} tokens" in str(e.value)
    check_tokenizer_fits(tok, tok.vocab_size, tmp_path)        # the same size fits
    check_tokenizer_fits(tok, tok.vocab_size + 64, tmp_path)   # a padded model vocabulary too


def test_eos_token_outside_the_vocabulary_is_named(tmp_path):
    folder = tmp_path / "eos"
    shutil.copytree(EMBEDDED["minift-tiny"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|end|>"}))
    tok, model = Tokenizer.from_pretrained(folder), GPT.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"eos_token '<\|end\|>' has id \d+, outside"):
        check_tokenizer_fits(tok, model.config.vocab_size, folder, tokenizer_from=folder)


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["eval"],
                                     ["finetune", "--max-steps", "1", "--no-forgetting"]])
def test_cli_commands_refuse_a_tokenizer_that_does_not_fit(tmp_path, capsys, command):
    """generate, eval and finetune's evaluation of the base model would index past the
    embedding ("index out of range in self"): each is one line naming folder and sizes, and
    finetune writes no run folder."""
    small = tmp_path / "small"
    make_hf_gpt2(small, vocab_size=500)
    _tiny_tokenizer_into(small)
    out = tmp_path / "run"
    extra = ["--output-dir", out] if command[0] == "finetune" else []
    code, err = run_main(capsys, *command, "--model", small, *extra)
    assert code == 1
    assert_one_line_error(err, str(small), "vocab_size=500", "4096 tokens")
    assert not out.exists()


# ----------------------------------------------------------------------------- missing paths
@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache and a download that fails as it does offline (no network used)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fail(repo_id, **kwargs):
        calls.append(repo_id)
        raise OSError("Got: ConnectError: [Errno -2] Name or service not known\nmore text")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    return calls


def test_missing_folder_that_looks_like_a_hub_id_is_named(offline_hub):
    with pytest.raises(FileNotFoundError) as e:
        GPT.from_pretrained("models/mine")
    assert str(e.value).startswith("models/mine: no such folder, not in the Hugging Face cache")
    assert "Name or service not known" in str(e.value) and "more text" not in str(e.value)
    assert offline_hub == ["models/mine"]   # the download the hub extra is for was tried


def test_cli_missing_model_folder_is_named(capsys, offline_hub):
    code, err = run_main(capsys, "generate", "--model", "mymodel", "--prompt", "hi")
    assert code == 1
    assert_one_line_error(err, "mymodel: no such folder")


# ----------------------------------------------------------------------------- TrainConfig types
@pytest.mark.parametrize("kwargs", [
    dict(weight_decay="0.1"), dict(adam_eps="x"), dict(max_grad_norm="1"), dict(min_delta="0"),
    dict(ewc_lambda=None), dict(layer_decay="x"), dict(adam_betas=0.9), dict(adam_betas=(0.9, "x")),
    dict(bf16="yes"), dict(packing="no"), dict(lr=float("inf")), dict(lr=float("nan")),
    dict(dpo_beta=float("inf")), dict(loraplus_lr_ratio="16"), dict(dropout="0.1"),
    dict(output_dir=3)])
def test_trainconfig_names_the_wrong_typed_field(kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=rf"^TrainConfig\.{name} "):
        TrainConfig(**kwargs)


def test_trainconfig_still_takes_numbers_and_lists():
    c = TrainConfig(lr=1, weight_decay=0, adam_betas=[0.9, 0.95], max_grad_norm=None)
    assert c.adam_betas == [0.9, 0.95]


# ----------------------------------------------------------------------------- labels, ids
@pytest.mark.parametrize("example, fragment", [
    ({"input_ids": [1, 2, 3], "labels": [1, 9999, 3]}, "label 9999"),
    ({"input_ids": [1, 2, 3], "labels": [1, -5, 3]}, "label -5"),
    ({"input_ids": ["a", "b"], "labels": ["a", "b"]}, "input_ids must be a list of integer"),
    ({"input_ids": [[1, 2], [3, 4]]}, "input_ids must be a list of integer"),
    ({"input_ids": [1, 2], "labels": [1.5, 2]}, "labels must be a list of integer"),
    ({"input_ids": 7}, "input_ids must be a list of integer")])
def test_train_checks_labels_and_id_types(example, fragment):
    data = [{"input_ids": [1, 2, 3]}, example]
    with pytest.raises(DataError, match=r"^train_data\[1\]: ") as e:
        train(tiny_model(), data, None, cfg(max_steps=1))
    assert fragment in str(e.value)


def test_train_takes_ignored_labels_and_integer_arrays():
    ids = torch.tensor([1, 2, 3, 4])
    data = [{"input_ids": ids, "labels": torch.tensor([-100, -100, 3, 4])},
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}]
    train(tiny_model(), data, None, cfg(max_steps=1, batch_size=2))


# ----------------------------------------------------------------------------- option ranges, config.json types, the reference text
@pytest.mark.parametrize("args, named", [
    (["finetune", "--eval-samples", "-1"], "--eval-samples"),
    (["finetune", "--eval-samples", "0"], "--eval-samples"),
    (["finetune", "--num-samples", "-2"], "--num-samples"),
    (["finetune", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["eval", "--eval-samples", "-1"], "--eval-samples"),
    (["eval", "--eval-samples", "0"], "--eval-samples"),
    (["plan", "--max-length", "0"], "--max-length"),
    (["plan", "--model", "gpt2", "--max-length", "5000", "--no-measure"], "n_positions=1024")])
def test_cli_counts_out_of_range(capsys, tmp_path, args, named):
    code, err = run_main(capsys, *args, *(["--output-dir", tmp_path / "r"]
                                          if args[0] == "finetune" else []))
    assert code == 2
    assert_one_line_error(err, named)


def test_finetune_config_file_counts_out_of_range(capsys, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"num_samples": -1}))
    code, err = run_main(capsys, "finetune", "--config", tmp_path / "c.json")
    assert code == 2
    assert_one_line_error(err, "num_samples", "at least 0")


def test_plan_refuses_more_tokens_than_the_context():
    with pytest.raises(ValueError, match="max_length=5000 is more than gpt2's n_positions=1024"):
        plan("gpt2", ["lora"], 8, 5000, measure=False)
    with pytest.raises(ValueError, match="max_length must be an integer >= 1, got 0"):
        plan("gpt2", ["lora"], 8, 0, measure=False)


@pytest.mark.parametrize("key, value", [("tie_word_embeddings", "no"),
                                        ("activation_function", ["x"])])
def test_config_json_types_are_named(tmp_path, key, value):
    make_hf_gpt2(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=rf"config.json: {key} must be"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("key, value", [("scale_attn_weights", False),
                                        ("scale_attn_by_inverse_layer_idx", True),
                                        ("add_cross_attention", True)])
def test_config_json_variants_minift_does_not_implement_are_refused(tmp_path, key, value):
    """transformers builds these GPT-2 variants (other attention scaling, cross-attention);
    minift would load their weights and compute other logits, so it refuses them by name.
    GPT-2's own values, as transformers writes them, load."""
    make_hf_gpt2(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.get(key, not value) != value     # transformers' default is GPT-2's
    GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=rf"config.json: {key}={value!r} is not supported"):
        GPT.from_pretrained(tmp_path)


def test_cli_eval_empty_reference_is_named(capsys, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "def f(a):", "completion": " a"}) + "\n")
    (tmp_path / "empty.txt").write_text("")
    code, err = run_main(capsys, "eval", "--data", data, "--forgetting", "--reference",
                         tmp_path / "empty.txt", "--max-new-tokens", "2")
    assert code == 1
    assert_one_line_error(err, "empty.txt")
