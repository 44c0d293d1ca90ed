"""`minift eval`: loss, perplexity, task metrics, forgetting and the bias probe of a model,
an adapter or a finetune run."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .. import chat
from ..data import load_dataset
from ..evaluate import evaluate_generation, forgetting_report, perplexity
from ..tables import format_table
from ..probes import bias_probe
from ..model import GPT
from ..options import RECIPE, UsageError, cli_device
from ..tasks import DEFAULT_TASK, REFERENCE, get_task
from .common import add_command, add_model_flags, load_for_inference, number
from .taskdata import context_length, read_reference, task_records

EVAL_EPILOG = """examples:
  minift eval                                   minift-tiny on the built-in test split
  minift eval --run runs/lora-20250101-120000 --forgetting --bias
  minift eval --model gpt2 --adapter my-adapter --data test.jsonl --json
Prints loss and perplexity on --data (every target token), task metrics (exact match,
token F1, ROUGE-L of greedy answers) for records with a prompt: {"prompt", "completion"},
{"instruction", "output"} or {"messages"} (the last assistant turn; an empty prompt counts
in the loss only),
reference perplexity with --forgetting (and the base model's, for an adapter or a run),
and the log-likelihood gaps of minift's minimal pairs with --bias."""


def register(subparsers) -> None:
    p = add_command(subparsers, "eval", "evaluate a model, an adapter or a run", EVAL_EPILOG, run)
    add_model_flags(p)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--data", metavar="FILE",
                   help="data as finetune's --data reads it: .txt, .jsonl, .csv, .tsv, "
                        ".parquet, .arrow, a saved datasets folder or a cached dataset id "
                        "(default: the built-in test split)")
    number(p, "--eval-samples", int, 64, "task metrics on the first N prompts", minimum=1)
    number(p, "--max-new-tokens", int, 48, "answer length for the task metrics", minimum=1)
    number(p, "--batch-size", int, RECIPE["batch_size"], "as finetune's evaluations", minimum=1)
    p.add_argument("--forgetting", action="store_true",
                   help="perplexity on --reference, and the base model's for comparison")
    p.add_argument("--reference", metavar="FILE",
                   help="text for --forgetting (default: the built-in reference.txt)")
    p.add_argument("--bias", action="store_true", help="run the minimal-pairs bias probe")
    p.add_argument("--bias-pairs", metavar="FILE",
                   help="JSONL of {category, a, b} pairs (default: minift's 40)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        elif v is not None:
            flat[prefix + k] = v
    return flat


def run(args) -> int:
    device = cli_device(args.device)
    model, tok, weights, base, adapter = load_for_inference(args)
    model.to(device)
    n_virtual = model.peft_config.num_virtual_tokens if getattr(
        model, "is_prompt_learning", False) else 0
    context, block = context_length(model.config.n_positions, n_virtual)
    path = Path(args.data) if args.data else get_task(DEFAULT_TASK).path("test")
    kind, records = task_records(path, tok, None)
    if kind == "preference":
        raise UsageError(f"{path} holds preference pairs; minift eval scores supervised data "
                         "(finetune --objective dpo reports their reward accuracy)")
    examples = load_dataset(path, tok, block_size=context, max_length=context)
    if args.forgetting:   # read and checked before any evaluation runs
        ref_path = Path(args.reference) if args.reference else REFERENCE
        text = read_reference(ref_path, tok)
    ppl = perplexity(model, examples, batch_size=args.batch_size)
    result = {"model": weights, "adapter": str(adapter) if adapter else None,
              "base_model": base if weights != base else None, "data": str(path),
              "examples": len(examples), "loss": math.log(ppl), "perplexity": ppl}
    room = context - args.max_new_tokens
    # an empty prompt has no token for generation to continue from (finetune skips it too)
    records = [r for r in records if "prompt" in r and 0 < len(tok.encode(r["prompt"])) <= room]
    if records:
        result["task"] = evaluate_generation(
            model, tok, records[:args.eval_samples], args.max_new_tokens, args.batch_size,
            eos_token_id=chat.end_of_turn_id(tok) if kind == "chat" else None)
    if args.forgetting:
        ppl_ref = perplexity(model, text, tok, args.batch_size, block)
        result["reference"] = {"file": str(ref_path), "perplexity": ppl_ref}
        if weights != base or adapter is not None:  # the base model, for comparison
            base_model = GPT.from_pretrained(base).to(device)
            result["reference"]["forgetting"] = forgetting_report(
                perplexity(base_model, text, tok, args.batch_size, block), ppl_ref)
    if args.bias:
        probe = bias_probe(model, tok, args.bias_pairs, args.batch_size)
        result["bias"] = {k: v for k, v in probe.items() if k != "pairs"}
    print(json.dumps(result, indent=2) if args.json else
          format_table(_flatten(result), max_width=60))
    return 0
