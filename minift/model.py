"""GPT-2, readable top to bottom (Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners"; architecture of Radford et al. 2018 with pre-LayerNorm, §2.3).

Module and parameter names are GPT-2's own (`transformer.h.0.attn.c_attn.weight`, ...),
so Hugging Face checkpoints load with one loop (see checkpoint.py). Unlike OpenAI's
Conv1D, every projection here is a plain `nn.Linear` storing (out, in).

Shapes: B batch, T new tokens, P past tokens (KV cache or prefix), C n_embd,
nh heads, hs = C // nh head size, V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# A KV cache / prefix: one (key, value) pair per layer, each (B, nh, P, hs).
KeyValues = list[tuple[torch.Tensor, torch.Tensor]]

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's tanh approximation
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}
# d act(h)/dh times a gradient g, for _ActLinear's backward: the kernels autograd itself uses
ACTIVATION_GRADS = {
    "gelu_new": lambda g, h: torch.ops.aten.gelu_backward(g, h, approximate="tanh"),
    "gelu_pytorch_tanh": lambda g, h: torch.ops.aten.gelu_backward(g, h, approximate="tanh"),
    "gelu": lambda g, h: torch.ops.aten.gelu_backward(g, h),
    "relu": lambda g, h: torch.ops.aten.threshold_backward(g, h, 0),
}


@dataclass
class GPTConfig:
    n_layer: int = 12              # GPT-2 small: 12 blocks, 12 heads, 768 wide = 124M params
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257        # GPT-2's byte-level BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_positions: int = 1024        # learned position embeddings, so this is a hard context limit
    n_inner: int | None = None     # MLP width; None means 4 * n_embd as in the paper
    embd_pdrop: float = 0.1        # GPT-2's three dropouts: after embeddings,
    attn_pdrop: float = 0.1        # on attention probabilities,
    resid_pdrop: float = 0.1       # and on each residual branch
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True  # lm_head shares wte's matrix, as in GPT-2
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    def __post_init__(self):
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"unsupported activation_function {self.activation_function!r}; "
                             f"minift supports {sorted(ACTIVATIONS)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """Keep the GPT-2 fields of a config.json; ignore the rest (HF bookkeeping)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None           # (B, T, V), None when return_logits=False
    past_key_values: KeyValues | None = None     # when use_cache=True


def keep_mask(shape, p: float, device: torch.device) -> torch.Tensor:
    """Dropout's keep-mask: 1 where a uniform draw is >= p (probability 1 - p), else 0, one
    byte an element; multiply by it (then by 1 / (1 - p)) to drop out.

    Eager code gets a bool tensor. On the CPU its uniform numbers are drawn 64K at a time
    into a buffer that stays in cache (the same numbers, in the same order, as one draw):
    GPT-2 small's attention mask at 4 x 256 would otherwise pass through a 12.6 MB float
    tensor per layer, which is slower and leaves heap fragments behind (a LoRA step's peak
    RSS: about 100 MB lower). Code compiled by inductor gets int8 0/1 made with `where`:
    inductor's C++ stores and loads bool tensors several times slower than int8 ones (that
    attention mask fused into the softmax: 10 ms instead of 1 ms on a 2-core CPU). The
    products are the same numbers.
    """
    if torch.compiler.is_compiling():
        return torch.where(torch.rand(shape, device=device) >= p, 1, 0).to(torch.int8)
    if torch.device(device).type != "cpu":
        return torch.rand(shape, device=device) >= p
    keep = torch.empty(shape, dtype=torch.bool, device=device)
    for part in keep.view(-1).split(1 << 16):
        torch.ge(torch.rand(part.shape, device=device), p, out=part)
    return keep


def _attention_probs(q, k, mask):
    """softmax(q k^T) over the keys `mask` allows (bool, broadcast to (B, nh, T, S)) or, for
    mask None, over keys j <= query i (causal, T == S); q comes scaled by 1 / sqrt(hs).
    A query allowed no key at all (left padding) gets zeros, as in SDPA."""
    scores = q @ k.transpose(-2, -1)                                     # (B, nh, T, S)
    if mask is None:
        T, S = scores.shape[-2:]
        future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu_(1)
        return scores.masked_fill_(future, float("-inf")).softmax(-1)
    probs = scores.masked_fill_(~mask, float("-inf")).softmax(-1)
    return probs.masked_fill_(~mask.any(-1, keepdim=True), 0.0)


