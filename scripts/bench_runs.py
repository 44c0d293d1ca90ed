"""What one benchmark run is, shared by scripts/bench.py, bench_paired.py and bench_linear.py:
the model shapes, the cases, runs and rows (bench.py's docstring says what each is), the batch,
the two stacks' models and optimizers, one training step (`make_stepper`), and the step's
matmul FLOPs, the numerator of bench.py's lower bound. minift is imported only inside
`build_minift` and `make_optimizer`, so a process timing transformers + PEFT never loads it
and its peak memory is the reference's alone.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

CASES = ("lora", "full", "prefix", "masked", "dora")
LORA_CASES = ("lora", "masked", "dora")
RUNS = {  # name -> (stack, compiled)
    "transformers+peft": ("hf", False),
    "minift": ("minift", False),
    "minift compiled": ("minift", True),
}
REFERENCE = "transformers+peft"
# row -> (case, path, dtype, batch, seq)
ROWS = {
    "lora": ("lora", "train", "fp32", 4, 256),
    "full": ("full", "train", "fp32", 4, 256),
    "masked": ("masked", "train", "fp32", 4, 256),
    "prefix": ("prefix", "train", "fp32", 4, 256),
    "dora": ("dora", "train", "fp32", 4, 256),
    "plain lora": ("lora", "plain", "fp32", 4, 256),
    "plain masked": ("masked", "plain", "fp32", 4, 256),
    "plain full": ("full", "plain", "fp32", 4, 256),
    "bf16 lora": ("lora", "train", "bf16", 4, 256),
    "lora T=1024": ("lora", "train", "fp32", 1, 1024),
    "masked T=1024": ("masked", "train", "fp32", 1, 1024),
}
DEFAULT_ROWS = [r for r in ROWS if r != "dora"]
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["c_attn"])
N_PREFIX = 20
LR, WEIGHT_DECAY = 1e-4, 0.01


@dataclass
class Shape:
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    n_positions: int


GPT2_SMALL = Shape(12, 12, 768, 50257, 1024)
GPT2_MEDIUM = Shape(24, 16, 1024, 50257, 1024)
QUICK = Shape(2, 2, 64, 1000, 128)
SHAPES = {"small": GPT2_SMALL, "medium": GPT2_MEDIUM}


def device() -> torch.device:
    # minift.machine.default_device's rule, written out: the reference's process never imports
    # minift, so that its peak memory is transformers + PEFT's alone
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_batch(vocab_size, batch, seq, case):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
    labels = ids.clone()
    if case == "masked":
        labels[:, : seq // 2] = -100  # the prompt half carries no loss
    return ids, labels


# ---------------------------------------------------------------------------- FLOPs
def attention_flops(s: Shape, case: str, batch: int, seq: int, causal: bool = True) -> int:
    """One layer's QK^T and AV FLOPs over all heads, over the (query, key) pairs computed."""
    P = N_PREFIX if case == "prefix" else 0
    pairs = batch * (seq * P + (seq * (seq + 1) // 2 if causal else seq * seq))
    return 2 * 2 * s.n_embd * pairs


def matmul_flops(s: Shape, case: str, batch: int, seq: int, n_target: int,
                 head_tokens: int | None = None, causal: bool = True) -> int:
    """Matmul FLOPs (2 per multiply-add) of one training step, forward + backward.

    The forward runs every matmul; the backward computes the input gradients autograd needs
    (the same FLOPs again; attention's dP, dQ, dK, dV twice its forward) and weight gradients
    of trainable weights only. Nothing below block 0's c_attn trains except in full
    fine-tuning, so that layer needs no input gradient (nor block 0's queries, with a prefix).
    head_tokens: positions through the LM head (default: the n_target targets, the work the
    task needs). causal=True counts only the (query, key) pairs a causal mask keeps; False
    counts the full square, as SDPA's math kernel computes it under attention dropout.
    """
    C, L, V, N, r = s.n_embd, s.n_layer, s.vocab_size, batch * seq, LORA["r"]
    head_tokens = n_target if head_tokens is None else head_tokens
    P = N_PREFIX if case == "prefix" else 0
    uses_lora = case in LORA_CASES
    attn = attention_flops(s, case, batch, seq, causal)    # one layer's forward
    proj = 2 * N * (3 * C * C + C * C + 2 * 4 * C * C)     # c_attn, attn.c_proj, c_fc, mlp.c_proj
    lora = 2 * N * r * (C + 3 * C) if uses_lora else 0     # (x A^T) B^T on c_attn (in C, out 3C)
    head = 2 * head_tokens * C * V

    forward = L * (proj + attn + lora) + head
    backward = L * (proj + 2 * attn + 2 * lora) + head     # input gradients
    if case == "full":
        backward += L * proj + head                        # weight gradients (head tied to wte)
    else:
        backward -= 2 * N * 3 * C * C                      # no input gradient into block 0
        if uses_lora:
            backward -= 2 * N * r * C                      # ... nor through its lora_A
        if P:
            backward -= attn // 2                          # block 0's queries: no dQ
    return forward + backward



def build_hf(folder, case):
    import peft
    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).to(device())
    if case in LORA_CASES:
        # GPT-2 stores Conv1D weights (in, out): PEFT needs fan_in_fan_out=True for them
        model = peft.get_peft_model(model, peft.LoraConfig(
            task_type="CAUSAL_LM", fan_in_fan_out=True, use_dora=case == "dora", **LORA))
    elif case == "prefix":
        model = peft.get_peft_model(model, peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=N_PREFIX))
    return model.train(), (lambda ids, labels: model(input_ids=ids, labels=labels,
                                                     use_cache=False).loss)


