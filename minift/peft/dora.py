"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA: Weight-Decomposed
Low-Rank Adaptation").

A pretrained weight W (out, in) is split into a magnitude and a direction (§3.1, Eq. 2):
W = m V / ||V||_c with m = ||W||_c, the norm of each output row (PEFT's layout: one value per
output feature, the rows of nn.Linear's (out, in) weight). LoRA then adapts the direction and
m is trained directly (§4.1, Eq. 5):

    W' = m * (W + s B A) / ||W + s B A||_c          m (out,), the norm over `in` for each row

The norm is treated as a constant in the backward pass (§4.3): it follows B A in the forward
but gets no gradient, which saves the memory of its graph. So, with n = ||W + s B A||_c:

    y = (m / n) * (x W^T + s x A^T B^T) + b

which is the fused LoRA op's output without bias, scaled per output feature. GPT-2's Conv1D
weights are (in, out) on disk; minift holds them as nn.Linear's (out, in), so the norm runs
over dim 1 here and the magnitude scales rows. Scaling columns instead has the right shape
only on the square c_proj matrices, where it silently gives wrong numbers; the tests compare
every layer with PEFT.

With LoRA dropout on (training), PEFT applies the mask to the input of the whole DoRA term,
base product included: y = x W^T + b + (m/n - 1) * (x_d W^T) + (m/n) s x_d A^T B^T, with
x_d = dropout(x). minift computes the same numbers.
"""
from __future__ import annotations

import torch

from ..linear import linear
from ..ops import keep_mask
from .lora import LoraLinearFunction


@torch.no_grad()
def weight_norm(weight, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """||W + s B A||_c: (out,), in the adapter's dtype, detached (DoRA §4.3)."""
    w = weight.to(lora_A.dtype) + scaling * (lora_B @ lora_A)            # (out, in)
    return torch.linalg.norm(w, dim=1)                                    # (out,)


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling: float,
                dropout_p: float = 0.0) -> torch.Tensor:
    """DoRA's forward (module docstring) through LoraLinearFunction, plus elementwise ops."""
    scale = magnitude / weight_norm(weight, lora_A, lora_B, scaling)     # (out,)
    if dropout_p == 0:
        t, _ = LoraLinearFunction.apply(x, weight, None, lora_A, lora_B, scaling, None, 1.0)
        y = scale * t                                                     # (..., out)
        return (y if bias is None else y + bias).to(t.dtype)
    keep = keep_mask(x.shape, dropout_p, x.device)
    xd = x * keep * (1.0 / (1.0 - dropout_p))                             # dropout(x)
    t, _ = LoraLinearFunction.apply(xd, weight, None, lora_A, lora_B, scaling, None, 1.0)
    y = linear(x, weight, bias) + scale * t - linear(xd, weight)          # (..., out)
    return y.to(t.dtype)


@torch.no_grad()
def dora_merged_weight(weight, lora_A, lora_B, magnitude, scaling: float) -> torch.Tensor:
    """W' = (m / n)[:, None] * (W + s B A): (out, in) in W's dtype. The norm comes from the
    unmerged W, as in the forward pass."""
    w = weight.to(lora_A.dtype) + scaling * (lora_B @ lora_A)            # (out, in)
    return ((magnitude / torch.linalg.norm(w, dim=1))[:, None] * w).to(weight.dtype)
