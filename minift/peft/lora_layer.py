"""The LoRA layer and the GPT with LoRA layers swapped in (Hu et al. 2021 §4.1; DoRA, Liu et
al. 2024, in dora.py).

Injection swaps each targeted nn.Linear child for a `LoraLinear` that holds it as
`base_layer`. Parameter names are PEFT's without the adapter name: `...c_attn.lora_A.weight`,
`...c_attn.lora_magnitude_vector` for DoRA. PEFT wraps GPT-2's Conv1D with fan_in_fan_out=True
but still stores lora_A as (r, in) and lora_B as (out, r), exactly these nn.Linear shapes, so
files need no transposition.

Several adapters (PEFT's `load_adapter` / `set_adapter`): the first adapter a layer gets sits
under the plain names above; further ones sit in `layer.lora_adapters[name]` with the same
parts. Exactly one adapter is active; `disabled` turns every adapter off (the base model).
Files never see this: each adapter is saved under PEFT's plain key names.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import PeftError, find_targets, swap_module
from .dora import dora_linear, weight_norm
from .lora import LoraConfig, lora_linear, lora_scaling
from .merge import merge_lora, merged_weight


class LoraParts(nn.Module):
    """One adapter's parts on one layer: lora_A (r, in), lora_B (out, r), the dropout on the
    LoRA input, the scaling s, and for DoRA the magnitude m (out,). The base layer is not
    held here (it is shared by every adapter of the layer)."""

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout=0.0,
                 use_rslora=False, init_lora_weights=True, use_dora=False):
        super().__init__()
        if r <= 0:
            raise PeftError(f"LoRA rank r must be positive, got {r}")
        w = base_layer.weight
        # float32 adapters over a float16/bfloat16 base (as PEFT): updated at full precision
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=w.device, dtype=dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=w.device, dtype=dtype)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        if init_lora_weights is True:      # Hu et al. §4.1; B = 0 makes B A = 0 at the start
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        elif init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / r)
            nn.init.zeros_(self.lora_B.weight)
        # DoRA §4.1: m starts at ||W + s B A||_c, so the layer starts as plain LoRA
        magnitude = (nn.Parameter(weight_norm(w, self.lora_A.weight, self.lora_B.weight,
                                              self.scaling)) if use_dora else None)
        self.lora_magnitude_vector = magnitude

    def tensors(self) -> dict[str, torch.Tensor]:
        """The parts under PEFT's key suffixes (no adapter name), as saved."""
        out = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        if self.lora_magnitude_vector is not None:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector
        return out