def build_minift(folder, case, compiled):
    from minift import GPT
    from minift.model import compile_blocks
    from minift.peft import LoraConfig, PrefixTuningConfig, get_peft_model
    model = GPT.from_pretrained(folder, device=device())
    if case in LORA_CASES:
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", use_dora=case == "dora",
                                                 **LORA))
    elif case == "prefix":
        model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM",
                                                         num_virtual_tokens=N_PREFIX))
    if compiled:
        compile_blocks(model)
    # the public call, as the guides write it: the loss, logits never read (so never built)
    return model.train(), (lambda ids, labels: model(input_ids=ids, labels=labels).loss)


def make_optimizer(stack, path, params):
    if path == "plain" and stack == "minift":
        from minift import AdamW
        return AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=path != "plain")


@dataclass
class Stepper:
    step: Callable[[], float]        # one training step on the fixed batch; returns its loss
    eval_loss: Callable[[], float]   # the batch's loss in eval mode (dropout off), no grad
    trainable: list
    held: list                       # [the last step's loss tensor], kept as the guides' loop
                                     # keeps it (make_stepper)


def make_stepper(run: str, case: str, path: str, dtype: str, batch: int, seq: int,
                 model_dir) -> Stepper:
    """One run's model, adapter, batch and optimizer, as bench.py and bench_paired.py time them."""
    torch.manual_seed(0)
    stack, compiled = RUNS[run]
    folder = Path(model_dir)
    model, loss_fn = (build_hf(folder, case) if stack == "hf"
                      else build_minift(folder, case, compiled))
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    ids, labels = (t.to(device()) for t in make_batch(vocab, batch, seq, case))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(stack, path, trainable)
    autocast = (torch.autocast(device().type, dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())

    # The guides' loop (`for batch in loader: loss = model(**batch).loss; ...`) keeps its
    # `loss` until the next forward returns, and with it whatever the last step's graph still
    # holds: 1.0 GB more peak RSS for transformers + PEFT's LoRA step, 0.1 GB for minift's.
    # So does this (as bench.py's own loop did before make_stepper).
    held: list = []

    def step() -> float:
        with autocast:
            loss = loss_fn(ids, labels)
        held[:] = [loss]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad(), autocast:
            return loss_fn(ids, labels).item()
    return Stepper(step, eval_loss, trainable, held)


def save_reference_model(shape: Shape, folder: Path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config() if shape == GPT2_SMALL else GPT2Config(**vars(shape))
    GPT2LMHeadModel(cfg).save_pretrained(folder)
