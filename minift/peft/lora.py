"""LoRA: low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen linear layer W (out, in) gets a trainable low-rank update (§4.1):

    h = W x + (alpha / r) * B A x,        A (r, in), B (out, r), r << min(in, out)

A starts Kaiming-uniform (nn.Linear's own init, as in loralib and PEFT) and B at zero, so
training starts exactly at the pretrained function. rsLoRA (Kalajdzievski 2023, "A Rank
Stabilization Scaling Factor for Fine-Tuning with LoRA") scales by alpha / sqrt(r) instead,
so the update does not vanish as r grows.

Injection swaps each targeted nn.Linear child for a `LoraLinear` that holds it as
`base_layer`. Parameter names are PEFT's without the adapter name: `...c_attn.lora_A.weight`.
PEFT wraps GPT-2's Conv1D with fan_in_fan_out=True but still stores lora_A as (r, in) and
lora_B as (out, r), exactly these nn.Linear shapes, so files need no transposition.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import keep_mask
from .config import PeftError, check_task_type, find_targets, swap_module


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
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinearFunction(torch.autograd.Function):
    """The LoRA hot path as one op (Hu et al. 2021, §4.1, with dropout on the LoRA input):

        u = (x * keep) A^T / (1 - p)            (..., r)    keep: 0/1 dropout mask or None
        y = x W^T + b + s u B^T                 (..., out)  s = scaling

    Saved for the backward: x, the 1-byte mask (bool, or int8 when compiled: see
    `minift.model.keep_mask`) and the thin u, plus references to W, A, B.
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
    otherwise), as LoraLinear always did. The forward returns u too (not differentiable), so
    that setup_context, apart from the forward as torch.func asks, can keep it: `grad` and
    `vmap` (per-example gradients) work through the op. `lora_linear` returns y alone.
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, scaling: float, keep, keep_scale: float):
        # x (..., in); weight (out, in); bias (out,) or None; lora_A (r, in); lora_B (out, r)
        base = F.linear(x, weight, bias)                                  # (..., out)
        xa = x.to(lora_A.dtype)
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

    @staticmethod
    def backward(ctx, g, _):                                              # _: u's, always None
        x, keep, u, weight, lora_A, lora_B = ctx.saved_tensors
        s, q = ctx.scaling, ctx.keep_scale
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        g = g.reshape(-1, g.shape[-1])                                    # (N, out)
        x2 = x.reshape(-1, x.shape[-1])                                   # (N, in)
        keep2 = None if keep is None else keep.reshape(-1, keep.shape[-1])
        ga = g.to(lora_B.dtype)
        # The two thin products with g are computed transposed, (r, N) and (r, out): BLAS
        # is 3-6x slower on (N, out) @ (out, r) with r tiny than on (r, out) @ (out, N).
        du = (lora_B.t() @ ga.t()).t() * s                                # (N, r)
        dx = dw = db = dA = dB = None
        if need_x:
            back = (du * q) @ lora_A                                      # (N, in)
            if keep2 is not None:
                back = back.mul_(keep2)
            dx = (g @ weight.to(g.dtype) + back.to(g.dtype)).reshape(x.shape).to(x.dtype)
        if need_A:
            xa = x2.to(lora_A.dtype)
            xd = xa if keep2 is None else xa * keep2
            dA = (du.t() @ xd) * q                                        # (r, in)
        if need_B:
            dB = (u.reshape(-1, u.shape[-1]).to(ga.dtype).t() @ ga).t() * s  # (out, r)
        if need_w:  # only when the base weight was unfrozen on purpose
            dw = (g.t() @ x2.to(g.dtype)).to(weight.dtype)                # (out, in)
        if need_b:
            db = g.sum(0).to(weight.dtype)                                # (out,)
        return dx, dw, db, dA, dB, None, None, None


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


class LoraLinear(nn.Module):
    """`base_layer(x) + scaling * lora_B(lora_A(dropout(x)))` with `base_layer` frozen.

    Adapter weights live in float32 when the base is float16/bfloat16 (as PEFT), so the
    optimizer updates them at full precision; the output keeps the base layer's dtype.
    The forward is one LoraLinearFunction; after an explicit merge() it is the base layer's
    single matmul (the path for evaluation and generation once training is done).
    """

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout=0.0,
                 use_rslora=False, init_lora_weights=True):
        super().__init__()
        if r <= 0:
            raise PeftError(f"LoRA rank r must be positive, got {r}")
        w = base_layer.weight
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        self.base_layer = base_layer
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=w.device, dtype=dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=w.device, dtype=dtype)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.merged = False
        # While merged: the base weight as it was, so unmerge() restores it bit for bit
        # (subtracting B A again would leave rounding errors). Not saved; moves with .to().
        self.register_buffer("unmerged_weight", None, persistent=False)
        if init_lora_weights is True:      # Hu et al. §4.1; B = 0 makes B A = 0 at the start
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        elif init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / r)
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:                                # B A already folded into W: one matmul
            return self.base_layer(x)                  # (..., out)
        drop = self.lora_dropout
        p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
        return lora_linear(x, self.base_layer.weight, self.base_layer.bias,  # (..., out)
                           self.lora_A.weight, self.lora_B.weight, self.scaling, p)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, (out, in): what merging adds to base_layer.weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scaling * B A, keeping the old W for unmerge(). A no-op when merged."""
        if self.merged:
            return
        w = self.base_layer.weight
        self.unmerged_weight = w.detach().clone()
        w.add_(self.delta_weight().to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base weight saved by merge(). A no-op when not merged."""
        if not self.merged:
            return
        self.base_layer.weight.copy_(self.unmerged_weight)
        self.unmerged_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.lora_A.out_features}, scaling={self.scaling:g}, merged={self.merged}"


class LoraModel(nn.Module):
    """The GPT with LoraLinear layers swapped in, kept as `self.model` (PEFT's LoraModel), so
    parameter names read `base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`."""

    def __init__(self, model: nn.Module, config: LoraConfig):
        super().__init__()
        self.targets = find_targets(model, config)  # raises before anything is changed
        for name in self.targets:
            swap_module(model, name, LoraLinear(
                model.get_submodule(name), config.r, config.lora_alpha, config.lora_dropout,
                config.use_rslora, config.init_lora_weights))
        self.model = model
        self.config = config

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @staticmethod
    def is_adapter_parameter(name: str) -> bool:
        return ".lora_A." in name or ".lora_B." in name

    def lora_layers(self) -> dict[str, LoraLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, LoraLinear)}

    def merge(self) -> None:
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        if tied and "lm_head" in self.lora_layers():
            raise PeftError("cannot merge LoRA on 'lm_head': its weight is tied to "
                            "transformer.wte, so merging would change the input embeddings too")
        for layer in self.lora_layers().values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.lora_layers().values():
            layer.unmerge()

    def unload(self) -> nn.Module:
        """Swap every LoraLinear back for its base_layer (merged or not); return the GPT."""
        for name, layer in self.lora_layers().items():
            layer.unmerged_weight = None
            swap_module(self.model, name, layer.base_layer)
        return self.model

    def merge_and_unload(self) -> nn.Module:
        self.merge()
        return self.unload()
