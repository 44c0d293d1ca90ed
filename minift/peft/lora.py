"""LoRA: low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen linear layer W (out, in) gets a trainable low-rank update (§4.1):

    h = W x + (alpha / r) * B A x,        A (r, in), B (out, r), r << min(in, out)

A starts Kaiming-uniform (nn.Linear's own init, as in loralib and PEFT) and B at zero, so
training starts exactly at the pretrained function. rsLoRA (Kalajdzievski 2023, "A Rank
Stabilization Scaling Factor for Fine-Tuning with LoRA") scales by alpha / sqrt(r) instead,
so the update does not vanish as r grows.

This file holds the config and the fused op; the layer that uses them (LoraLinear, and
several named adapters per layer) is in lora_layer.py, DoRA in dora.py, merging and adapter
arithmetic as pure functions over tensors in merge.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..linear import matmul, matmul_t, matmul_tn
from ..ops import keep_mask
from .config import PeftError, check_task_type


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """The factor s on B A: lora_alpha / r (Hu et al. §4.1), or lora_alpha / sqrt(r) (rsLoRA)."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


@dataclass
class LoraConfig:
    task_type: str | None = "CAUSAL_LM"   # PEFT's field; causal LM is all minift does
    inference_mode: bool = False          # True: the adapter is frozen too (saved files say True)
    base_model_name_or_path: str | None = None  # recorded in adapter_config.json, never opened
    r: int = 8                            # rank of the update (PEFT's default)
    lora_alpha: float = 8                 # the update is scaled by lora_alpha / r (PEFT's default)
    lora_dropout: float = 0.0             # dropout on the LoRA branch's input only
    # Module names matched as PEFT does: an entry hits a name equal to it or ending in "." + it
    # ("c_proj" hits attn.c_proj and mlp.c_proj); a str is a regex the full name must match.
    # GPT-2's linears: c_attn, attn.c_proj, c_fc, mlp.c_proj (and lm_head, tied to wte).
    target_modules: list[str] | str = field(default_factory=lambda: ["c_attn"])  # PEFT's default
    layers_to_transform: list[int] | int | None = None  # only these blocks (None: every block)
    layers_pattern: list[str] | str | None = None  # name before the block number ("h"); None: found
    use_rslora: bool = False              # scale by lora_alpha / sqrt(r) (rsLoRA)
    bias: str = "none"                    # biases stay frozen; PEFT's "all"/"lora_only" are refused
    init_lora_weights: bool | str = True  # True: A Kaiming-uniform, B = 0; "gaussian": A ~ N(0, 1/r),
                                          # B = 0; False: nn.Linear's init for both (not a no-op)
    use_dora: bool = False                # DoRA (Liu et al. 2024): a trained magnitude per output
                                          # feature, `lora_magnitude_vector`; see dora.py
    peft_type: ClassVar[str] = "LORA"

    def __post_init__(self):
        check_task_type(self.task_type)
        self.task_type = "CAUSAL_LM"
        if not isinstance(self.r, int) or self.r <= 0:
            raise PeftError(f"LoRA rank r must be a positive integer, got r={self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise PeftError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias != "none":
            raise PeftError(f"bias={self.bias!r} is not supported; minift's LoRA keeps biases "
                            "frozen (bias='none')")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise PeftError(f"init_lora_weights={self.init_lora_weights!r} is not supported; use "
                            "True, False or 'gaussian'")
        if isinstance(self.target_modules, str):
            if self.layers_to_transform is not None or self.layers_pattern is not None:
                raise PeftError("layers_to_transform / layers_pattern cannot be used when "
                                "target_modules is a regex str (as in PEFT)")
        else:
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise PeftError("target_modules is empty")

    def extra_json(self) -> dict:
        return {"fan_in_fan_out": True}  # what PEFT writes for GPT-2's Conv1D (in, out) weights

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)


