"""The planner against measurements on tiny models: the bytes autograd actually saves
(saved-tensor hooks), AdamW's actual state and gradients, torch's FLOP counter, the files
save_pretrained writes, and transformers' parameter counts for GPT-2's four sizes."""
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import pattern_data
from minift.data import collate
from minift.model import GPTConfig
from minift.commands.plan import format_plan
from minift.machine import matmul_rate, parse_bytes
from minift.plan import MethodOptions, build, estimate, plan
from minift.config import TrainConfig
from minift.train import make_optimizer

# The measurement (saved-tensor hooks) lives once, in the script that prints these ratios;
# it measures what autograd keeps and shares no code with the planner it checks.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from plan_accuracy import saved_bytes  # noqa: E402  (scripts/plan_accuracy.py)

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = MethodOptions(r=4, num_virtual_tokens=6, bottleneck_size=8, top_k_blocks=1)


def tiny_config(dropout=0.1, **kw):
    return GPTConfig(**{**dict(n_layer=3, n_head=4, n_embd=64, vocab_size=200, n_positions=64,
                               embd_pdrop=dropout, attn_pdrop=dropout, resid_pdrop=dropout), **kw})


def _setup(method, dropout=0.1, B=4, T=32):
    c = tiny_config(dropout, n_positions=max(64, T))
    torch.manual_seed(0)
    model = build(c, method, OPTIONS, device="cpu").train()
    batch = collate(pattern_data(B, min_len=T - 4, max_len=T), 0, T)
    return c, model, batch, batch["input_ids"].shape[1]


@pytest.mark.parametrize("method, dtype, dropout, length", [
    ("full", "fp32", 0.1, 32), ("lora", "fp32", 0.1, 32), ("prefix", "fp32", 0.1, 32),
    ("lora", "bf16", 0.1, 32), ("full", "fp32", 0.0, 32), ("adapter", "fp32", 0.1, 32),
    ("prompt", "fp32", 0.1, 32), ("dora", "fp32", 0.1, 32), ("dora", "fp32", 0.0, 32),
    ("lora", "fp32", 0.1, 300)])   # longer than ops.QUERY_BLOCK: causal blocks of queries
def test_activation_and_flop_estimates_match_measurements(method, dtype, dropout, length):
    c, model, batch, T = _setup(method, dropout, T=length)
    e = estimate("tiny", method, 4, T, dtype=dtype, options=OPTIONS, config=c, memory=1 << 40)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    with autocast, FlopCounterMode(display=False) as flops:
        measured, loss = saved_bytes(model, batch)
        loss.backward()
    assert e.activation_bytes == pytest.approx(measured, rel=0.2)
    tokens = batch["input_ids"].numel() + (4 * 6 if method == "prompt" else 0)
    assert e.flops_per_token * tokens == pytest.approx(flops.get_total_flops(), rel=0.2)


@pytest.mark.parametrize("method", ["full", "lora", "dora", "prefix", "partial", "ptuning"])
def test_optimizer_gradient_and_parameter_estimates_match_a_real_step(method):
    c, model, batch, T = _setup(method)
    e = estimate("tiny", method, 4, T, options=OPTIONS, config=c, memory=1 << 40)
    optimizer, _ = make_optimizer(model, TrainConfig(), 10)
    model(**batch, return_logits=False).loss.backward()
    optimizer.step()
    params = list(model.parameters())   # a tied weight once
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                for t in s.values() if torch.is_tensor(t))
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    assert (e.optimizer_bytes, e.grad_bytes) == (state, grads)
    assert e.total_params == sum(p.numel() for p in params)
    assert e.trainable_params == sum(p.numel() for p in params if p.requires_grad)
    assert e.param_bytes == 4 * e.total_params


def test_gradient_checkpointing_estimate_matches_its_peak():
    """Checkpointed, the forward keeps each block's input (and what is outside the blocks);
    the backward then recomputes one block at a time, keeping its activations again: the
    peak is the checkpointed forward's bytes plus one block's (a plain forward's excess
    over the checkpointed one, per block)."""
    c, model, batch, T = _setup("full")
    plain, ckpt = (estimate("tiny", "full", 4, T, gradient_checkpointing=g, options=OPTIONS,
                            config=c, memory=1 << 40) for g in (False, True))
    everything, _ = saved_bytes(model, batch)
    model.gradient_checkpointing = True
    kept, _ = saved_bytes(model, batch)
    assert ckpt.activation_bytes == pytest.approx(kept + (everything - kept) / c.n_layer, rel=0.2)
    assert plain.activation_bytes == pytest.approx(everything, rel=0.2)
    assert ckpt.flops_per_token > plain.flops_per_token        # the second forward


@pytest.mark.parametrize("method", ["lora", "dora", "prefix", "full"])
def test_adapter_file_size_matches_save_pretrained(tmp_path, method):
    c, model, _, _ = _setup(method)
    e = estimate("tiny", method, 4, 32, options=OPTIONS, config=c, memory=1 << 40)
    model.save_pretrained(tmp_path)
    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    assert e.adapter_file_bytes == pytest.approx((tmp_path / name).stat().st_size, rel=0.1)


@pytest.mark.parametrize("name, shape", [
    ("gpt2", (12, 12, 768)), ("gpt2-medium", (24, 16, 1024)), ("gpt2-large", (36, 20, 1280)),
    ("gpt2-xl", (48, 25, 1600))])
def test_named_shapes_have_gpt2s_parameter_counts(name, shape, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))   # an empty hub cache: the shape, not a download
    from transformers import GPT2Config, GPT2LMHeadModel
    with torch.device("meta"):
        reference = GPT2LMHeadModel(GPT2Config(n_layer=shape[0], n_head=shape[1], n_embd=shape[2]))
    e, = plan(name, "full", batch_size=1, max_length=1024, measure=False, memory=1 << 50)
    assert e.total_params == reference.num_parameters()
    assert e.trainable_params == e.total_params and e.fits


