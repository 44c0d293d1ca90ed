"""Partial and full fine-tuning: plain functions that set `requires_grad`, no wrapper.

Partial fine-tuning trains only the top k blocks: the lower blocks hold the more general
features and the top ones the more task-specific (Yosinski et al. 2014, "How transferable are
features in deep neural networks?"; gradual unfreezing builds on it, see regularize.py).
Only parameters with requires_grad get gradients and optimizer state, so pass
`[p for p in model.parameters() if p.requires_grad]` to the optimizer.

Note: GPT-2 ties lm_head.weight to transformer.wte.weight (one tensor). Training the head
therefore also trains the input embeddings, and freezing either freezes both.
"""
from __future__ import annotations

import torch.nn as nn


def freeze_all_but_top(model: nn.Module, k: int, train_ln_f: bool = True,
                       train_head: bool = False) -> int:
    """Freeze everything except the last k blocks of `model.transformer.h` (plus the final
    LayerNorm when train_ln_f, plus lm_head when train_head: with tied weights that is wte
    too). Returns the number of trainable parameters."""
    n_layer = len(model.transformer.h)
    if not isinstance(k, int) or not 0 <= k <= n_layer:
        raise ValueError(f"k={k!r}: the model has {n_layer} blocks, so k must be in 0..{n_layer}")
    model.requires_grad_(False)
    for block in model.transformer.h[n_layer - k:]:   # h[n_layer - k], ..., h[n_layer - 1]
        block.requires_grad_(True)
    if train_ln_f:
        model.transformer.ln_f.requires_grad_(True)
    if train_head:
        model.lm_head.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def unfreeze_all(model: nn.Module) -> int:
    """Full fine-tuning: every parameter trainable. Returns their number."""
    model.requires_grad_(True)
    return sum(p.numel() for p in model.parameters())