class LoraLinearFunction(torch.autograd.Function):
    """The LoRA hot path as one op (Hu et al. 2021, §4.1, with dropout on the LoRA input):

        u = (x * keep) A^T / (1 - p)            (..., r)    keep: 0/1 dropout mask or None
        y = x W^T + b + s u B^T                 (..., out)  s = scaling

    Saved for the backward: x, the 1-byte mask (uint8 on the CPU, int8 when compiled: see
    `minift.ops.keep_mask`) and the thin u, plus references to W, A, B.
    Not the dropped-out copy of x, and nothing for W, which is frozen: its gradient
    (and b's) is computed only if asked for. The backward, with g = dL/dy (N, out):

        dB = s g^T u            (out, r)
        du = s g B              (N, r)
        dA = du^T (x * keep) / (1 - p)                       (r, in)
        dx = g W + ((du A) * keep) / (1 - p)                 (N, in)

    The scalars are applied to the thin (N, r) / (r, in) tensors, not to (N, in) ones.
    Plain tensor ops only, so torch.compile traces it without a graph break and fuses the
    mask, the scalings and the adds into the surrounding kernels. Adapters kept in float32
    over a float16/bfloat16 base compute the LoRA branch in float32 (the `.to`s are no-ops
    otherwise), the precision the optimizer updates them in. Under autocast every product
    runs in autocast's dtype, the thin ones of the backward too, as PEFT's layers do under
    it (the backward runs outside autocast, so setup_context notes the dtype); x is cast
    once for the base and the branch. The forward returns u too (not
    differentiable), so that setup_context, apart from the forward as torch.func asks, can
    keep it: `grad` and `vmap` (per-example gradients) work through the op. `lora_linear`
    returns y alone.
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, scaling: float, keep, keep_scale: float):
        # x (..., in); weight (out, in); bias (out,) or None; lora_A (r, in); lora_B (out, r)
        dtype = _branch_dtype(x, lora_A)
        x = x.to(dtype) if torch.is_autocast_enabled(x.device.type) else x  # cast once, not twice
        base = matmul_t(x, weight, bias)                                  # (..., out)
        xa = x.to(dtype)
        xd = xa if keep is None else xa * keep                             # dropout, unscaled
        u = F.linear(xd, lora_A) * keep_scale                             # (..., r)
        y = torch.add(base, F.linear(u, lora_B), alpha=scaling).to(base.dtype)
        return y, u

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, lora_A, lora_B, scaling, keep, keep_scale = inputs
        u = output[1]
        ctx.mark_non_differentiable(u)
        ctx.save_for_backward(x, keep, u, weight, lora_A, lora_B)
        ctx.scaling, ctx.keep_scale = scaling, keep_scale
        ctx.dtype = _branch_dtype(x, lora_A)       # the backward runs outside autocast

    @staticmethod
    def backward(ctx, g, _):                                              # _: u's, always None
        x, keep, u, weight, lora_A, lora_B = ctx.saved_tensors
        s, q, dt = ctx.scaling, ctx.keep_scale, ctx.dtype
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        g = g.reshape(-1, g.shape[-1])                                    # (N, out)
        x2 = x.reshape(-1, x.shape[-1])                                   # (N, in)
        keep2 = None if keep is None else keep.reshape(-1, keep.shape[-1])
        ga = g.to(dt)
        # The two thin products with g are computed transposed, (r, N) and (r, out): BLAS
        # is 3-6x slower on (N, out) @ (out, r) with r tiny than on (r, out) @ (out, N).
        du = (lora_B.to(dt).t() @ ga.t()).t() * s                         # (N, r)
        dx = dw = db = dA = dB = None
        if need_x:
            back = (du * q) @ lora_A.to(dt)                               # (N, in)
            if keep2 is not None:
                back = back.mul_(keep2)
            dx = (matmul(g, weight.to(g.dtype)) + back.to(g.dtype)).reshape(x.shape).to(x.dtype)
        if need_A:
            xa = x2.to(dt)
            xd = xa if keep2 is None else xa * keep2
            dA = ((du.t() @ xd) * q).to(lora_A.dtype)                     # (r, in)
        if need_B:
            dB = ((u.reshape(-1, u.shape[-1]).to(dt).t() @ ga).t() * s).to(lora_B.dtype)
        if need_w:  # only when the base weight was unfrozen on purpose
            dw = matmul_tn(g, x2.to(g.dtype)).to(weight.dtype)            # (out, in)
        if need_b:
            db = g.sum(0).to(weight.dtype)                                # (out,)
        return dx, dw, db, dA, dB, None, None, None


def _branch_dtype(x: torch.Tensor, lora_A: torch.Tensor) -> torch.dtype:
    """The LoRA branch's dtype: autocast's when it is on (every matmul in it, the base's
    and the thin ones, forward and backward, as PEFT's layers run under autocast), else the
    adapter's own (float32 adapters over a bfloat16 base compute in float32)."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else lora_A.dtype


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0):
    """`x W^T + b + scaling * (dropout(x) A^T) B^T` through LoraLinearFunction.

    dropout_p > 0 draws a fresh mask (keep with probability 1 - p), as nn.Dropout in
    training mode does; pass 0 in evaluation. The mask compares uniform draws with p, which
    on CPU takes half the time of bernoulli_ (drawing the numbers is the cost here)."""
    keep = None
    if dropout_p > 0:
        keep = keep_mask(x.shape, dropout_p, x.device)          # (..., in), P(keep) = 1 - p
    y, _ = LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, keep,
                                    1.0 / (1.0 - dropout_p))
    return y


