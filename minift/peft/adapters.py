"""Houlsby bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning
for NLP", §2.1).

Twice per block, after the attention output projection and after the MLP, a small
bottleneck with its own skip connection is applied to the sub-layer's output, before the
block's residual addition:

    adapter(h) = h + up(act(down(h))),    down: d -> m, up: m -> d,    2md + d + m parameters

Near-zero weights make each adapter a near-identity at the start (§2.1; N(0, 1e-2) truncated
at two standard deviations, §3.6). The LayerNorms are trained as well, as in the paper.

Injection: attn.c_proj / mlp.c_proj become `LinearWithAdapter(base_layer, adapter)` whose
output is adapter(c_proj(x)), an explicit child-module swap. Dropout placement: GPT-2 applies
its residual dropout to that output, so here it is dropout(adapter(c_proj(x))), whereas
Houlsby's BERT code applies adapter(dropout(proj(x))). The two are identical in eval mode;
in training the dropout mask here also covers the adapter's contribution.

Adapter weights take the base model's dtype, like the LayerNorms trained with them.

This is not a PEFT method: files use PEFT's two-file layout with peft_type "HOULSBY_ADAPTER",
loadable by minift only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from ..ops import ACTIVATIONS
from .config import PeftError, check_task_type, find_targets, swap_module


@dataclass
class AdapterConfig:
    task_type: str | None = "CAUSAL_LM"   # PEFT's field; causal LM is all minift does
    inference_mode: bool = False          # True: the adapter is frozen too (saved files say True)
    base_model_name_or_path: str | None = None  # recorded in adapter_config.json, never opened
    bottleneck_size: int = 64             # m: each adapter adds 2 m d + d + m parameters
    non_linearity: str = "gelu"           # between down and up: one of model.ACTIVATIONS
    # after the attention output and after the MLP (§2.1); names matched as LoraConfig's
    target_modules: list[str] | str = field(default_factory=lambda: ["attn.c_proj", "mlp.c_proj"])
    layers_to_transform: list[int] | int | None = None  # only these blocks (None: every block)
    layers_pattern: list[str] | str | None = None
    init_std: float = 1e-2                # N(0, init_std) truncated at +-2 std (§3.6)
    init_up_zero: bool = False            # True: up = 0, so the model starts exactly at the base
    train_layer_norms: bool = True        # "we also train new layer normalization parameters" §2.1
    peft_type: ClassVar[str] = "HOULSBY_ADAPTER"

    def __post_init__(self):
        check_task_type(self.task_type)
        self.task_type = "CAUSAL_LM"
        if not isinstance(self.bottleneck_size, int) or self.bottleneck_size <= 0:
            raise PeftError(f"bottleneck_size must be a positive integer, "
                            f"got {self.bottleneck_size!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise PeftError(f"non_linearity={self.non_linearity!r}; choose one of "
                            f"{sorted(ACTIVATIONS)}")
        if self.init_std < 0:
            raise PeftError(f"init_std must be >= 0, got {self.init_std}")
        if not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)

    def extra_json(self) -> dict:
        return {}


class BottleneckAdapter(nn.Module):
    """h + up(act(down(h))): (B, T, d) -> (B, T, m) -> (B, T, d), with an inner skip."""

    def __init__(self, d: int, m: int, non_linearity="gelu", init_std=1e-2, init_up_zero=False,
                 device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(d, m, device=device, dtype=dtype)
        self.up = nn.Linear(m, d, device=device, dtype=dtype)
        self.non_linearity = non_linearity
        for layer in (self.down, self.up):
            if init_std > 0:
                nn.init.trunc_normal_(layer.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
            else:
                nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if init_up_zero:
            nn.init.zeros_(self.up.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(ACTIVATIONS[self.non_linearity](self.down(h)))


class LinearWithAdapter(nn.Module):
    """adapter(base_layer(x)): the sub-layer's output projection followed by its adapter."""

    def __init__(self, base_layer: nn.Linear, adapter: BottleneckAdapter):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.disabled = False  # True: the base layer alone (PeftModel.disable_adapter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        return h if self.disabled else self.adapter(h)


def is_layer_norm_parameter(name: str) -> bool:
    return any(f"{ln}." in name for ln in ("ln_1", "ln_2", "ln_f"))


class AdapterModel(nn.Module):
    """The GPT with adapters swapped in, kept as `self.model` (as LoraModel)."""

    def __init__(self, model: nn.Module, config: AdapterConfig):
        super().__init__()
        self.targets = find_targets(model, config)  # raises before anything is changed
        for name in self.targets:
            base = model.get_submodule(name)
            w = base.weight
            adapter = BottleneckAdapter(base.out_features, config.bottleneck_size,
                                        config.non_linearity, config.init_std, config.init_up_zero,
                                        device=w.device, dtype=w.dtype)
            swap_module(model, name, LinearWithAdapter(base, adapter))
        self.model = model
        self.config = config

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def is_adapter_parameter(self, name: str) -> bool:
        """Trained and saved: the adapters, and the LayerNorms when train_layer_norms."""
        if ".adapter." in name:
            return True
        return self.config.train_layer_norms and is_layer_norm_parameter(name)

    def unload(self) -> nn.Module:
        """Swap every LinearWithAdapter back for its base_layer; return the GPT. LayerNorms
        trained with the adapter keep their trained values (they are the model's own)."""
        for name, m in list(self.model.named_modules()):
            if isinstance(m, LinearWithAdapter):
                swap_module(self.model, name, m.base_layer)
        return self.model
