"""Merging LoRA into the base weights and combining adapters: pure functions over tensors.

`merge_lora(state_dict, config)` folds LoRA (or DoRA) into a GPT state dict and returns the
plain GPT's state dict (torchtune's style: no module is changed). `combine` builds one layer's
A and B for PEFT's `add_weighted_adapter`, with PEFT's formulas:

  linear  A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i,   B = sum_i sqrt|w_i s_i| B_i  (same rank)
  cat     A = [w_1 s_1 A_1; w_2 s_2 A_2; ...],  B = [B_1, B_2, ...]  (rank sum r_i; exact:
          B A = sum_i w_i s_i B_i A_i)
  ties    the linear weights applied after TIES-merging A_i and B_i separately (Yadav et al.
          2023, "TIES-Merging", §3: trim to the top `density` magnitudes, elect the sign with
          the larger total mass, average the entries that agree with it)
  svd     the best rank-r approximation of sum_i w_i s_i B_i A_i (B = U S, A = V^T)

The new adapter gets lora_alpha = r, as in PEFT, so its own scaling is 1 (sqrt(r) with rsLoRA).
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from .config import PeftError
from .dora import dora_merged_weight
from .lora import LoraConfig

COMBINATIONS = ("svd", "linear", "cat", "ties")


@torch.no_grad()
def merged_weight(weight, lora_A, lora_B, scaling: float, magnitude=None) -> torch.Tensor:
    """W + s B A (LoRA, Hu et al. §4.2), or DoRA's m (W + s B A) / ||W + s B A||_c; in W's dtype."""
    if magnitude is not None:
        return dora_merged_weight(weight, lora_A, lora_B, magnitude, scaling)
    return weight + ((lora_B @ lora_A) * scaling).to(weight.dtype)


@torch.no_grad()
def merge_lora(state_dict: dict, config: LoraConfig) -> dict:
    """A state dict of a GPT with LoRA layers -> the plain GPT's state dict with LoRA folded in.

    Each LoRA layer L has `L.base_layer.weight` (out, in), `L.base_layer.bias`, `L.lora_A.weight`
    (r, in), `L.lora_B.weight` (out, r) and, with config.use_dora, `L.lora_magnitude_vector`
    (out,). They become `L.weight` = merged_weight(...) and `L.bias`; every other `.lora_` key
    is dropped, and all other tensors are passed through as they are (not copied). The input
    is not modified."""
    suffix = ".lora_A.weight"
    layers = [k[:-len(suffix)] for k in state_dict if k.endswith(suffix)
              and ".lora_adapters." not in k]
    out = {k.replace(".base_layer.", "."): v for k, v in state_dict.items() if ".lora_" not in k}
    for layer in layers:
        magnitude = state_dict.get(f"{layer}.lora_magnitude_vector")
        if (magnitude is not None) != config.use_dora:
            raise PeftError(f"{layer}: config.use_dora={config.use_dora} but the state dict "
                            f"{'has' if magnitude is not None else 'lacks'} lora_magnitude_vector")
        if f"{layer}.base_layer.weight" not in state_dict:
            raise PeftError(f"{layer}: lora_A without {layer}.base_layer.weight")
        out[f"{layer}.weight"] = merged_weight(
            state_dict[f"{layer}.base_layer.weight"], state_dict[f"{layer}.lora_A.weight"],
            state_dict[f"{layer}.lora_B.weight"], config.scaling, magnitude)
    return out


# ---------------------------------------------------------------------- adapter arithmetic
def _trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) entries of largest magnitude, zero the rest (TIES §3)."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
    return t * keep.reshape(t.shape)


def ties_merge(tensors: list[torch.Tensor], weights: list[float], density: float,
               majority_sign_method: str = "total") -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023 §3) of equally shaped tensors, as PEFT computes it:
    trim each, elect a sign per entry from the trimmed (unweighted) tensors ("total": the
    sign of their sum, "frequency": the more frequent sign; ties go to +), then the mean of
    the weighted entries whose sign agrees with the elected one."""
    trimmed = torch.stack([_trim(t, density) for t in tensors])           # (k, ...)
    sign = trimmed.sign()
    mass = trimmed.sum(0) if majority_sign_method == "total" else sign.sum(0)
    agree = sign == torch.where(mass >= 0, 1.0, -1.0)                     # (k, ...)
    w = torch.tensor(weights, dtype=trimmed.dtype, device=trimmed.device)
    weighted = trimmed * w.view(-1, *([1] * (trimmed.dim() - 1)))
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def combine(parts: list[tuple], weights: list[float], combination_type: str, rank: int,
            density: float | None = None, majority_sign_method: str = "total"):
    """One layer of add_weighted_adapter: `parts` are (A (r_i, in), B (out, r_i), s_i) of the
    adapters present on the layer, `weights` theirs. Returns (A (rank, in), B (out, rank))."""
    if combination_type == "cat":
        A = torch.cat([w * s * a for (a, _, s), w in zip(parts, weights)], dim=0)
        B = torch.cat([b for _, b, _ in parts], dim=1)
        pad = rank - A.shape[0]           # layers that only some adapters target
        return (torch.cat([A, A.new_zeros(pad, A.shape[1])]),
                torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1))
    if combination_type == "svd":
        delta = sum(w * s * (b @ a) for (a, b, s), w in zip(parts, weights))   # (out, in)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
        return Vh[:rank], U[:, :rank] @ torch.diag(S[:rank])
    ws = [w * s for (_, _, s), w in zip(parts, weights)]
    wA = [math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in ws]  # the sign on A only
    wB = [math.sqrt(abs(x)) for x in ws]
    As, Bs = [a for a, _, _ in parts], [b for _, b, _ in parts]
    if combination_type == "linear":
        return sum(w * a for w, a in zip(wA, As)), sum(w * b for w, b in zip(wB, Bs))
    return (ties_merge(As, wA, density, majority_sign_method),
            ties_merge(Bs, wB, density, majority_sign_method))


