"""`minift generate`: continue a prompt with a model, an adapter or a finetune run."""
from __future__ import annotations

import sys

import torch

from ..options import UsageError
from .common import add_command, add_model_flags, device_of, load_for_inference, number

GENERATE_EPILOG = """examples:
  minift generate --prompt 'The os module'
  minift generate --run runs/lora-20250101-120000 --prompt $'def os.getcwd():\\n    \"\"\"'
  minift generate --model gpt2 --adapter my-adapter --prompt Hi --do-sample --top-p 0.9 --seed 1
  echo 'some prompt' | minift generate --prompt -
Sampling is on with --do-sample, or when --temperature, --top-k or --top-p is given."""


def register(subparsers) -> None:
    p = add_command(subparsers, "generate", "continue a prompt", GENERATE_EPILOG, run)
    add_model_flags(p)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--prompt", required=True, help="the text to continue; - reads "
                   "stdin (without the newline echo adds)")
    number(p, "--max-new-tokens", int, 50, "tokens to generate")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    number(p, "--temperature", float, None, "sampling temperature (1.0 when sampling)")
    number(p, "--top-k", int, None, "sample from the k most likely tokens")
    number(p, "--top-p", float, None, "nucleus sampling: the smallest set of mass p")
    number(p, "--seed", int, 0, "sampling seed")


def run(args) -> int:
    prompt = sys.stdin.read().removesuffix("\n") if args.prompt == "-" else args.prompt
    if not prompt:
        raise UsageError("--prompt is empty; the model needs at least one token to continue")
    model, tok, *_ = load_for_inference(args)
    model.to(device_of(args))
    sample = args.do_sample or any(v is not None
                                   for v in (args.temperature, args.top_k, args.top_p))
    ids = torch.tensor([tok.encode(prompt)], device=model.device)
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=sample,
                         temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
                         eos_token_id=tok.eos_token_id, seed=args.seed)
    new = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    print(prompt + tok.decode(new))
    return 0