class LoraLinear(LoraParts):
    """`base_layer(x) + scaling * lora_B(lora_A(dropout(x)))` with `base_layer` frozen (DoRA's
    form when the active adapter has a magnitude vector).

    The output keeps the base layer's dtype. The forward is one LoraLinearFunction (plus the
    per-feature DoRA scale); after an explicit merge() it is the base layer's single matmul
    (the path for evaluation and generation once training is done).
    """

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout=0.0,
                 use_rslora=False, init_lora_weights=True, use_dora=False,
                 adapter_name: str = "default"):
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                         use_dora)
        self.base_layer = base_layer
        self.adapter_name = adapter_name      # the adapter under the plain names
        self.active_adapter = adapter_name
        self.lora_adapters = nn.ModuleDict()  # further adapters: name -> LoraParts
        self.disabled = False                 # True: the base layer alone (disable_adapter)
        self.merged = False
        # While merged: the base weight as it was, so unmerge() restores it bit for bit
        # (subtracting B A again would leave rounding errors). Not saved; moves with .to().
        self.register_buffer("unmerged_weight", None, persistent=False)

    def parts(self, name: str | None = None) -> LoraParts | None:
        """The adapter `name` (default: the active one) on this layer, or None if it has none."""
        name = self.active_adapter if name is None else name
        if name == self.adapter_name:
            return self
        return self.lora_adapters[name] if name in self.lora_adapters else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = None if (self.merged or self.disabled) else self.parts()
        if parts is None:                              # merged, disabled, or no adapter here
            return self.base_layer(x)                  # (..., out)
        drop = parts.lora_dropout
        p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
        w, b, A, B = (self.base_layer.weight, self.base_layer.bias, parts.lora_A.weight,
                      parts.lora_B.weight)
        if parts.lora_magnitude_vector is None:        # (..., out)
            return lora_linear(x, w, b, A, B, parts.scaling, p)
        return dora_linear(x, w, b, A, B, parts.lora_magnitude_vector, parts.scaling, p)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, (out, in), of the active adapter (LoRA's merge adds it to W)."""
        parts = self.parts()
        return (parts.lora_B.weight @ parts.lora_A.weight) * parts.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W <- the active adapter folded in (merge.merged_weight), keeping the old W for
        unmerge(). A no-op when merged or when the active adapter is not on this layer."""
        parts = self.parts()
        if self.merged or parts is None:
            return
        w = self.base_layer.weight
        self.unmerged_weight = w.detach().clone()
        w.copy_(merged_weight(w, parts.lora_A.weight, parts.lora_B.weight, parts.scaling,
                              parts.lora_magnitude_vector))
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
        return (f"adapter={self.adapter_name!r}, r={self.lora_A.out_features}, "
                f"scaling={self.scaling:g}, dora={self.lora_magnitude_vector is not None}, "
                f"merged={self.merged}")


def _layer_kwargs(config: LoraConfig) -> dict:
    return dict(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights,
                use_dora=config.use_dora)


class LoraModel(nn.Module):
    """The GPT with LoraLinear layers swapped in, kept as `self.model` (PEFT's LoraModel), so
    parameter names read `base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`.
    `peft_config` maps adapter names to their configs; `active_adapter` names the one used."""

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default"):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter = adapter_name
        self.add_adapter(adapter_name, config)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def config(self) -> LoraConfig:
        return self.peft_config[self.active_adapter]

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        """Add the adapter `name` on the modules `config` targets (a layer that already holds
        adapters gets one more). Everything is checked before the model is changed."""
        if name in self.peft_config:
            raise PeftError(f"an adapter named {name!r} already exists")
        targets = find_targets(self.model, config, holders=(LoraLinear,))
        for target in targets:
            module = self.model.get_submodule(target)
            if isinstance(module, LoraLinear):
                module.lora_adapters[name] = LoraParts(module.base_layer, **_layer_kwargs(config))
            else:
                layer = LoraLinear(module, **_layer_kwargs(config), adapter_name=name)
                layer.active_adapter = self.active_adapter  # a new adapter is not made active
                swap_module(self.model, target, layer)
        self.peft_config[name] = config

    def remove_adapter(self, name: str) -> None:
        """Take out an adapter just added (load_adapter's way back when its file does not fit)."""
        for layer_name, layer in self.lora_layers().items():
            if name in layer.lora_adapters:
                del layer.lora_adapters[name]
            elif layer.adapter_name == name:
                if layer.lora_adapters:
                    raise PeftError(f"adapter {name!r} shares {layer_name} with others; "
                                    "it cannot be removed")
                swap_module(self.model, layer_name, layer.base_layer)
        del self.peft_config[name]

    def set_adapter(self, name: str) -> None:
        if name not in self.peft_config:
            raise PeftError(f"no adapter named {name!r}; this model has {sorted(self.peft_config)}")
        if any(layer.merged for layer in self.lora_layers().values()):
            raise PeftError("unmerge() before switching adapters: the merged weights hold "
                            f"{self.active_adapter!r}")
        for layer in self.lora_layers().values():
            layer.active_adapter = name
        self.active_adapter = name

    def set_disabled(self, disabled: bool) -> None:
        for layer in self.lora_layers().values():
            layer.disabled = disabled

    def adapter_tensors(self, name: str | None = None) -> dict[str, torch.Tensor]:
        """The live parameters of adapter `name` (default: the active one) under PEFT's keys
        without the "base_model.model." prefix: what its adapter_model.safetensors holds."""
        out = {}
        for layer_name, layer in self.lora_layers().items():
            parts = layer.parts(self.active_adapter if name is None else name)
            if parts is not None:
                out.update({f"{layer_name}.{k}": v for k, v in parts.tensors().items()})
        return out

    def lora_layers(self) -> dict[str, LoraLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, LoraLinear)}

    def check_mergeable(self) -> None:
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        if tied and "lm_head" in self.lora_layers():
            raise PeftError("cannot merge LoRA on 'lm_head': its weight is tied to "
                            "transformer.wte, so merging would change the input embeddings too")

    def merge(self) -> None:
        self.check_mergeable()
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

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """The plain GPT with the active adapter folded in, computed by the pure merge_lora
        over the base weights plus the active adapter's tensors under the plain names."""
        self.check_mergeable()
        self.unmerge()
        state = {k: v for k, v in self.model.state_dict().items() if ".lora_" not in k}
        state.update(self.adapter_tensors())
        merged = merge_lora(state, self.config)
        model = self.unload()
        model.load_state_dict(merged)
        return model
