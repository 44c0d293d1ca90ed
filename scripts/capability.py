"""What the embedded base model can do before fine-tuning: the numbers behind the README's
"minift-tiny" section.

    python scripts/capability.py            # ~1 minute on 2 CPU cores

- held-out perplexity on minift/assets/reference.txt (pretraining text never trained on);
- in-context copying (minift.probes.copy_probe): a line of random identifiers, started
  again, continued greedily, on --copy-lines lines (1,000: its 95% interval is about
  +-1.5 points; on 40 lines it was +-9);
- syntactically valid Python: for the `def` lines of the params task's test functions
  (task modules, never read in pretraining), sampled bodies (temperature 0.8, top-k 40)
  and the greedy one, cut where the function ends, parse with `ast` as a whole function.
  The function ends at the first line indented less than the body's first line: the model
  picks the body's indentation itself (mostly 8 or 12 spaces, as for a method), and its
  next line at a lower level starts the next definition (at column 0 or, in the class it
  imagines, at 4). A body at column 0 is no body. A body that ran out of tokens
  mid-statement is cut back to its last complete line first, so only what the model
  finished is judged.
"""
from __future__ import annotations

import argparse
import ast
import json
import re

import torch

from minift import GPT, Tokenizer
from minift.evaluate import perplexity
from minift.probes import copy_probe
from minift.tasks import REFERENCE, get_task


def function_text(head: str, body: str) -> str:
    """The def line and the body up to the first non-blank line indented less than the
    body's first non-blank line (nothing when that line is at column 0)."""
    lines, indent = [], None
    for line in body.split("\n"):
        if line.strip():
            depth = len(line) - len(line.lstrip())
            indent = depth if indent is None else indent
            if depth < max(indent, 1):
                break
        lines.append(line)
    return head + "\n".join(lines)


def parses(text: str) -> bool:
    """Valid Python as it stands, or after dropping up to 3 trailing (unfinished) lines. The
    task's def lines name the function by its dotted path (`def hmac.HMAC.update(...)`),
    which Python's grammar refuses; the last part stands in for it."""
    text = re.sub(r"^def [\w.]*?(\w+)\(", r"def \1(", text)
    lines = text.rstrip().split("\n")
    for cut in range(0, min(4, len(lines) - 1)):
        try:
            ast.parse("\n".join(lines[:len(lines) - cut]) + ("\n    pass" if cut else ""))
            return True
        except SyntaxError:
            continue
    return False


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minift-tiny")
    p.add_argument("--samples", type=int, default=91, help="def lines (91: all of them)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--copy-lines", type=int, default=1000, help="lines of the copying probe")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    model, tok = GPT.from_pretrained(args.model), Tokenizer.from_pretrained(args.model)
    ppl = perplexity(model, REFERENCE.read_text(encoding="utf-8"), tok, batch_size=16)
    copy = copy_probe(model, tok, n_trials=args.copy_lines, seed=args.seed)
    # the prompt stops at the colon: the tokenizer merges a newline with the indentation that
    # follows it, so a prompt ending in a bare "\n" would cut a token the model never saw cut
    heads = [r["prompt"].split("\n")[0] for r in get_task("params").records("test")]
    heads = heads[:args.samples]
    valid = {"greedy": 0, "sampled": 0}
    with torch.no_grad():
        for head in heads:
            ids = torch.tensor([tok.encode(head)])
            for mode in valid:
                out = model.generate(ids, max_new_tokens=args.max_new_tokens,
                                     do_sample=mode == "sampled", temperature=0.8, top_k=40,
                                     eos_token_id=tok.eos_token_id)
                body = tok.decode(out[0, ids.shape[1]:].tolist()).split("<|endoftext|>")[0]
                valid[mode] += parses(function_text(head, body))
    result = {"model": args.model, "reference_perplexity": round(ppl, 2),
              "copy_token_accuracy": round(copy["token_accuracy"], 3),
              "copy_token_accuracy_95": [round(copy["low"], 3), round(copy["high"], 3)],
              "copy_exact": round(copy["exact"], 3), "copy_lines": copy["n"],
              "valid_python_greedy": round(valid["greedy"] / len(heads), 3),
              "valid_python_sampled": round(valid["sampled"] / len(heads), 3),
              "def_lines": len(heads)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
