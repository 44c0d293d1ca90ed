"""The fast path's pieces inside the blocks, each equal to the plain composition it
replaces (tests/test_ops.py gradchecks every one): dropout masks of one byte, attention with
dropout in query blocks, and the MLP's c_proj recomputing its activation. The LM-head loss at
target positions only, the fast path's last piece, is loss.py.

model.py reads as a reference GPT-2 and calls these where a reference would call
nn.Dropout, F.scaled_dot_product_attention and c_proj(act(h)).

Shapes: B batch, nh heads, T queries, S = P + T keys (P past or prefix keys), hs head size,
C width.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .linear import matmul, matmul_t, matmul_tn

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's tanh approximation
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}
# d act(h)/dh times a gradient g, for ActLinear's backward: the kernels autograd itself uses
ACTIVATION_GRADS = {
    "gelu_new": lambda g, h: torch.ops.aten.gelu_backward(g, h, approximate="tanh"),
    "gelu_pytorch_tanh": lambda g, h: torch.ops.aten.gelu_backward(g, h, approximate="tanh"),
    "gelu": lambda g, h: torch.ops.aten.gelu_backward(g, h),
    "relu": lambda g, h: torch.ops.aten.threshold_backward(g, h, 0),
}
QUERY_BLOCK = 128  # query rows per block of AttentionDropout (eager CPU training)


# ---------------------------------------------------------------------------- dropout
# uniforms per round of keep_mask's walk on the CPU: its (k,) buffers (uniforms, steps and
# gaps, 768 KB) stay in the 2 MB L2 (`scripts/bench_mask.py --draws 13,15,17`: a GPT-2 small
# step's masks took 125 / 111 / 136 ms, medians of 7 alternating rounds)
MASK_DRAWS = 1 << 15


def _walk_(keep: torch.Tensor, p: float) -> None:
    """Fill a flat uint8 / int8 tensor with a dropout keep-mask: 0 with probability p, else 1.

    Drawing one random number per element is most of the cost of a mask, yet at p = 0.1 only
    one element in ten is dropped. So the walk draws only the rarer outcome's positions (the
    drops for p <= 1/2, the keeps above it: probability q): between two of them the number of
    elements of the other kind is Geometric(q), P(gap >= g) = (1 - q)^g, and
    gap = floor(log U / log(1 - q)) has exactly that law for U uniform on (0, 1] (inversion:
    Knuth, TAOCP vol. 2, §3.4.1, the geometric distribution). U = (b + 1) / 2^53 from a
    random 53-bit integer b of torch's generator: P(drop) = p to float64's rounding of the log
    (a threshold on 32-bit integers is within 2^-33, a float32 uniform within 2^-24). About
    n q draws instead of n: at GPT-2's p = 0.1 a step's masks take 0.39x the time of one
    32-bit integer an element (`scripts/bench_mask.py`: 116 against 261 ms, rounds
    0.30-0.64x); at p = 1/2, 1.7x (505 against 301 ms). The positions come MASK_DRAWS
    gaps a round, so one mask's draws depend only on n and p; a round ends the walk once it
    passes the last element (its unused draws are dropped).
    """
    n = keep.numel()
    q, rare = (p, 0) if p <= 0.5 else (1.0 - p, 1)
    keep.fill_(1 - rare)
    if q <= 0 or n == 0:
        return
    scale = 1.0 / math.log1p(-q)                    # < 0, so log U * scale >= 0
    k = min(MASK_DRAWS, int(n * q + 6 * math.sqrt(n * q * (1 - q))) + 16)  # one round, mostly
    u = torch.empty(k, dtype=torch.float64)
    steps = torch.arange(k)                         # each rare element moves the walk by one
    start = 0                                       # the position the next gap counts from
    while True:
        u.random_(1, 2**53 + 1)                     # b + 1, b a 53-bit integer: exact in float64
        gaps = u.mul_(2.0**-53).log_().mul_(scale).to(torch.int64)      # floor: all >= 0
        pos = gaps.cumsum_(0).add_(steps).add_(start)                    # (k,), increasing
        cut = int(torch.searchsorted(pos, n))       # those inside the mask
        keep.index_fill_(0, pos[:cut], rare)
        if cut < k:
            return
        start = int(pos[-1]) + 1


# Every drawn_keep says it writes this tensor (it never changes it), so each draw depends on
# the one before it as data, and inductor, which orders a graph's ops by their data alone,
# runs them in program order. Without it inductor reorders independent draws (a mask for a
# small tensor drawn before one for a larger, earlier one), effect tokens included.
_DRAW_ORDER = torch.zeros(1, dtype=torch.int8)


@torch.library.custom_op("minift::drawn_keep", mutates_args=("order",), device_types="cpu")
def drawn_keep(order: torch.Tensor, n: int, p: float) -> torch.Tensor:
    """`_walk_`'s mask of n elements as int8, an op of its own so that compiled code can call
    it (dynamo stops its graph at Tensor.random_) and draw exactly what eager code draws, in
    the same order: `order` is _DRAW_ORDER. A new tensor each call: masks written into
    buffers from torch.empty would share one buffer once the graph merged equal empties."""
    keep = torch.empty(n, dtype=torch.int8)
    _walk_(keep, p)
    return keep


@drawn_keep.register_fake
def _(order, n, p):
    return torch.empty(n, dtype=torch.int8)


def keep_mask(shape, p: float, device: torch.device) -> torch.Tensor:
    """Dropout's keep-mask, one byte an element: multiply by it (then by 1 / (1 - p)) to drop.

    On the CPU, `_walk_`'s mask: 0 with probability p, from about n min(p, 1 - p) draws of
    torch's generator (the masks are the largest cost outside the matmuls of a bf16 LoRA
    step). Eager code gets it as uint8 (torch's CPU kernels multiply a float tensor by a bool
    one through a float copy of the bool, by a uint8 one directly, 2-4x faster at GPT-2's
    shapes); code compiled by inductor gets the same mask as int8, through the op `drawn_keep`
    (its C++ loads and stores bool tensors several times slower than int8 ones). Other devices
    draw torch.rand >= p (one fused kernel there).
    """
    device = torch.device(device)
    if device.type != "cpu":
        keep = torch.rand(shape, device=device) >= p
        return torch.where(keep, 1, 0).to(torch.int8) if torch.compiler.is_compiling() else keep
    n = math.prod(shape)
    if torch.compiler.is_compiling():
        return drawn_keep(_DRAW_ORDER, n, p).view(shape)
    keep = torch.empty(n, dtype=torch.uint8)
    _walk_(keep, p)                                 # the op's own body, without its dispatch
    return keep.view(shape)


class Dropout(nn.Dropout):
    """nn.Dropout (Srivastava et al. 2014: zero each element with probability p, scale the
    rest by 1 / (1 - p)) that keeps a 1-byte mask on the CPU.

    torch's CPU dropout draws a float mask with bernoulli_ and keeps it, 4 bytes an element,
    for the backward. Here the mask is `keep_mask` (1 byte an element), and
    `(x * keep) * scale` lets autograd keep only that: a quarter of the memory, drawn in a
    fraction of bernoulli_'s time (`scripts/bench_mask.py`). The same distribution, the same
    output for the same mask. On other devices F.dropout is already one fused kernel with a
    1-byte mask, so it is used as is.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        keep = keep_mask(x.shape, self.p, x.device)                     # P(keep) = 1 - p
        return torch.mul(x, keep).mul_(1.0 / (1.0 - self.p))


