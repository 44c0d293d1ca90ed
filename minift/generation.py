"""Decoding: greedy and sampled generation with the KV cache, for GPT and the PEFT wrappers.

`generate` drives any callable with GPT's forward signature; `filter_logits` applies
temperature, top-k and top-p (nucleus) filtering to the next token's logits.
"""
from __future__ import annotations

import math

import torch


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def sampling_problem(temperature, top_k, top_p, do_sample: bool) -> tuple[str, str] | None:
    """(argument, what is wrong with it) for the first bad sampling argument, else None.

    The ranges are transformers' (5.x, checked against it): a temperature must be > 0 when
    sampling (transformers raises for 0 and points to do_sample=False; greedy decoding
    ignores the temperature, so 0 is harmless there and accepted); top_k=0 means no top-k
    filter, as in transformers; top_p is a probability mass in [0, 1]. top_k and top_p are
    checked even when decoding greedily: a bad value is a mistake either way. Callers name
    the argument their own way (generate: "top_k", the CLI: "--top-k").
    """
    if not _number(temperature) or temperature < 0:
        return "temperature", f"must be a finite number >= 0 (> 0 when sampling), got {temperature!r}"
    if do_sample and temperature == 0:
        return "temperature", ("must be > 0 when sampling, got 0 (transformers refuses it "
                               "too); for greedy decoding pass do_sample=False")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        return "top_k", f"must be an integer >= 0 (0: no top-k filter), got {top_k!r}"
    if top_p is not None and not (_number(top_p) and 0 <= top_p <= 1):
        return "top_p", f"must be a number in [0, 1], got {top_p!r}"
    return None


def filter_logits(logits: torch.Tensor, temperature=1.0, top_k=None, top_p=None) -> torch.Tensor:
    """(B, V) logits -> logits with the excluded tokens set to -inf, ready for softmax.

    top_k keeps the k largest (0 or None: all); top_p keeps the smallest set of most likely
    tokens whose probability reaches top_p (nucleus sampling, Holtzman et al. 2020 §3.1), at
    least one (so top_p=0 is greedy, 1 or None keeps every token).
    """
    problem = sampling_problem(temperature, top_k, top_p, do_sample=True)
    if problem is not None:
        raise ValueError(" ".join(problem))
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:   # 0 or None: no top-k filter
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs      # mass of the strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False                   # the most likely token stays (top_p=0)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def generate(model, input_ids, max_new_tokens=20, do_sample=False, temperature=1.0, top_k=None,
             top_p=None, eos_token_id=None, attention_mask=None, pad_token_id=None,
             use_cache=True, generator=None, seed=None, **forward_kwargs):
    """Decoding loop shared by GPT and the PEFT wrappers: `model(...)` is any callable with
    GPT's forward signature. Positions come from the attention mask (cumsum - 1), so a
    left-padded prompt starts at position 0 exactly like an unpadded one."""
    B, T = input_ids.shape
    n_positions = model.config.n_positions
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    problem = sampling_problem(temperature, top_k, top_p, do_sample)
    if problem is not None:   # before the first forward, rather than deep inside torch
        raise ValueError(" ".join(problem))
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if generator is None and seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    ids, mask, past = input_ids, attention_mask, None
    for _ in range(max_new_tokens):
        if ids.shape[1] >= n_positions:
            raise ValueError(f"generation reached the model's context n_positions={n_positions}; "
                             "lower max_new_tokens or shorten the prompt")
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        if use_cache and past is not None:  # feed only the newest token; the cache holds the rest
            out = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:],
                        past_key_values=past, use_cache=True, **forward_kwargs)
        else:
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                        use_cache=use_cache, **forward_kwargs)
        past = out.past_key_values
        logits = out.logits[:, -1, :].float()                                  # (B, V)
        if do_sample:
            probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = logits.argmax(-1)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            done |= nxt == eos_token_id
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if eos_token_id is not None and bool(done.all()):
            break
    return ids
