"""The LM-head loss at target positions only: where a reference GPT-2 computes
cross_entropy(lm_head(x)) over every position's (B, T, V) logits, `masked_lm_loss` runs the
head only where a label is not -100, a chunk of rows at a time, with its gradients computed
on the way (`ChunkedHeadLoss`), so the full logits never exist. Equal to the full-logits
loss and its gradients (tests/test_loss.py). model.py calls it; ops.py holds the fast
path's other pieces.

Shapes: N target tokens, C width, V vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import matmul, matmul_t, uses_onednn

# rows of LM-head logits per chunk (masked_lm_loss): GPT-2's (512, 50257) fp32 block is 103 MB;
# at 256 rows its matmuls ran 12% slower on the 2-core CPU (155 against 178 GFLOP/s forward)
HEAD_CHUNK = 512
# rows per block of the head's softmax (ChunkedHeadLoss): a 64-row fp32 block (12.9 MB at GPT-2's
# V) stays in the 32 MB L3 through its passes. `scripts/bench_head.py --rounds 9`, GPT-2 small's
# 1,020 targets, against one pass per 512-row chunk: bf16 1.10x faster (0.96-1.44; 32 rows
# 1.14x, 128 1.05x), fp32 1.06x (0.73-1.29); the same loss and gradient to the bit
SOFTMAX_ROWS = 64


class ChunkedHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of `h @ W^T` against `y`, one chunk of rows at a time.

    The forward also computes both gradients chunk by chunk (the softmax's gradient is
    `softmax - onehot`), so no (N, V) logits are ever kept for the backward: peak extra
    memory is one (chunk, V) block, worked on in place, instead of the full logits and
    their softmax. Same three matmuls as the plain forward + backward, so no extra compute.

    In float32 on the CPU both products of a chunk (the logits, d loss / d h) are oneDNN's
    (linear.py), each a fresh tensor: `scripts/bench_head.py`'s fp32 head at GPT-2 small's
    1,020 targets took 0.60-0.63x MKL's time in three runs on a Zen 5. Elsewhere every chunk's
    logits go into one buffer whose rows are padded to a multiple of 64 elements: BLAS
    writes aligned rows faster (for GPT-2's V = 50257), and one allocation replaces one per
    chunk. The matmuls run in the autocast dtype when autocast is on, as they would outside
    this op: writing into a buffer (`out=`) is exempt from autocast, so it is explicit.
    Accumulation (loss, weight gradient) is in fp32 at least: under bf16
    autocast the softmax is worked on in a second, fp32 buffer, made once like the first,
    and its gradient copied back into the first for the matmuls: no fresh (chunk, V) tensor
    for either conversion. (Mixed-dtype `out=` ops would fuse the conversions away, but
    torch's CPU kernels run those unvectorised: slower than the two copies.) The softmax
    goes SOFTMAX_ROWS rows at a time, so that block stays in cache through its passes and
    the fp32 buffer holds only that many rows; every number is the same as one pass over
    the chunk (row-wise ops; the loss is still summed a chunk at a time).
    """

    @staticmethod
    def forward(ctx, h, weight, y, chunk_size):  # h (N, C), weight (V, C), y (N,)
        need_w = weight.requires_grad
        acc = torch.promote_types(h.dtype, torch.float32)  # fp16/bf16 accumulate in fp32
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        total = torch.zeros((), dtype=acc, device=h.device)
        dev = h.device.type
        mm = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        hm, wm = h.to(mm), weight.to(mm)                               # no-ops without autocast
        grad_h = torch.empty_like(h)                                   # (N, C)
        V, n_rows = weight.shape[0], min(chunk_size, h.shape[0])
        sub = min(SOFTMAX_ROWS, n_rows)
        padded = lambda n, dtype: torch.empty(n, -(-V // 64) * 64, dtype=dtype,
                                              device=h.device)[:, :V]   # (n, V)
        fresh = uses_onednn(hm, wm)    # oneDNN's product is a new tensor: no buffer to write
        rows = None if fresh else padded(n_rows, mm)  # logits, then d loss / d logits
        same = mm == acc               # else the softmax works in an fp32 buffer of sub rows
        z = None if same else padded(sub, acc)
        row_loss = torch.empty(n_rows, 1, dtype=acc, device=h.device)
        for i in range(0, h.shape[0], chunk_size):
            hc, yc = hm[i:i + chunk_size], y[i:i + chunk_size, None]   # (n, C), (n, 1)
            logits = (matmul_t(hc, wm) if fresh                        # (n, V)
                      else torch.mm(hc, wm.t(), out=rows[:len(yc)]))
            for j in range(0, len(yc), sub):   # the softmax, sub rows at a time
                lj, yj = logits[j:j + sub], yc[j:j + sub]
                z_y = lj.gather(1, yj).to(acc)                         # target logits
                z_max = lj.amax(dim=-1, keepdim=True).to(acc)
                e = lj if same else z[:len(yj)].copy_(lj)
                e.sub_(z_max).exp_()                                   # exp(z - max), in place
                norm = e.sum(dim=-1, keepdim=True)
                torch.sub(z_max + norm.log(), z_y, out=row_loss[j:j + len(yj)])  # lse - z_y
                e.div_(norm)                                           # softmax, in place
                e.scatter_add_(1, yj, torch.full_like(z_y, -1.0))      # d loss / d logits
                if not same:
                    lj.copy_(e)
            total += row_loss[:len(yc)].sum()
            if grad_h.dtype == mm and not fresh:
                torch.mm(logits, wm, out=grad_h[i:i + chunk_size])     # (n, C)
            else:  # oneDNN's fresh product, or one in autocast's dtype: copied in
                grad_h[i:i + chunk_size] = matmul(logits, wm)          # (n, C)
            if need_w and logits.dtype == acc:
                torch.addmm(grad_w, logits.t(), hc, out=grad_w)        # (V, C) +=, no temporary
            elif need_w:
                grad_w += (logits.t() @ hc).to(acc)
        ctx.save_for_backward(grad_h)
        # Not in save_for_backward: the backward scales it in place (it is ours alone),
        # which saves a (V, C) copy at the moment memory peaks.
        ctx.grad_w = grad_w
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, = ctx.saved_tensors
        grad_w, ctx.grad_w = ctx.grad_w, None
        if grad_w is None and ctx.needs_input_grad[1]:
            raise RuntimeError("masked_lm_loss: backward ran twice through the same graph; "
                               "its weight gradient was handed over in place the first time")
        gw = None if grad_w is None else grad_w.mul_(grad_total).to(grad_h.dtype)
        return grad_h * grad_total.to(grad_h.dtype), gw, None, None


def masked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   chunk_size: int = HEAD_CHUNK) -> torch.Tensor:
    """Mean next-token cross-entropy computing the LM head only where a target exists.

    hidden (B, T, C), labels (B, T) unshifted as in transformers: position t predicts
    labels[t + 1]; -100 is ignored. Only the N target positions go through the head, in
    chunks of `chunk_size` rows, so the (N, V) logits never exist at once, in the forward
    or the backward. Equal to the full-logits loss and its gradients (tests check both).
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])         # (B*(T-1), C)
    y = labels[:, 1:].reshape(-1).to(hidden.device)          # (B*(T-1),)
    keep = y != -100
    h, y = h[keep], y[keep]                                   # (N, C), (N,)
    if y.numel() == 0:  # same as F.cross_entropy on no targets: nan, as in transformers
        return hidden.sum() * float("nan")
    acc = torch.promote_types(hidden.dtype, torch.float32)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        total = ChunkedHeadLoss.apply(h, weight, y, chunk_size)
    else:  # evaluation: no gradients to precompute
        total = sum(F.cross_entropy(matmul_t(h[i:i + chunk_size], weight).to(acc),
                                    y[i:i + chunk_size], reduction="sum")
                    for i in range(0, y.numel(), chunk_size))
    return total / y.numel()