# ---------------------------------------------------------------------------- attention
def query_blocks(T: int, S: int, block: int | None) -> list[tuple[int, int, int]]:
    """(i0, i1, keys) per block of query rows [i0, i1): causal attention lets query i see
    keys j <= P + i (P = S - T), so the block needs only the first P + i1 keys.
    block None: one block, every key (compiled code: inductor fuses the whole square)."""
    if block is None or T <= block:
        return [(0, T, S)]
    return [(i, min(i + block, T), S - T + min(i + block, T)) for i in range(0, T, block)]


def _block_probs(q, k, mask, i0, i1, n_keys):
    """softmax(q k^T) of query rows [i0, i1) over the first n_keys keys: (B, nh, i1 - i0,
    n_keys). Causal (key j <= P + i) unless `mask` (bool, broadcast to (B, nh, T, S), causal
    already) says which keys; a query allowed no key (left padding) gets zeros, as in SDPA."""
    scores = q[:, :, i0:i1] @ k[:, :, :n_keys].transpose(-2, -1)           # (B, nh, n, keys)
    if mask is None:  # only the last i1 - i0 keys hold future ones: a triangle
        n, P = i1 - i0, k.shape[2] - q.shape[2]
        future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
        scores[..., P + i0:n_keys].masked_fill_(future, float("-inf"))
        return scores.softmax(-1)
    m = mask[..., i0:i1, :n_keys]
    probs = scores.masked_fill_(~m, float("-inf")).softmax(-1)
    return probs.masked_fill_(~m.any(-1, keepdim=True), 0.0)


