"""`minift generate`: continue a prompt with a model, an adapter or a finetune run."""
from __future__ import annotations

import sys

import torch

from .. import chat
from ..generation import sampling_problem
from ..options import UsageError, cli_device
from .common import add_command, add_model_flags, load_for_inference, number

GENERATE_EPILOG = """examples:
  minift generate --prompt 'The os module'
  minift generate --run runs/lora-20250101-120000 --prompt $'def os.getcwd():\\n    \"\"\"'
  minift generate --model gpt2 --adapter my-adapter --prompt Hi --do-sample --top-p 0.9 --seed 1
  echo 'some prompt' | minift generate --prompt -
  minift generate --run runs/chat-run --chat --prompt 'What does os.getcwd return?'
  minift generate --run runs/chat-run --chat      (on a terminal: one turn per line, Ctrl-D ends)
Sampling is on with --do-sample, or when --temperature, --top-k or --top-p is given."""


def register(subparsers) -> None:
    p = add_command(subparsers, "generate", "continue a prompt", GENERATE_EPILOG, run)
    add_model_flags(p)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--prompt", help="the text to continue (with --chat: the user's message); "
                   "- reads stdin (without the newline echo adds)")
    p.add_argument("--chat", action="store_true", help="answer as the assistant, with the chat "
                   "template the run trained with (its tokenizer's, else the built-in one); "
                   "without --prompt, read turns from the terminal")
    number(p, "--max-new-tokens", int, 50, "tokens to generate", minimum=1)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    number(p, "--temperature", float, None, "sampling temperature (1.0 when sampling)")
    number(p, "--top-k", int, None, "sample from the k most likely tokens (0: all of them)")
    number(p, "--top-p", float, None, "nucleus sampling: the smallest set of mass p, in [0, 1]")
    number(p, "--seed", int, 0, "sampling seed")


def _sampling(args) -> dict:
    """generate()'s sampling arguments from the flags, checked before any loading: any of
    --temperature, --top-k, --top-p turns sampling on, so --temperature 0 is an error (as in
    transformers; greedy decoding is the default without these flags)."""
    sample = args.do_sample or any(v is not None
                                   for v in (args.temperature, args.top_k, args.top_p))
    temperature = 1.0 if args.temperature is None else args.temperature
    problem = sampling_problem(temperature, args.top_k, args.top_p, sample)
    if problem is not None and problem[0] == "temperature" and temperature == 0:
        raise UsageError("--temperature must be > 0, got 0; for greedy decoding leave out "
                         "--temperature, --top-k, --top-p and --do-sample")
    if problem is not None:
        name, what = problem
        raise UsageError(f"--{name.replace('_', '-')} {what}")
    return dict(do_sample=sample, temperature=temperature, top_k=args.top_k, top_p=args.top_p,
                seed=args.seed)


def run(args) -> int:
    sampling = _sampling(args)
    device = cli_device(args.device)
    prompt = sys.stdin.read().removesuffix("\n") if args.prompt == "-" else args.prompt
    if args.chat:
        return _chat(args, prompt, device, sampling)
    if not prompt:
        raise UsageError("--prompt is empty; the model needs at least one token to continue")
    model, tok, *_ = load_for_inference(args)
    model.to(device)
    ids = torch.tensor([tok.encode(prompt)], device=model.device)
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id,
                         **sampling)
    new = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    print(prompt + tok.decode(new))
    return 0


def _reply(model, tok, args, messages: list[dict], sampling: dict) -> str:
    """The assistant's next turn: the conversation rendered with the generation prompt (the
    tokens training saw before each assistant turn), continued to the end-of-turn token."""
    n_virtual = model.peft_config.num_virtual_tokens if getattr(
        model, "is_prompt_learning", False) else 0  # prompt tuning's tokens take context room
    stop = chat.end_of_turn_id(tok)
    room = model.config.n_positions - n_virtual - args.max_new_tokens
    ids = chat.prompt_ids(tok, messages)
    while len(ids) > room and len(messages) > 1:  # drop the oldest turns that do not fit
        messages[:] = messages[2:] if len(messages) > 2 else messages[1:]
        ids = chat.prompt_ids(tok, messages)
    if len(ids) > room:
        raise UsageError(f"the message is {len(ids)} tokens; with --max-new-tokens "
                         f"{args.max_new_tokens} the model's context holds {room}")
    out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=args.max_new_tokens,
                         eos_token_id=stop, **sampling)
    new = out[0, len(ids):].tolist()
    return tok.decode(new[:new.index(stop)] if stop in new else new).strip()


def _chat(args, prompt: str | None, device: str, sampling: dict) -> int:
    if prompt is None and not sys.stdin.isatty():
        raise UsageError("--chat without --prompt reads turns from a terminal; pass --prompt "
                         "MESSAGE (or --prompt - to read it from stdin)")
    if prompt is not None and not prompt.strip():
        raise UsageError("--prompt is empty")
    model, tok, *_ = load_for_inference(args)
    model.to(device)
    messages: list[dict] = []
    while True:
        if prompt is None:
            try:
                text = input("you> ")
            except EOFError:
                print()
                return 0
            if not text.strip():
                continue
        messages.append({"role": "user", "content": prompt if prompt is not None else text})
        answer = _reply(model, tok, args, messages, sampling)
        messages.append({"role": "assistant", "content": answer})
        print(answer if prompt is not None else f"model> {answer}", flush=True)
        if prompt is not None:
            return 0