def combined_config(configs: list[LoraConfig], weights, combination_type: str,
                    density=None) -> tuple[LoraConfig, str]:
    """(the new adapter's config, the combination used) after checking that the combination
    is possible. The config is PEFT's: the first one with r = the new rank, lora_alpha = r and
    target_modules the union; a single adapter is always combined "linear", as in PEFT."""
    if len(weights) != len(configs):
        raise PeftError(f"add_weighted_adapter: {len(weights)} weights for {len(configs)} "
                        "adapters; give one weight per adapter")
    if combination_type not in COMBINATIONS:
        raise PeftError(f"combination_type={combination_type!r}; minift implements "
                        f"{list(COMBINATIONS)}")
    if any(c.use_dora for c in configs):
        raise PeftError("add_weighted_adapter cannot combine DoRA adapters (their magnitude "
                        "vectors have no weighted sum); merge them one at a time instead")
    if combination_type == "ties" and not (density is not None and 0 <= density <= 1):
        raise PeftError(f"combination_type='ties' needs density in [0, 1], got {density!r}")
    ranks = [c.r for c in configs]
    if len(configs) == 1:
        combination_type = "linear"
    if combination_type in ("linear", "ties") and len(set(ranks)) != 1:
        raise PeftError(f"combination_type={combination_type!r} needs adapters of one rank, got "
                        f"r={ranks}; use 'cat' or 'svd'")
    rank = sum(ranks) if combination_type == "cat" else max(ranks)
    kinds = {isinstance(c.target_modules, str) for c in configs}
    if len(kinds) > 1:
        raise PeftError("cannot combine adapters whose target_modules mix a regex str and a list")
    if kinds == {True}:
        targets = "|".join(f"({c.target_modules})" for c in configs)
    else:
        targets = sorted({t for c in configs for t in c.target_modules})
    return replace(configs[0], r=rank, lora_alpha=rank, target_modules=targets), combination_type