class _AttentionDropout(torch.autograd.Function):
    """Attention with dropout on the probabilities (Vaswani et al. 2017, §3.2.1 and §5.4):

        y = ((softmax(q k^T / sqrt(hs)) * keep) / (1 - p)) v         keep: 0/1 (B, nh, T, S)

    For training on CPU, where SDPA under dropout falls back to its math kernel, which keeps
    the (B, nh, T, S) scores, probabilities and dropped probabilities for the backward:
    42 MB a layer for GPT-2 small at 4 x 256. This keeps q (scaled), k, v, as contiguous
    copies that replace c_attn's output, and the 1-byte mask, and recomputes the
    probabilities in the backward: "selective activation recomputation" (Korthikanti et al.
    2022, §4.3), one more QK^T per layer. With the mask saved, no random numbers are drawn
    twice. The backward, with P the probabilities and D = P * keep / (1 - p):

        dv = D^T dy      dP = (dy v^T) * keep / (1 - p)      dS = P * (dP - rowsum(dP * P))
        dq = dS k / sqrt(hs)      dk = dS^T q / sqrt(hs)
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, keep, p: float):
        # q (B, nh, T, hs); k, v (B, nh, S, hs); mask bool broadcast to (B, nh, T, S), or
        # None for causal; keep 0/1, bool or int8 (B, nh, T, S) (see keep_mask). Contiguous,
        # so the matmuls copy nothing.
        q = q * (1.0 / math.sqrt(q.shape[-1]))
        k, v = k.contiguous(), v.contiguous()
        probs = _attention_probs(q, k, mask)                               # (B, nh, T, S)
        y = (probs.mul_(keep) @ v).mul_(1.0 / (1.0 - p))                   # (B, nh, T, hs)
        ctx.save_for_backward(q, k, v, mask, keep)
        ctx.p = p
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, mask, keep = ctx.saved_tensors                            # q scaled
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        probs = _attention_probs(q, k, mask)                               # recomputed
        dy = dy * (1.0 / (1.0 - ctx.p))                                    # (B, nh, T, hs)
        dq = dk = dv = None
        d_probs = (dy @ v.transpose(-2, -1)).mul_(keep)                    # (B, nh, T, S)
        # softmax's backward, P * (dP - rowsum(dP * P)), in one pass
        d_scores = torch._softmax_backward_data(d_probs, probs, -1, probs.dtype)
        if need_v:  # after the softmax backward: this drops out of probs in place
            dv = probs.mul_(keep).transpose(-2, -1) @ dy                   # (B, nh, S, hs)
        if need_q:  # not in block 0 under prefix tuning: nothing below it trains
            dq = d_scores @ k * (1.0 / math.sqrt(q.shape[-1]))             # (B, nh, T, hs)
        if need_k:
            dk = d_scores.transpose(-2, -1) @ q                            # (B, nh, S, hs)
        return dq, dk, dv, None, None, None


class Dropout(nn.Dropout):
    """nn.Dropout (Srivastava et al. 2014: zero each element with probability p, scale the
    rest by 1 / (1 - p)) that keeps a 1-byte mask on the CPU.

    torch's CPU dropout draws a float mask with bernoulli_ and keeps it, 4 bytes an element,
    for the backward. Here the mask is `keep_mask` (uniform >= p, 1 byte), and
    `(x * keep) * scale` lets autograd keep only that: a quarter of the memory (GPT-2 small
    at 4 x 256: 56 MiB less over its 25 dropouts), and drawing uniform numbers takes half
    the time of bernoulli_. Same distribution, same output for the same mask. On other
    devices F.dropout is already one fused kernel with a 1-byte mask, so it is used as is.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        keep = keep_mask(x.shape, self.p, x.device)                     # P(keep) = 1 - p
        return torch.mul(x, keep).mul_(1.0 / (1.0 - self.p))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = Dropout(config.resid_pdrop)

    def forward(self, x, mask=None, past=None, use_cache=False):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if past is not None:  # prepend cached or prefix keys/values: (B, nh, P + T, hs)
            k = torch.cat([past[0].to(k.dtype), k], dim=2)
            v = torch.cat([past[1].to(v.dtype), v], dim=2)
        # mask: None means plain causal over T == P + T keys; else bool (B, 1, T, P + T), True = attend
        dropout_p = self.attn_pdrop if self.training else 0.0
        if dropout_p > 0 and x.device.type == "cpu" and torch.is_grad_enabled():
            # SDPA's CPU kernel under dropout is its math one, which keeps (B, nh, T, T)
            # tensors for the backward; see _AttentionDropout.
            if mask is None and past is not None:  # one new token: every key is allowed
                mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device)
            keep = keep_mask((*q.shape[:-1], k.shape[2]), dropout_p, x.device)
            y = _AttentionDropout.apply(q, k, v, mask, keep, dropout_p)   # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(                           # (B, nh, T, hs)
                q, k, v, attn_mask=mask, dropout_p=dropout_p,
                is_causal=mask is None and past is None)  # T == 1: one key, nothing to hide
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y)), ((k, v) if use_cache else None)


