"""Probes of what a model does, with no task data: copying from its context, and bias.

- `copy_probe`: in-context copying. The prompt is a line of random identifiers followed by
  the first identifier of the same line again; a model that copies from its context (the
  "induction heads" of Olsson et al. 2022, §2) continues with the rest of the line. This is
  what every built-in task needs: the answer is made of names that stand in the prompt.
  A model that cannot do this cannot learn the tasks, whatever the fine-tuning strategy.
- `bias_probe`: log-likelihood gap between minimal sentence pairs that differ only in
  a group term, in the spirit of CrowS-Pairs (Nangia et al. 2020), on a small pair set
  shipped in minift/assets/bias_pairs.jsonl.
"""
from __future__ import annotations

import json
import os
import random
import string
from pathlib import Path

from .data import collate
from .evaluate import _check_batch_size, _encode, _inference, continuation_logprobs
from .stats import bootstrap_ratio_ci

# minift's 40 pairs (gender 12, age 10, nationality 10, religion 8). Side a is, per
# category: the male term; the younger person; a European or North American country;
# a Christian. Side b: the female term; the older person; a country elsewhere; another faith.
BIAS_PAIRS = Path(__file__).parent / "assets" / "bias_pairs.jsonl"


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


def copy_probe(model, tokenizer, n_trials: int = 20, n_names: int = 12, seed: int = 0,
               batch_size: int = 50) -> dict:
    """Greedy continuation of `a, b, c, ...\\na` against `, b, c, ...`, token by token.

    Returns {"token_accuracy": matched target tokens / target tokens (a token counts when
    the generated token at its position is the same), "low", "high": its 95% bootstrap
    interval over the lines, "exact": the share of lines copied whole, "n": n_trials}.
    Context and target are tokenised separately, as the model sees them (GPT-2's
    pre-tokeniser splits before ", " anyway). Lines go batch_size at a time, left-padded
    (positions restart at each line's first token, so padding changes nothing but float
    rounding); the lines depend only on seed, not on batch_size. A batch ends early where
    its longest context plus its longest target would pass the model's n_positions (each
    line alone must fit: a small tokenizer's lines are long).
    """
    _check_batch_size(batch_size)
    contexts, targets = probe_lines(tokenizer, n_trials, n_names, seed)
    limit = getattr(getattr(model, "config", None), "n_positions", None)
    hits = []
    with _inference(model) as device:
        for i, j in _batches(contexts, targets, batch_size, limit):
            ctx, tgt = contexts[i:j], targets[i:j]
            batch = collate([{"input_ids": c} for c in ctx], pad_token_id=0, padding_side="left")
            ids = batch["input_ids"].to(device)                               # (b, T)
            out = model.generate(ids, attention_mask=batch["attention_mask"].to(device),
                                 max_new_tokens=max(map(len, tgt)), do_sample=False)
            for row, target in zip(out[:, ids.shape[1]:].tolist(), tgt):
                hits.append(sum(a == b for a, b in zip(row, target)))
    lengths = [len(t) for t in targets]
    ci = bootstrap_ratio_ci(hits, lengths, seed=seed)
    return {"token_accuracy": ci["ratio"], "low": ci["low"], "high": ci["high"],
            "exact": sum(h == n for h, n in zip(hits, lengths)) / n_trials, "n": n_trials}


def probe_lines(tokenizer, n_trials: int, n_names: int, seed: int):
    """copy_probe's lines, tokenised: (contexts `a, b, c, ...\na`, targets `, b, c, ...`)."""
    rng = random.Random(seed)
    lines = [random_identifiers(n_names, rng) for _ in range(n_trials)]
    contexts = _encode(tokenizer, [", ".join(names) + "\n" + names[0] for names in lines])
    targets = _encode(tokenizer, [", " + ", ".join(names[1:]) for names in lines])
    return contexts, targets


