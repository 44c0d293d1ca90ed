"""`minift plan`: memory, FLOPs and step time of each method before a run (minift/plan.py)."""
from __future__ import annotations

import json

import torch

from ..distributed import native_bf16
from ..options import METHOD_DEFAULTS, RECIPE, UsageError, cli_device
from ..machine import parse_bytes
from ..plan import DTYPES, METHODS, SHAPES, Estimate, MethodOptions, model_config, plan
from .common import add_command, number

LORA = METHOD_DEFAULTS["lora"]   # `minift finetune`'s LoRA: r 16 on every linear layer, no dropout

PLAN_EPILOG = """examples:
  minift plan --model gpt2 --batch-size 8 --max-length 512        every method, one table
  minift plan --model gpt2-xl --method lora --batch-size 4 --max-length 1024 --dtype bf16
  minift plan --model gpt2-large --method full --batch-size 1 --max-length 1024 \\
      --gradient-checkpointing --memory 24GiB --json
--model takes a folder, a hub id in the local cache, minift-tiny, or a named shape
(""" + ", ".join(SHAPES) + """), read from config.json alone: nothing is loaded.
The defaults are `minift finetune`'s: micro-batches of 16, dropout off, LoRA and DoRA
with r 16 on c_attn,c_proj,c_fc, bf16 where the device has it natively.
Memory is per process: parameters, gradients, AdamW state, activations and workspace,
against this machine's free memory (or --memory). The step time divides the step's
FLOPs by a matmul rate measured here for a moment: a lower bound."""


def register(subparsers) -> None:
    p = add_command(subparsers, "plan", "memory, FLOPs and step time of each method, before a "
                    "run", PLAN_EPILOG, run)
    p.add_argument("--model", default="minift-tiny", metavar="M",
                   help="folder, cached hub id, minift-tiny, or " + "/".join(SHAPES)
                   + " (default: minift-tiny)")
    p.add_argument("--method", default="all", metavar="X",
                   help=f"one of {', '.join(METHODS)}, comma-separated, or all (default)")
    number(p, "--batch-size", int, RECIPE["batch_size"], "examples per micro-batch")
    number(p, "--max-length", int, None, "tokens per example (default: the model's context)")
    number(p, "--gradient-accumulation-steps", int, 1, "micro-batches per optimizer step")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="fp32, or bf16 autocast over fp32 weights; auto (the default): bf16 "
                        "where the device has it natively, as `minift finetune` does")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each block in the backward")
    p.add_argument("--memory", metavar="SIZE", default=None,
                   help="the budget to compare with, e.g. 24GiB (default: free memory here)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or mps, which need not be on this machine "
                        "(default: cuda if available)")
    p.add_argument("--no-measure", action="store_true",
                   help="skip the matmul-rate measurement (no step time)")
    defaults = MethodOptions()
    number(p, "--dropout", float, RECIPE["dropout"], "the model's dropout rates (GPT-2's own: "
           "0.1)")
    number(p, "--r", int, LORA["r"], "LoRA rank")
    number(p, "--lora-dropout", float, LORA["lora_dropout"], "dropout on LoRA's input")
    p.add_argument("--target-modules", metavar="NAMES", default=None,
                   help="comma-separated layers for LoRA / DoRA and adapters (default: "
                        f"{','.join(LORA['target_modules'])} for LoRA, the adapter's own for "
                        "adapters)")
    number(p, "--num-virtual-tokens", int, defaults.num_virtual_tokens,
           "prefix / prompt / P-tuning length")
    number(p, "--bottleneck-size", int, defaults.bottleneck_size, "adapter width")
    number(p, "--top-k-blocks", int, defaults.top_k_blocks, "blocks partial fine-tuning trains")
    p.add_argument("--json", action="store_true", help="one JSON object per method, as a list")


