"""Probes of what a base model can do before any fine-tuning.

- `copy_probe`: in-context copying. The prompt is a line of random identifiers followed by
  the first identifier of the same line again; a model that copies from its context (the
  "induction heads" of Olsson et al. 2022, §2) continues with the rest of the line. This is
  what every built-in task needs: the answer is made of names that stand in the prompt.
  A model that cannot do this cannot learn the tasks, whatever the fine-tuning strategy.
"""
from __future__ import annotations

import random
import string

import torch


def random_identifiers(n: int, rng: random.Random) -> list[str]:
    """n distinct snake_case names of one or two random-letter parts (never real words by
    design, so only the context can tell the model what comes next)."""
    out: list[str] = []
    while len(out) < n:
        parts = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
                 for _ in range(rng.randint(1, 2))]
        name = "_".join(parts)
        if name not in out:
            out.append(name)
    return out


def copy_probe(model, tokenizer, n_trials: int = 20, n_names: int = 12, seed: int = 0) -> dict:
    """Greedy continuation of `a, b, c, ...\\na` against `, b, c, ...`, token by token.

    Returns {"token_accuracy": matched target tokens / target tokens (a token counts when
    the generated token at its position is the same), "exact": the share of lines copied
    whole, "n": n_trials}. Context and target are tokenised separately, as the model sees
    them (GPT-2's pre-tokeniser splits before ", " anyway).
    """
    rng = random.Random(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    matched = total = exact = 0
    try:
        with torch.no_grad():
            for _ in range(n_trials):
                names = random_identifiers(n_names, rng)
                context = tokenizer.encode(", ".join(names) + "\n" + names[0])
                target = tokenizer.encode(", " + ", ".join(names[1:]))
                ids = torch.tensor([context], device=device)
                out = model.generate(ids, max_new_tokens=len(target), do_sample=False)
                got = out[0, len(context):].tolist()
                hits = sum(a == b for a, b in zip(got, target))
                matched, total, exact = matched + hits, total + len(target), exact + (got == target)
    finally:
        model.train(was_training)
    return {"token_accuracy": matched / total, "exact": exact / n_trials, "n": n_trials}