class _ActLinear(torch.autograd.Function):
    """`F.linear(act(h), weight, bias)` keeping h, not act(h), for the backward.

    When c_proj's weight trains, its gradient needs its input act(h), and the activation's
    backward needs h: two (B, T, 4C) tensors a layer. This keeps h only and recomputes the
    cheap pointwise act(h) in the backward ("selective activation recomputation",
    Korthikanti et al. 2022, §4.3): 12 MB a layer for GPT-2 small at 4 x 256. The forward
    and setup_context are apart and the backward is plain torch ops (the activation's
    derivative from ACTIVATION_GRADS), so torch.func's grad and vmap (per-example
    gradients) work through it.
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(h, weight, bias, activation: str):  # h (..., 4C), weight (C, 4C)
        return F.linear(ACTIVATIONS[activation](h), weight, bias)        # (..., C)

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
            dw = g2.t() @ a.reshape(-1, a.shape[-1]).to(g.dtype)         # (C, 4C)
        if need_b:
            db = g2.sum(0)                                               # (C,)
        if need_h:
            dh = ACTIVATION_GRADS[ctx.activation]((g @ weight.to(g.dtype)).to(h.dtype), h)
        return dh, dw, db, None


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, inner)
        self.c_proj = nn.Linear(inner, config.n_embd)
        self.activation = config.activation_function
        self.act = ACTIVATIONS[self.activation]
        self.dropout = Dropout(config.resid_pdrop)

    def forward(self, x):
        h = self.c_fc(x)                                                 # (B, T, 4C)
        proj = self.c_proj  # an adapter may wrap it; then it runs as its own module
        if (type(proj) is nn.Linear and proj.weight.requires_grad and torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):  # inductor picks what to recompute itself
            return self.dropout(_ActLinear.apply(h, proj.weight, proj.bias, self.activation))
        return self.dropout(proj(self.act(h)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2 moved LayerNorm to each sub-block's input)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, past=None, use_cache=False):
        a, kv = self.attn(self.ln_1(x), mask, past, use_cache)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, kv


def attention_mask_4d(attention_mask: torch.Tensor, T: int) -> torch.Tensor:
    """(B, P + T) padding mask of 1/0 -> bool (B, 1, T, P + T): causal AND not padding.

    Query i (absolute position P + i) may attend key j when j <= P + i and key j is real.
    A query whose row is all False (a left-padding position) gets zeros from SDPA, as in
    transformers; its logits are meaningless and its labels should be -100.
    """
    S = attention_mask.shape[1]
    q_pos = torch.arange(S - T, S, device=attention_mask.device)[:, None]   # (T, 1)
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]          # (1, S)
    causal = k_pos <= q_pos                                                  # (T, S)
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


class _ChunkedHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of `h @ W^T` against `y`, one chunk of rows at a time.

    The forward also computes both gradients chunk by chunk (the softmax's gradient is
    `softmax - onehot`), so no (N, V) logits are ever kept for the backward: peak extra
    memory is one (chunk, V) block, worked on in place, instead of the full logits and
    their softmax. Same three matmuls as the plain forward + backward, so no extra compute.

    Every chunk's logits go into one buffer whose rows are padded to a multiple of 64
    elements: BLAS writes aligned rows faster (1.25x for GPT-2's V = 50257 on a 2-core CPU,
    `h @ W^T` at 197 instead of 156 GFLOP/s), and one allocation replaces one per chunk.
    The matmuls run in the autocast dtype when autocast is on (bf16 on CUDA), as they would
    outside this op: writing into a buffer (`out=`) is exempt from autocast, so it is explicit.
    """

    @staticmethod
    def forward(ctx, h, weight, y, chunk_size):  # h (N, C), weight (V, C), y (N,)
        need_w = weight.requires_grad
        grad_h = torch.empty_like(h)
        acc = torch.promote_types(h.dtype, torch.float32)  # fp16/bf16 accumulate in fp32
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        total = torch.zeros((), dtype=acc, device=h.device)
        dev = h.device.type
        mm = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        hm, wm = h.to(mm), weight.to(mm)                               # no-ops without autocast
        V = weight.shape[0]
        rows = torch.empty(min(chunk_size, h.shape[0]), -(-V // 64) * 64, dtype=mm,
                           device=h.device)[:, :V]                     # (chunk, V), padded
        for i in range(0, h.shape[0], chunk_size):
            hc, yc = hm[i:i + chunk_size], y[i:i + chunk_size]
            z = torch.mm(hc, wm.t(), out=rows[:len(yc)]).to(acc)       # (n, V) logits
            z_y = z.gather(1, yc[:, None])                             # (n, 1) target logits
            z_max = z.amax(dim=-1, keepdim=True)                       # (n, 1)
            g = z.sub_(z_max).exp_()                                   # exp(z - max), in place
            norm = g.sum(dim=-1, keepdim=True)                         # (n, 1)
            total += (z_max + norm.log() - z_y).sum()                  # logsumexp(z) - z_y
            g.div_(norm)                                               # softmax, in place
            g[torch.arange(len(yc), device=g.device), yc] -= 1.0       # d loss / d logits
            g = g.to(mm)
            if grad_h.dtype == mm:
                torch.mm(g, wm, out=grad_h[i:i + chunk_size])          # (n, C)
            else:
                grad_h[i:i + chunk_size] = g @ wm
            if need_w and g.dtype == acc:
                torch.addmm(grad_w, g.t(), hc, out=grad_w)             # (V, C) +=, no temporary
            elif need_w:
                grad_w += (g.t() @ hc).to(acc)
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
                   chunk_size: int = 256) -> torch.Tensor:
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
        total = _ChunkedHeadLoss.apply(h, weight, y, chunk_size)
    else:  # evaluation: no gradients to precompute
        total = sum(F.cross_entropy(F.linear(h[i:i + chunk_size], weight).to(acc),
                                    y[i:i + chunk_size], reduction="sum")
                    for i in range(0, y.numel(), chunk_size))
    return total / y.numel()


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),   # token embeddings (V, C)
            wpe=nn.Embedding(config.n_positions, config.n_embd),  # position embeddings
            drop=Dropout(config.embd_pdrop),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward to save memory
        self.apply(self._init_weights)
        # GPT-2 §2.3: scale residual projections by 1/sqrt(number of residual layers)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, config.initializer_range / math.sqrt(2 * config.n_layer))
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None,
                position_ids=None, past_key_values: KeyValues | None = None, use_cache=False,
                return_logits=True) -> CausalLMOutput:
        """input_ids (B, T) or inputs_embeds (B, T, C); attention_mask (B, P + T) of 1/0 over
        past and new tokens; labels (B, T), shifted inside, -100 ignored (transformers' rules).

        return_logits=False with labels skips the (B, T, V) logits: the loss then runs the
        LM head only at target positions (what training needs; see masked_lm_loss).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        P = past_key_values[0][0].shape[2] if past_key_values else 0
        if P + T > self.config.n_positions:
            raise ValueError(f"sequence of {P + T} tokens is longer than the model's context "
                             f"n_positions={self.config.n_positions}; truncate the input")
        if position_ids is None:  # as transformers: positions continue after the past, padding or not
            position_ids = torch.arange(P, P + T, device=x.device)[None]
        x = self.transformer.drop(x + self.transformer.wpe(position_ids))

        mask = None
        if attention_mask is not None:
            if attention_mask.shape != (B, P + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                                 f"expected (batch, past + new tokens) = ({B}, {P + T})")
            if not bool(attention_mask.bool().all()):
                mask = attention_mask_4d(attention_mask, T)
        if mask is None and P > 0 and T > 1:  # causal with an offset: SDPA's is_causal can't say it
            mask = attention_mask_4d(torch.ones(B, P + T, dtype=torch.bool, device=x.device), T)

        presents = [] if use_cache else None
        for i, block in enumerate(self.transformer.h):
            past = past_key_values[i] if past_key_values else None
            if self.gradient_checkpointing and self.training and not use_cache:
                x, kv = checkpoint(block, x, mask, past, False, use_reentrant=False)
            else:
                x, kv = block(x, mask, past, use_cache)
            if use_cache:
                presents.append(kv)
        x = self.transformer.ln_f(x)

        if labels is not None and not return_logits:
            return CausalLMOutput(masked_lm_loss(x, self.lm_head.weight, labels), None, presents)
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        return CausalLMOutput(loss, logits, presents)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids, **kwargs):
        """Continue each prompt; returns (B, T + new) ids, prompt included, as transformers.
        The keyword arguments (max_new_tokens, do_sample, temperature, top_k, top_p,
        eos_token_id, attention_mask, pad_token_id, use_cache, generator, seed) and their
        defaults are generation.generate's, written there once.

        Batched prompts must be left-padded with `attention_mask` marking real tokens. After a
        row emits `eos_token_id` it is filled with `pad_token_id` (default: eos) until every
        row is done. Sampling draws from `generator` (or one seeded with `seed`).
        """
        return generate(self, input_ids, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, src, dtype: torch.dtype | None = None, device=None) -> GPT:
        """Load a Hugging Face GPT-2 folder, a cached hub id, or "minift-tiny"."""
        from .checkpoint import load_pretrained
        return load_pretrained(src, dtype=dtype, device=device)

    def save_pretrained(self, folder) -> None:
        """Write config.json + model.safetensors in the layout transformers loads."""
        from .checkpoint import save_pretrained
        save_pretrained(self, folder)


def compile_blocks(model: nn.Module, dynamic: bool = True, **compile_kwargs) -> nn.Module:
    """Compile every transformer Block inside `model` (a GPT, or a PEFT wrapper around one)
    in place with torch.compile, and return `model`. Nothing else changes: the embeddings
    and the chunked loss stay eager (the loss loops over chunks, which would only unroll).

    One compilation serves all blocks: they run the same `Block.forward` on same-shaped
    weights, and dynamo passes a module's parameters to the graph as inputs rather than
    baking them in as constants, so block 0's compiled code passes the guards of blocks
    1..n-1. (When nothing below block 0 trains, as with LoRA, its input needs no gradient
    while the others' do: the guards tell the two apart, so there are two compilations,
    block 0's and one shared by all the rest.) `dynamic=True` makes the sequence length
    (and the batch size) symbolic, so a batch of a new length reuses that code instead of
    recompiling; only sizes 0 and 1 are specialised by torch (e.g. one-token decoding
    compiles its own graph). LoRA and adapter layers inside a block are compiled with it
    (LoRA's op is one autograd.Function with no graph break), prefix key/values and
    padding masks get their own graph, and `model.gradient_checkpointing` recomputes a
    block by calling the compiled code again. On CPU inductor emits C++ (a C++ compiler
    is needed); on CUDA, Triton.

    On the CPU, inductor is told to draw dropout masks with torch's own generator
    (`fallback_random`): its C++ random numbers took 0.33 s of a 3.3 s GPT-2 small LoRA
    step, torch's 0.13 s, and the compiled blocks then draw the very masks eager ones do.
    An explicit `options=` or `mode=` from the caller is passed through untouched.
    """
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"compile_blocks: no transformer Block found in {type(model).__name__}")
    on_cpu = all(p.device.type == "cpu" for p in blocks[0].parameters())
    if (on_cpu and compile_kwargs.get("backend", "inductor") == "inductor"
            and compile_kwargs.get("options") is None and compile_kwargs.get("mode") is None):
        compile_kwargs["options"] = {"fallback_random": True}
    for block in blocks:
        block.compile(dynamic=dynamic, **compile_kwargs)
    return model


def filter_logits(logits: torch.Tensor, temperature=1.0, top_k=None, top_p=None) -> torch.Tensor:
    """(B, V) logits -> logits with the excluded tokens set to -inf, ready for softmax.

    top_k keeps the k largest; top_p keeps the smallest set of most likely tokens whose
    probability reaches top_p (nucleus sampling, Holtzman et al. 2020 §3.1), at least one.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs      # mass of the strictly more likely tokens
        drop_sorted = mass_before >= top_p          # the top token always has 0 before it
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
