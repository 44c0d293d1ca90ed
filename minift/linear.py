"""The linear layers' matrix products on the CPU in float32, through oneDNN.

torch sends a float32 `F.linear` or `x @ w` on the CPU to MKL's sgemm. torch also ships
oneDNN, and its float32 inner-product kernel (the op `torch.ops.mkldnn._linear_pointwise`,
which inductor's CPU fusions call) was faster at every shape GPT-2 small takes on the 2-core
AMD EPYCs this project is built on (`python scripts/bench_linear.py`, MKL's time over
oneDNN's). On a Zen 4: 1.2-1.5x on its projections in a 4 x 256 training step, forward and
input gradient, and 2.0-2.8x for the LM head at 1-4 rows, a decoding step. On a Zen 5 (full-
width AVX-512, which MKL does not use on AMD): 1.85-2.2x forward and input gradient, 1.5-1.85x
weight gradient. So on the CPU, in float32, minift's linear layers, its fused LoRA op, its
MLP op and its LM-head loss run their products through the functions below, except small
ones (under MIN_MACS multiply-adds, where oneDNN's fixed cost per call loses: a decoding row
through a small model's layers).
Everywhere else (CUDA, bf16, autocast, code compiled by inductor, torch.func's transforms,
a torch built without oneDNN) they are plain `F.linear` and `@`. Set GEMM = "mkl" to use
torch's own products everywhere.

The numbers are float32's, summed in another order than MKL's: against a float64 product
both are within float32's rounding (oneDNN's error up to 3.4x MKL's, about 1e-6 of the
largest entry at K = 768; tests/test_linear.py). Both are deterministic.

torch's FlopCounterMode has no formula for the oneDNN op, so this module registers one
(through torch.utils.flop_counter.register_flop_formula, torch's hook for it): the same
2 x rows x in x out as for aten.mm, so counting FLOPs of a minift step gives the same total
with either kernel (tested).

Shapes: x (..., in), weight (out, in) as nn.Linear stores it, bias (out,).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

GEMM = "onednn"  # "onednn": oneDNN's float32 products on the CPU; "mkl": torch's own (MKL's)
# oneDNN's op costs about 30-40 us a call before any work, so products under MIN_MACS
# multiply-adds (rows x out x in) stay with MKL. `python scripts/bench_linear.py --shape tiny
# --rounds 7 --generate`, MKL's time over oneDNN's at minift-tiny's shapes (C = 256): c_attn
# 0.60x at 1 row (196k), 1.03x at 4, 1.12x at 64; the LM head (4096 x 256) 1.65x at 1 row
# (1M). Its greedy generation at batch 1 against MKL everywhere: 0.88x with oneDNN at every
# size, 1.09x from MIN_MACS (at batch 8: 1.33x and 1.28x).
MIN_MACS = 1 << 20
_HAVE_ONEDNN = torch.backends.mkldnn.is_available()

if _HAVE_ONEDNN:
    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        """x (rows..., in) times weight (out, in)^T: 2 FLOPs per multiply-add, as aten.mm.
        The op's `binary` overload (inductor's) takes (x, other, weight, ...): its weight is
        the first 2-d shape after other (a bias is 1-d)."""
        if args and isinstance(args[0], (tuple, list)) and len(args[0]) == 2:
            w_shape = args[0]
        rows = 1
        for d in x_shape[:-1]:
            rows *= d
        return 2 * rows * x_shape[-1] * w_shape[0]


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x's product with weight (x W^T, g W, or g^T x as g^T (x^T)^T) goes to oneDNN:
    float32 on the CPU, eager, no autocast (which casts F.linear's operands itself), no
    torch.func transform (the op has no batching rule), and at least MIN_MACS multiply-adds
    (rows x out x in: x.numel() / x.shape[-1] rows, weight.numel() = out x in)."""
    if GEMM != "onednn":
        if GEMM != "mkl":
            raise ValueError(f"minift.linear.GEMM must be 'onednn' or 'mkl', got {GEMM!r}")
        return False
    return (_HAVE_ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and x.numel() > 0 and x.numel() // x.shape[-1] * weight.numel() >= MIN_MACS
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
            and not torch._C._are_functorch_transforms_active())


def _onednn_t(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """oneDNN's x weight^T + bias, (..., out), once uses_onednn has said yes."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias,
                                           "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])


def matmul_t(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """x weight^T + bias, (..., out), with no autograd of its own: for use inside an
    autograd.Function's forward or backward (linear() is the differentiable one)."""
    return _onednn_t(x, weight, bias) if uses_onednn(x, weight) else F.linear(x, weight, bias)


def matmul(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """g weight, (..., in), for g (..., out): the input gradient of x weight^T. No autograd.
    weight.t() is passed as oneDNN's (in, out) weight, a view (copying it was no faster
    once the copy is counted)."""
    return _onednn_t(g, weight.t()) if uses_onednn(g, weight) else g @ weight


def matmul_tn(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """g^T x, (out, in), for g (..., out) and x (..., in): the weight gradient of x W^T. No
    autograd. Passed to oneDNN as g^T times (x^T)^T, two views: on a Zen 5, 0.54-0.65x
    MKL's time at GPT-2 small's four projections, 1,024 rows (`python
    scripts/bench_linear.py`, medians of 7 rounds)."""
    gt = g.reshape(-1, g.shape[-1]).t()                                # (out, N)
    xt = x.reshape(-1, x.shape[-1]).t()                                # (in, N)
    return _onednn_t(gt, xt) if uses_onednn(gt, xt) else gt @ xt.t()


class _Linear(torch.autograd.Function):
    """y = x W^T + b with the products of the forward and both gradients through oneDNN
    (linear() applies it only where uses_onednn says so; the backward's g is the forward's
    float32 CPU output). Saved: x only if W trains, W only if x needs a gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.save_for_backward(x if need_w else None, weight if need_x else None)
        return _onednn_t(x, weight, bias)

    @staticmethod
    def backward(ctx, g):                                              # g (..., out)
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad                  # need_b: a bias trains
        g2 = g.reshape(-1, g.shape[-1])
        dx = matmul(g, weight) if need_x else None                     # (..., in)
        dw = matmul_tn(g2, x) if need_w else None                      # (out, in)
        db = g2.sum(0) if need_b else None                             # (out,)
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """F.linear(x, weight, bias), differentiable, with the products through oneDNN where
    uses_onednn says so."""
    if not uses_onednn(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _Linear.apply(x, weight, bias)
    return _onednn_t(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (the same parameters, names, init and state dict) whose forward is
    linear(): GPT-2's projections in model.py."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