def _block_masks(keep, q, blocks):
    """Views of the flat keep-mask, one (B, nh, i1 - i0, keys) per block (None: no dropout)."""
    if keep is None:
        return [None] * len(blocks)
    B, nh = q.shape[:2]
    out, at = [], 0
    for i0, i1, n_keys in blocks:
        n = B * nh * (i1 - i0) * n_keys
        out.append(keep[at:at + n].view(B, nh, i1 - i0, n_keys))
        at += n
    return out


class AttentionDropout(torch.autograd.Function):
    """Causal attention with dropout on the probabilities (Vaswani et al. 2017, §3.2.1, §5.4):

        y = ((softmax(q k^T / sqrt(hs)) * keep) / (1 - p)) v         keep: 0/1 per (query, key)

    For training on the CPU, where SDPA under dropout falls back to its math kernel, which
    computes the full (T x S) square and keeps scores, probabilities and dropped
    probabilities, (B, nh, T, S) each, for the backward. Here the queries go in blocks of
    `query_blocks` rows, each against only the keys causality lets it see, so about half the
    square is computed and only one block's probabilities exist at a time. Kept for the
    backward: q (scaled), k, v and the 1-byte keep-mask of the computed blocks, flat (one
    draw, in block order); the probabilities are recomputed ("selective activation
    recomputation", Korthikanti et al. 2022, §4.3). The backward per block, with P the
    probabilities and D = P * keep / (1 - p):

        dv += D^T dy      dP = (dy v^T) * keep / (1 - p)      dS = P * (dP - rowsum(dP * P))
        dq = dS k / sqrt(hs)      dk += dS^T q / sqrt(hs)

    keep None (p = 0): the same blocks with no dropout, for bf16 training on the CPU, where
    SDPA's forward + backward takes 1.2-1.9x these blocks' time (scripts/bench_attention.py).
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, keep, p: float, block: int | None):
        # q (B, nh, T, hs); k, v (B, nh, S, hs); mask bool broadcast to (B, nh, T, S) or None
        # for causal; keep flat 0/1 (uint8, int8 or bool: keep_mask) over query_blocks(T, S, block),
        # or None when p = 0
        blocks = query_blocks(q.shape[2], k.shape[2], block)
        q = _contiguous_mul(q, 1.0 / math.sqrt(q.shape[-1]))              # scaled, (B, nh, T, hs)
        k, v = k.contiguous(), v.contiguous()
        y = torch.empty(*q.shape[:3], v.shape[-1], dtype=v.dtype, device=q.device)
        v3, y3 = _heads_flat(v), _heads_flat(y)                           # (B nh, S or T, hs)
        for (i0, i1, n_keys), kb in zip(blocks, _block_masks(keep, q, blocks)):
            probs = _block_probs(q, k, mask, i0, i1, n_keys)
            if kb is not None:
                probs.mul_(kb)                                             # dropped, unscaled
            torch.bmm(_heads_flat(probs), v3[:, :n_keys], out=y3[:, i0:i1])
        ctx.save_for_backward(q, k, v, mask, keep)
        ctx.p, ctx.blocks = p, blocks
        return y.mul_(1.0 / (1.0 - p)) if p > 0 else y                      # (B, nh, T, hs)

    @staticmethod
    def backward(ctx, dy):
        q, k, v, mask, keep = ctx.saved_tensors                            # q scaled
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dy3 = _heads_flat(_contiguous_mul(dy, 1.0 / (1.0 - ctx.p)))        # (B nh, T, hs)
        q3, k3, v3 = _heads_flat(q), _heads_flat(k), _heads_flat(v)
        dq = torch.empty_like(q) if need_q else None
        dk = torch.zeros_like(k) if need_k else None
        dv = torch.zeros_like(v) if need_v else None
        for (i0, i1, n_keys), kb in zip(ctx.blocks, _block_masks(keep, q, ctx.blocks)):
            probs = _block_probs(q, k, mask, i0, i1, n_keys)               # recomputed
            dyb = dy3[:, i0:i1]                                            # (B nh, n, hs)
            d_probs = torch.bmm(dyb, v3[:, :n_keys].transpose(1, 2)).view_as(probs)
            if kb is not None:
                d_probs.mul_(kb)
            # softmax's backward, P * (dP - rowsum(dP * P)), in one pass
            d_scores = _heads_flat(torch._softmax_backward_data(d_probs, probs, -1, probs.dtype))
            # the products accumulate into (or are written to) their slices: no temporaries
            if need_v:  # after the softmax backward: this drops out of probs in place
                dvb = _heads_flat(dv)[:, :n_keys]
                dropped = probs if kb is None else probs.mul_(kb)
                torch.baddbmm(dvb, _heads_flat(dropped).transpose(1, 2), dyb, out=dvb)
            if need_q:  # not in block 0 under prefix tuning: nothing below it trains
                torch.bmm(d_scores, k3[:, :n_keys], out=_heads_flat(dq)[:, i0:i1])
            if need_k:
                dkb = _heads_flat(dk)[:, :n_keys]
                torch.baddbmm(dkb, d_scores.transpose(1, 2), q3[:, i0:i1], out=dkb)
        if need_q:
            dq.mul_(1.0 / math.sqrt(q.shape[-1]))
        return dq, dk, dv, None, None, None, None


def _heads_flat(t: torch.Tensor) -> torch.Tensor:
    """(B, nh, n, m) contiguous -> the (B nh, n, m) view that bmm takes."""
    return t.view(-1, *t.shape[2:])


def _contiguous_mul(t: torch.Tensor, scale: float) -> torch.Tensor:
    """t * scale, laid out contiguously: a plain `t * scale` keeps the strides of a
    transposed t (q and dy come from (B, T, nh, hs) tensors), and every bmm on a query
    block of it would then copy the block first. Eager: one pass, into a contiguous `out`.
    Compiled: inductor fuses the product and the copy (and does not keep `out=`'s strides)."""
    if torch.compiler.is_compiling():
        return (t * scale).contiguous()
    return torch.mul(t, scale, out=torch.empty(t.shape, dtype=t.dtype, device=t.device))


def attention(q, k, v, mask=None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs)) v over the keys each query may see: causal (query i sees
    keys j <= P + i) when mask is None, else the bool `mask` (B, 1, T, S), True = attend.
    With dropout_p > 0, dropout on the probabilities. q (B, nh, T, hs), k, v (B, nh, S, hs).

    F.scaled_dot_product_attention everywhere except CPU training with dropout, where it
    would run its math kernel over the whole square, and eager CPU training in bf16, where
    its backward is slower than query blocks (AttentionDropout's docstring): AttentionDropout
    instead. (Compiled bf16 code without dropout keeps SDPA, which inductor lowers itself.)
    """
    T, S = q.shape[2], k.shape[2]
    if q.device.type == "cpu" and torch.is_grad_enabled() and (dropout_p > 0 or (
            q.dtype == torch.bfloat16 and not torch.compiler.is_compiling())):
        block = None if torch.compiler.is_compiling() else QUERY_BLOCK
        n = sum((i1 - i0) * n_keys for i0, i1, n_keys in query_blocks(T, S, block))
        keep = (keep_mask((q.shape[0] * q.shape[1] * n,), dropout_p, q.device)
                if dropout_p > 0 else None)
        return AttentionDropout.apply(q, k, v, mask, keep, dropout_p, block)
    if mask is None and S > T > 1:  # causal with an offset: SDPA's is_causal can't say it
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril_(S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=mask is None and T > 1)


# ---------------------------------------------------------------------------- MLP
class ActLinear(torch.autograd.Function):
    """`F.linear(act(h), weight, bias)` keeping h, not act(h), for the backward.

    When c_proj's weight trains, its gradient needs its input act(h), and the activation's
    backward needs h: two (B, T, 4C) tensors a layer. This keeps h only and recomputes the
    cheap pointwise act(h) in the backward ("selective activation recomputation",
    Korthikanti et al. 2022, §4.3). The forward and setup_context are apart and the backward
    is plain torch ops (the activation's derivative from ACTIVATION_GRADS), so torch.func's
    grad and vmap (per-example gradients) work through it.
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(h, weight, bias, activation: str):  # h (..., 4C), weight (C, 4C)
        return matmul_t(ACTIVATIONS[activation](h), weight, bias)       # (..., C)

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, weight, _, activation = inputs
        ctx.activation = activation
        ctx.save_for_backward(h, weight)

    @staticmethod
    def backward(ctx, g):                                                # g (..., C)
        h, weight = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g2 = g.reshape(-1, g.shape[-1])
        dh = dw = db = None
        if need_w:
            a = ACTIVATIONS[ctx.activation](h)                           # recomputed (..., 4C)
            dw = matmul_tn(g2, a.to(g.dtype))                            # (C, 4C)
        if need_b:
            db = g2.sum(0)                                               # (C,)
        if need_h:
            dh = ACTIVATION_GRADS[ctx.activation](matmul(g, weight.to(g.dtype)).to(h.dtype), h)
        return dh, dw, db, None