def test_a_folder_and_minift_tiny_are_read_from_config_json(hf_tiny):
    folder, reference = hf_tiny
    e, = plan(str(folder), "full", batch_size=2, max_length=16, measure=False)
    assert e.total_params == reference.num_parameters() and e.max_length == 16
    from minift.model import GPT
    model = GPT.from_pretrained("minift-tiny")
    tiny, = plan("minift-tiny", "lora", batch_size=2, measure=False)
    assert tiny.total_params == sum(p.numel() for p in model.parameters()) + 8 * sum(
        m.in_features + m.out_features for m in
        (b.attn.c_attn for b in model.transformer.h))         # + LoRA r=8 on c_attn
    assert tiny.max_length == model.config.n_positions        # max_length None: the context


def test_budget_and_step_time():
    c = tiny_config()
    small, big = (estimate("tiny", "lora", 4, 32, options=OPTIONS, config=c, memory=m,
                           matmul_flops_per_s=1e9) for m in (1000, 1 << 40))
    assert (small.fits, big.fits) == (False, True) and small.budget_bytes == 1000
    assert small.step_seconds == pytest.approx(small.step_flops / 1e9)
    two = estimate("tiny", "lora", 4, 32, gradient_accumulation_steps=2, options=OPTIONS,
                   config=c, memory=1 << 40, matmul_flops_per_s=1e9)
    assert two.step_flops == 2 * small.step_flops and two.total_bytes == small.total_bytes
    assert 1e6 < matmul_rate(n=128, repeat=2) < 1e16
    table = format_plan([small, big])
    assert "lora" in table and "NO" in table and "yes" in table


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'lorax'; choose from full, partial, lora"):
        plan("gpt2", ["lorax"], measure=False)
    with pytest.raises(FileNotFoundError, match="or name a shape: gpt2, gpt2-medium"):
        plan(str(tmp_path / "nope"), "lora", measure=False)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        plan("gpt2", "lora", batch_size=0, measure=False)
    with pytest.raises(ValueError, match="cannot read '12 parsecs' as an amount of memory"):
        parse_bytes("12 parsecs")
    assert parse_bytes("24GiB") == 24 * 2 ** 30 and parse_bytes("1.5 GB") == 1_500_000_000


def test_the_plan_command_prints_the_api_estimates(capsys):
    """The command is the API with `minift finetune`'s recipe: dropout off, LoRA r 16 on
    every linear layer without dropout, bf16 where this CPU has it natively."""
    from minift.cli import main
    from minift.distributed import cpu_has_native_bf16
    args = ["plan", "--model", "minift-tiny", "--method", "lora,full", "--batch-size", "2",
            "--max-length", "32", "--memory", "1GiB", "--no-measure", "--device", "cpu"]
    assert main([*args, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    recipe = MethodOptions(r=16, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"])
    dtype = "bf16" if cpu_has_native_bf16() else "fp32"
    expected = [plan("minift-tiny", [m], batch_size=2, max_length=32, measure=False,
                     memory=2 ** 30, device="cpu", dropout=0.0, dtype=dtype,
                     options=recipe if m == "lora" else MethodOptions(r=16, lora_dropout=0.0))[0]
                for m in ("lora", "full")]
    assert rows == [e.to_dict() for e in expected]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert table == format_plan(expected) + "\n" and "GFLOP/token" in table
    # the first line counts the model itself, whichever method comes first
    full = expected[1]
    assert table.startswith(f"minift-tiny: {full.total_params / 1e6:.3g}M parameters;")
    assert format_plan(expected[::-1]).splitlines()[0] == table.splitlines()[0]
    houlsby = plan("minift-tiny", ["adapter"], batch_size=2, max_length=32, measure=False)[0]
    assert houlsby.model_params == full.total_params   # its trained LayerNorms are the model's


@pytest.mark.parametrize("method", ["lora", "adapter", "partial", "prefix"])
def test_the_plan_command_counts_what_minift_finetune_trains(capsys, method):
    """Its default trainable parameters and adapter file are those of `minift finetune
    --method M`'s model on minift-tiny (the options module's defaults, built as finetune
    builds them)."""
    from minift import GPT
    from minift.cli import main
    from minift.commands.finetune import apply_method, method_config
    from minift.options import defaults
    assert main(["plan", "--method", method, "--no-measure", "--json"]) == 0
    row, = json.loads(capsys.readouterr().out)
    opts = {**defaults(method), "model": "minift-tiny"}
    model = apply_method(GPT.from_pretrained("minift-tiny"), method, opts, method_config(opts))
    assert row["trainable_params"] == sum(p.numel() for p in model.parameters()
                                          if p.requires_grad)
    assert row["batch_size"] == opts["batch_size"] == 16


@pytest.mark.parametrize("args, message", [
    (["--method", "lorax"], "--method: unknown 'lorax'; choose from full, partial"),
    (["--memory", "lots"], "--memory: cannot read 'lots' as an amount of memory"),
    (["--dropout", "1.5"], "dropout must be in [0, 1), got 1.5"),
    (["--target-modules", "c_atn"], "target module 'c_atn' does not exist in the model"),
    (["--model", "/no/such/folder"], "/no/such/folder: no such folder"),
])
def test_the_plan_command_errors_are_one_line(capsys, args, message):
    from minift.cli import main
    code = main(["plan", "--no-measure", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2) and len(lines) == 1 and message in lines[0], lines
