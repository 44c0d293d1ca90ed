"""Pretrain minift-tiny, the embedded default model, on text every Python installation carries.

The corpus is `pydoc_data.topics` (the language reference behind `help("assert")`) and the
docstrings of scripts/stdlib_corpus.py's PRETRAIN_MODULES, each written as source:

    def string.capwords(s, sep=None):
        \"\"\"capwords(s [,sep]) -> string

        Split the argument into words using split, capitalize each
        ...

Every 20th document (bar those sharing a long line with the rest) is held out, never
trained on (not even by the tokenizer), and written to minift/assets/task/reference.txt:
its perplexity before and after fine-tuning measures forgetting. The script then trains a byte-level BPE tokenizer (minift.Tokenizer) and a
4-layer GPT-2 on the rest, and writes a Hugging Face folder to minift/assets/minift-tiny/:

    python scripts/pretrain_tiny.py      # ~15 minutes on 2 idle CPU cores (24 on busy ones)

Each training document is followed by <|endoftext|>, and the documents are concatenated
into one token stream. The validation perplexity is minift.evaluate.perplexity on the text
of reference.txt (non-overlapping 256-token blocks), the number a forgetting measurement
starts from. Deterministic for a given Python and torch: fixed module order, seeds and
thread count.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import textwrap
import time
from pathlib import Path

import pydoc_data.topics
import torch

from minift.evaluate import perplexity
from minift.model import GPT, GPTConfig
from minift.optim import AdamW, build_param_groups, get_cosine_schedule_with_warmup
from minift.tokenizer import Tokenizer
from stdlib_corpus import PRETRAIN_MODULES, clean_docstring, documented_objects, header, import_module

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "minift" / "assets" / "minift-tiny"
REFERENCE = ROOT / "minift" / "assets" / "task" / "reference.txt"
HOLD_OUT_EVERY = 20   # every 20th document (5%) is validation text
MIN_SHARED_LINE = 40  # a held-out line this long must not also occur in the training text


def as_source(head: str, doc: str) -> str:
    """'def f(x):' + docstring -> the definition as it reads in a .py file (body indented)."""
    quoted = f'"""{doc}"""' if "\n" not in doc else f'"""{doc}\n"""'
    return head + "\n" + textwrap.indent(quoted, "    ")


def documents() -> list[str]:
    """The whole corpus in a fixed order: reference topics by name, then modules as listed."""
    docs = [pydoc_data.topics.topics[k].strip() for k in sorted(pydoc_data.topics.topics)]
    for name in PRETRAIN_MODULES:
        module = import_module(name, PRETRAIN_MODULES)
        if module.__doc__:
            docs.append(f'import {name}\n"""{clean_docstring(module)}\n"""')
        for kind, qualname, obj in documented_objects(module):
            docs.append(as_source(header(kind, qualname, obj), clean_docstring(obj)))
    unique = list(dict.fromkeys(d for d in docs if d))  # exact duplicates once, first kept
    return unique


def split_documents(docs: list[str]) -> tuple[list[str], list[str]]:
    """Every HOLD_OUT_EVERY-th document is held out, unless one of its long lines also
    occurs in the training text (copied docstrings, boilerplate): that one is trained on."""
    train = [d for i, d in enumerate(docs) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1]
    held = [d for i, d in enumerate(docs) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
    seen = {s for d in train for line in d.splitlines() if len(s := line.strip()) >= MIN_SHARED_LINE}
    shared = [d for d in held if any(line.strip() in seen for line in d.splitlines())]
    reference = [d for d in held if d not in shared]
    return train + shared, reference


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=450)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)      # a 2.6M-parameter model tolerates a high lr
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=MODEL_DIR)
    p.add_argument("--reference", type=Path, default=REFERENCE)
    args = p.parse_args()
    torch.set_num_threads(2)  # fixed, so the run is reproducible (and shares the machine)
    torch.manual_seed(args.seed)
    t0 = time.time()

    # 1. The text: train / held-out documents. The held-out slice is written first, and
    #    nothing below sees it except perplexity().
    train_docs, reference_docs = split_documents(documents())
    train_text, reference_text = "\n\n".join(train_docs), "\n\n".join(reference_docs)
    lines = {line.strip() for line in train_text.splitlines()}
    assert not any(len(s := line.strip()) >= MIN_SHARED_LINE and s in lines
                   for line in reference_text.splitlines()), "held-out text leaked into training"
    args.reference.parent.mkdir(parents=True, exist_ok=True)
    args.reference.write_text(reference_text + "\n", encoding="utf-8")

    # 2. The tokenizer: GPT-2's byte-level BPE, trained on the training documents only.
    tok = Tokenizer.train_bpe(train_docs, vocab_size=args.vocab_size)
    n_positions = 256
    tok.model_max_length = n_positions

    # 3. Tokens: every document followed by eos, in one stream. Training samples random
    #    256-token windows from it (a new cut every step, as nanoGPT does). Progress is
    #    measured on the held-out text and, to see overfitting, on a training sample of
    #    about the same size (every 24th training document).
    stream = torch.tensor([t for ids in tok(train_docs)["input_ids"] for t in ids + [tok.eos_token_id]])
    probe_text = "\n\n".join(train_docs[::24])
    reference_tokens = len(tok.encode(reference_text))
    print(f"{len(train_docs)} training documents ({len(train_text):,} chars, {len(stream):,} tokens), "
          f"{len(reference_docs)} held out ({len(reference_text):,} chars, {reference_tokens:,} tokens)")

    # 4. The model: GPT-2's architecture at 1/50 of GPT-2 small's parameters.
    config = GPTConfig(n_layer=4, n_head=4, n_embd=192, vocab_size=tok.vocab_size,
                       n_positions=n_positions, bos_token_id=tok.eos_token_id,
                       eos_token_id=tok.eos_token_id)
    model = GPT(config)
    optimizer = AdamW(build_param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    schedule = get_cosine_schedule_with_warmup(optimizer, args.warmup, args.steps)
    print(f"model: {model.num_parameters():,} parameters; {args.steps} steps of "
          f"{args.batch_size} x {n_positions} tokens")

    gen = torch.Generator().manual_seed(args.seed)
    history, t_train = [], time.time()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(stream) - n_positions, (args.batch_size,), generator=gen)
        x = torch.stack([stream[s:s + n_positions] for s in starts.tolist()])  # (B, T)
        loss = model(x, labels=x, return_logits=False).loss  # labels are shifted inside
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.steps:
            train_ppl = perplexity(model, probe_text, tok, batch_size=16)
            val_ppl = perplexity(model, args.reference.read_text(encoding="utf-8"), tok, batch_size=16)
            history.append(dict(step=step, seconds=round(time.time() - t_train, 1),
                                train_loss=round(math.log(train_ppl), 4), val_loss=round(math.log(val_ppl), 4),
                                val_perplexity=round(val_ppl, 2)))
            print(f"step {step:4d}  batch loss {loss.item():.3f}  train {math.log(train_ppl):.3f}  "
                  f"val {math.log(val_ppl):.3f} (ppl {val_ppl:.1f})  {time.time() - t_train:.0f}s",
                  flush=True)
    train_seconds = time.time() - t_train

    # 5. The Hugging Face folder, and what it took to make it.
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    report = dict(
        python=platform.python_version(), torch=torch.__version__, seed=args.seed,
        pretrain_modules=len(PRETRAIN_MODULES), train_documents=len(train_docs),
        train_chars=len(train_text), train_tokens=len(stream),
        reference_documents=len(reference_docs), reference_chars=len(reference_text),
        reference_tokens=reference_tokens,
        parameters=model.num_parameters(), vocab_size=tok.vocab_size,
        steps=args.steps, batch_size=args.batch_size, block_size=n_positions,
        tokens_seen=args.steps * args.batch_size * n_positions, lr=args.lr,
        warmup=args.warmup, weight_decay=args.weight_decay,
        train_seconds=round(train_seconds), total_seconds=round(time.time() - t0),
        train_loss=history[-1]["train_loss"], val_loss=history[-1]["val_loss"],
        val_perplexity=history[-1]["val_perplexity"], history=history)
    (args.out / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"done in {report['total_seconds']}s: validation perplexity {report['val_perplexity']} "
          f"on {args.reference.name}; wrote {args.out}")


if __name__ == "__main__":
    main()