def _batches(contexts, targets, batch_size: int, limit: int | None):
    """(start, end) of consecutive lines, at most batch_size of them, whose padded context
    and generated target fit in `limit` positions (generation's rule: width + new <= limit)."""
    start = 0
    while start < len(contexts):
        end, width, new = start, 0, 0
        while end < len(contexts) and end - start < batch_size:
            w, n = max(width, len(contexts[end])), max(new, len(targets[end]))
            if limit is not None and w + n > limit:
                break
            end, width, new = end + 1, w, n
        if end == start:
            raise ValueError(f"copy_probe: line {start} takes {len(contexts[start])} context + "
                             f"{len(targets[start])} target tokens, more than the model's "
                             f"n_positions={limit}; use fewer n_names")
        yield start, end
        start = end


# ----------------------------------------------------------------------------- bias probe
_PAIR_FIELDS = ("category", "a", "b")


def _check_pair(rec, where: str) -> dict:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected an object with fields {_PAIR_FIELDS}, "
                         f"got {type(rec).__name__}")
    for key in _PAIR_FIELDS:
        if not isinstance(rec.get(key), str) or not rec[key].strip():
            raise ValueError(f"{where}: field {key!r} must be a non-empty string, "
                             f"got {rec.get(key)!r:.80}")
    if rec["a"] == rec["b"]:
        raise ValueError(f"{where}: sentences a and b are identical")
    return {k: rec[k] for k in _PAIR_FIELDS}


def load_bias_pairs(path: str | os.PathLike | None = None) -> list[dict]:
    """Read {"category", "a", "b"} records, one JSON object per line (default: minift's own).

    Blank lines are skipped; any bad line raises ValueError naming the file and line.
    """
    path = Path(BIAS_PAIRS if path is None else path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the pair file ({e})") from None
    pairs = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: invalid JSON: {e.msg} "
                                 f"(column {e.colno})") from None
            pairs.append(_check_pair(rec, f"{path} line {n}"))
    if not pairs:
        raise ValueError(f"{path}: no pairs (the file is empty)")
    return pairs


def _gap_summary(rows: list[dict]) -> dict:
    gaps = [r["gap"] for r in rows]
    return {"mean_gap": sum(gaps) / len(gaps), "share_a": sum(g > 0 for g in gaps) / len(gaps),
            "n": len(gaps)}


def bias_probe(model, tokenizer, pairs=None, batch_size: int = 8) -> dict:
    """Log-likelihood gap on minimal pairs, in the spirit of CrowS-Pairs (Nangia et al. 2020).

    pairs: None (minift's 40 pairs), a path to a JSONL file, or a list of
    {"category", "a", "b"} dicts, where a and b differ only in a group term. Each
    sentence is scored by its full log-likelihood sum_t log p(x_t | eos, x_<t): eos is
    prepended as GPT-2's start-of-text, so the first word is scored too.
    gap = LL(a) - LL(b) > 0 means the model finds side a more likely.
    Returns {"mean_gap", "share_a" (fraction of pairs with gap > 0; 0.5 is balanced),
    "n", "by_category": {category: the same three}, "pairs": per-pair rows}.
    Summed log-likelihood favours terms with fewer tokens; a handful of pairs per
    category is a probe for large effects, not a statistical test.
    """
    if pairs is None or isinstance(pairs, (str, os.PathLike)):
        pairs = load_bias_pairs(pairs)
    elif isinstance(pairs, (list, tuple)) and pairs:
        pairs = [_check_pair(p, f"pair {i}") for i, p in enumerate(pairs)]
    else:
        raise ValueError("pairs must be None, a JSONL path or a non-empty list of "
                         "{'category', 'a', 'b'} dicts")
    start = tokenizer.eos_token_id
    if start is None:
        raise ValueError("bias_probe prepends eos as start-of-text; the tokenizer has no eos token")
    sentences = _encode(tokenizer, [s for p in pairs for s in (p["a"], p["b"])])
    ll = continuation_logprobs(model, [([start], ids) for ids in sentences], batch_size)
    rows = [{**p, "ll_a": ll[2 * i], "ll_b": ll[2 * i + 1], "gap": ll[2 * i] - ll[2 * i + 1]}
            for i, p in enumerate(pairs)]
    by_category = {c: _gap_summary([r for r in rows if r["category"] == c])
                   for c in dict.fromkeys(r["category"] for r in rows)}  # first-seen order
    return {**_gap_summary(rows), "by_category": by_category, "pairs": rows}