def auto_bf16(device: str) -> bool:
    """--dtype auto: bf16 where `minift finetune` would train in it (distributed.native_bf16);
    a CUDA device planned from a machine without one: yes, as on every GPU since Ampere."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return True
    return native_bf16(torch.device(device))


def method_options(args, method: str) -> MethodOptions:
    """The options `minift finetune --method <method>` would train with, flags applied."""
    targets = args.target_modules.split(",") if args.target_modules else None
    if targets is None and method in ("lora", "dora"):
        targets = LORA["target_modules"]
    return MethodOptions(r=args.r, lora_dropout=args.lora_dropout, target_modules=targets,
                         num_virtual_tokens=args.num_virtual_tokens,
                         bottleneck_size=args.bottleneck_size, top_k_blocks=args.top_k_blocks)


def run(args) -> int:
    methods = METHODS if args.method == "all" else [m.strip() for m in args.method.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        bad = ", ".join(map(repr, unknown)) or "(empty)"
        raise UsageError(f"--method: unknown {bad}; choose from {', '.join(METHODS)}, or all")
    try:
        memory = parse_bytes(args.memory) if args.memory is not None else None
    except ValueError as e:
        raise UsageError(f"--memory: {e}") from None
    device = cli_device(args.device, present=False)   # a GPU elsewhere may be planned for
    if args.max_length is not None:   # plan() would refuse it too, but name max_length only
        n_positions = model_config(args.model).n_positions
        if not 1 <= args.max_length <= n_positions:
            raise UsageError(f"--max-length must be between 1 and the model's n_positions="
                             f"{n_positions} ({args.model}), got {args.max_length}")
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if auto_bf16(device) else "fp32")
    estimates = plan(args.model, methods, args.batch_size, args.max_length,
                     measure=not args.no_measure, device=device,
                     gradient_accumulation_steps=args.gradient_accumulation_steps, dtype=dtype,
                     gradient_checkpointing=args.gradient_checkpointing,
                     options={m: method_options(args, m) for m in methods}, memory=memory,
                     dropout=args.dropout)
    if args.json:
        print(json.dumps([e.to_dict() for e in estimates], indent=1))
    else:
        print(format_plan(estimates))
    return 0


# ----------------------------------------------------------------------------- the table
def _size(n: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}" if n / scale < 1000 else f"{n / scale:,.0f} {unit}"
    return f"{int(n)} B"


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def format_plan(estimates: list[Estimate]) -> str:
    """A plain-text table, one row per method, and what it was computed for."""
    if not estimates:
        return ""
    e0 = estimates[0]
    rows = [["method", "trainable", "params", "grads", "optimizer", "activations", "total",
             "fits", "GFLOP/token", "step time", "adapter file"]]
    for e in estimates:
        rows.append([e.method, _count(e.trainable_params), _size(e.param_bytes),
                     _size(e.grad_bytes), _size(e.optimizer_bytes), _size(e.activation_bytes),
                     _size(e.total_bytes), "-" if e.fits is None else ("yes" if e.fits else "NO"),
                     f"{e.flops_per_token / 1e9:.3g}",
                     "-" if e.step_seconds is None else f"{e.step_seconds:.3g} s",
                     _size(e.adapter_file_bytes)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    budget = "unknown" if e0.budget_bytes is None else _size(e0.budget_bytes)
    rate = ("no step time (no matmul rate measured)" if e0.matmul_flops_per_s is None
            else f"step time at the {e0.matmul_flops_per_s / 1e9:.3g} GFLOP/s matmul rate "
            "measured here (a lower bound)")
    head = (f"{e0.model}: {_count(e0.model_params)} parameters; micro-batch {e0.batch_size} x "
            f"{e0.max_length} tokens, accumulation {e0.gradient_accumulation_steps}, {e0.dtype}, "
            f"gradient checkpointing {'on' if e0.gradient_checkpointing else 'off'}")
    foot = (f"total = params + grads + optimizer + activations + workspace (the head's logits "
            f"chunk, one MLP-wide gradient); budget {budget}; {rate}")
    return "\n".join([head, *lines, foot])
