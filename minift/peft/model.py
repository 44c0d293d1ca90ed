"""PeftModel: a GPT plus its adapter (LoRA: several, one active), with PEFT's API and files.

Layout, as PEFT users type it:
  LoRA / Houlsby   peft_model.base_model is a LoraModel / AdapterModel and
                   peft_model.base_model.model is the GPT with the adapter layers swapped in
                   (peft_model.base_model.model.transformer.h[0].attn.c_attn.lora_A)
  prompt methods   peft_model.base_model is the GPT itself, untouched, and
                   peft_model.prompt_encoder the trainable module
`peft_model.get_base_model()` is the GPT in every case; `peft_model.config` its GPTConfig.

Virtual tokens (prompt tuning, P-tuning) are prepended to the input embeddings; like PEFT,
minift extends `attention_mask` with ones, `labels` with -100, and returns logits for the
virtual positions too: (B, n + T, V). Prefix tuning passes its keys/values as
`past_key_values` (mask extended, logits (B, T, V)). Given `position_ids` are shifted by n
(PEFT does so for prefix tuning but drops them for prompt tuning; minift keeps them, so a
left-padded row decodes like an unpadded one). Passing `past_key_values` means "continue a
cache returned by this model": it already starts with the virtual tokens, so nothing is
prepended again; that is how `generate` reuses the KV cache.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn

from ..io import save_safetensors, write_json
from ..generation import generate
from ..model import GPT, CausalLMOutput
from .adapters import AdapterConfig, AdapterModel, LinearWithAdapter
from .config import PeftError, config_to_dict
from .files import (CONFIG_NAME, CONFIGS, WEIGHTS_NAME, adapter_folder, load_adapter_config,
                    load_adapter_tensors)
from .lora import LoraConfig
from .lora_layer import LoraModel
from .merge import combine, combined_config
from .prompts import (PROMPT_CONFIGS, PrefixTuningConfig, PromptEmbedding, build_prompt_encoder,
                      fit_to_model, prefix_key_values)

PREFIX = "base_model.model."  # PEFT's key prefix for LoRA-style adapter tensors


class PeftModel(nn.Module):
    def __init__(self, model: nn.Module, peft_config, adapter_name: str = "default"):
        """Freeze `model`, add the adapter `peft_config` describes under `adapter_name`, make
        only it trainable (nothing when config.inference_mode). `model` is changed in place,
        as in PEFT. LoRA models take further adapters: load_adapter, add_weighted_adapter."""
        super().__init__()
        if not isinstance(peft_config, tuple(CONFIGS.values())):
            names, kind = ", ".join(c.__name__ for c in CONFIGS.values()), type(peft_config)
            raise PeftError(f"expected a minift.peft config ({names}), got "
                            f"{kind.__module__}.{kind.__name__}")
        # Every check (targets exist, shapes fit) runs before the model is touched.
        if isinstance(peft_config, PROMPT_CONFIGS):
            peft_config = fit_to_model(peft_config, model.config)
        if isinstance(peft_config, LoraConfig):
            self.base_model = LoraModel(model, peft_config, adapter_name)
        elif isinstance(peft_config, AdapterConfig):
            self.base_model = AdapterModel(model, peft_config)
        else:
            self.base_model = model
            self.prompt_encoder = build_prompt_encoder(peft_config, model)
        # name -> config; LoRA keeps several (the LoraModel's own dict), other methods one
        self.peft_configs = (self.base_model.peft_config if self.is_lora
                             else {adapter_name: peft_config})
        self._active = adapter_name
        self._disabled = False
        self.set_adapter_trainable(not peft_config.inference_mode)  # freezes the base model

    # ------------------------------------------------------------------ structure
    @property
    def active_adapter(self) -> str:
        return self._active

    @property
    def peft_config(self):
        """The active adapter's config (PEFT keeps a dict of them: here `peft_configs`)."""
        return self.peft_configs[self._active]

    @property
    def is_lora(self) -> bool:
        return isinstance(self.base_model, LoraModel)

    @property
    def is_prompt_learning(self) -> bool:
        return isinstance(self.peft_config, PROMPT_CONFIGS)

    def get_base_model(self) -> nn.Module:
        return self.base_model if self.is_prompt_learning else self.base_model.model

    @property
    def config(self):
        return self.get_base_model().config

    @property
    def device(self) -> torch.device:
        return self.get_base_model().device

    def adapter_parameters(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The parameters of adapter `adapter_name` (default: the active one), trained and
        saved, by their names in this PeftModel."""
        if self.is_lora:
            name = adapter_name or self._active
            ids = {id(p) for p in self.base_model.adapter_tensors(name).values()}
            return {n: p for n, p in self.named_parameters() if id(p) in ids}
        if self.is_prompt_learning:
            return {n: p for n, p in self.named_parameters() if n.startswith("prompt_encoder.")}
        return {n: p for n, p in self.named_parameters() if n.startswith(PREFIX)
                and self.base_model.is_adapter_parameter(n[len(PREFIX):])}

    def set_adapter_trainable(self, trainable: bool = True) -> None:
        """Only the active adapter trains (when `trainable`); the rest is frozen."""
        active = {id(p) for p in self.adapter_parameters().values()}
        for p in self.parameters():
            p.requires_grad_(trainable and id(p) in active)

    num_parameters = GPT.num_parameters   # the one count (tied lm_head / wte once, as PEFT)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return self.num_parameters(trainable_only=True), self.num_parameters()

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ forward and generate
    def get_prompt(self, batch_size: int):
        """The virtual tokens: input embeddings (B, n, C), or prefix keys/values per layer."""
        values = self.prompt_encoder()                      # (n, C) or (n, L * 2 * C)
        dtype = self.get_base_model().transformer.wte.weight.dtype
        values = values.to(dtype)
        if isinstance(self.peft_config, PrefixTuningConfig):
            return prefix_key_values(values, batch_size, self.config.n_layer, self.config.n_head)
        return values[None].expand(batch_size, -1, -1)      # (B, n, C)

    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None,
                position_ids=None, past_key_values=None, use_cache=False,
                return_logits=None, segment_ids=None) -> CausalLMOutput:
        """GPT's forward with the adapter active; see the module docstring for virtual tokens."""
        model = self.get_base_model()
        if not self.is_prompt_learning or self._disabled:  # (disabled: no virtual tokens)
            return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                         inputs_embeds=inputs_embeds, position_ids=position_ids,
                         past_key_values=past_key_values, use_cache=use_cache,
                         return_logits=return_logits, segment_ids=segment_ids)
        if segment_ids is not None:  # virtual tokens would lead only the row's first example
            raise ValueError(f"{self.peft_config.peft_type}: packed rows (segment_ids) are not "
                             "supported with virtual tokens; train without packing")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        ref = input_ids if input_ids is not None else inputs_embeds
        B, n, device = ref.shape[0], self.peft_config.num_virtual_tokens, ref.device
        if attention_mask is not None:  # the caller's mask never covers the n virtual tokens
            ones = torch.ones(B, n, dtype=attention_mask.dtype, device=device)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        if position_ids is not None:
            position_ids = position_ids + n
        if past_key_values is None and isinstance(self.peft_config, PrefixTuningConfig):
            past_key_values = self.get_prompt(B)            # L pairs of (B, nh, n, hs)
        elif past_key_values is None:                       # prepend n input embeddings
            if inputs_embeds is None:
                inputs_embeds = model.transformer.wte(input_ids)
            inputs_embeds = torch.cat([self.get_prompt(B).to(inputs_embeds.dtype), inputs_embeds], 1)
            input_ids = None
            if labels is not None:                          # virtual tokens are never targets
                labels = torch.cat([torch.full((B, n), -100, dtype=labels.dtype,
                                               device=labels.device), labels], dim=1)
            if position_ids is not None:
                virtual = torch.arange(n, device=device).expand(position_ids.shape[0], n)
                position_ids = torch.cat([virtual, position_ids], dim=1)
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                     inputs_embeds=inputs_embeds, position_ids=position_ids,
                     past_key_values=past_key_values, use_cache=use_cache,
                     return_logits=return_logits)

    @torch.no_grad()
    def generate(self, input_ids, **kwargs):
        """GPT.generate with the adapter active (generation.generate's keyword arguments):
        returns (B, T + new) ids, prompt included and virtual tokens not."""
        return generate(self, input_ids, **kwargs)

    # ------------------------------------------------------------------ LoRA merging
    def _lora(self, what="merged into the base weights") -> LoraModel:
        if not self.is_lora:
            raise PeftError(f"{self.peft_config.peft_type} cannot be {what} (adapters are "
                            "non-linear, prompts add tokens); only LoRA can")
        return self.base_model

    def merge(self) -> None:
        """Fold the active adapter into the base weights (an explicit call, never a side effect)."""
        self._lora().merge()

    def unmerge(self) -> None:
        """Restore the base weights exactly (merge keeps a copy of them)."""
        self._lora().unmerge()

    def merge_and_unload(self) -> nn.Module:
        """The plain GPT with the active adapter merged into its weights (merge.merge_lora);
        this PeftModel is spent."""
        return self._lora().merge_and_unload()

    def unload(self) -> nn.Module:
        """The GPT without the adapter layers (not merged); this PeftModel is spent."""
        return self.base_model if self.is_prompt_learning else self.base_model.unload()

    # ------------------------------------------------------------------ several adapters
    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make `adapter_name` the active adapter. As PEFT's set_adapter: it trains unless
        `inference_mode` (even an adapter loaded with is_trainable=False: switching to it is
        asking for it), and every other parameter is frozen."""
        self._lora("switched between adapters").set_adapter(adapter_name)
        self._active = adapter_name
        self.peft_config.inference_mode = inference_mode
        self.set_adapter_trainable(not inference_mode)

    @contextlib.contextmanager
    def disable_adapter(self):
        """`with peft_model.disable_adapter(): ...` runs the base model alone (every method;
        for Houlsby adapters the LayerNorms keep their trained values)."""
        if self.is_lora and any(m.merged for m in self.base_model.lora_layers().values()):
            raise PeftError("disable_adapter: the adapter is merged into the base weights; "
                            "unmerge() first")
        self._set_disabled(True)
        try:
            yield
        finally:
            self._set_disabled(False)

    def _set_disabled(self, disabled: bool) -> None:
        self._disabled = disabled
        if self.is_lora:
            self.base_model.set_disabled(disabled)
        elif not self.is_prompt_learning:
            for m in self.base_model.modules():
                if isinstance(m, LinearWithAdapter):
                    m.disabled = disabled

    def load_adapter(self, model_id, adapter_name: str, is_trainable: bool = False,
                     subfolder: str | None = None) -> None:
        """Add the LoRA adapter saved in `model_id` under `adapter_name` (not made active:
        set_adapter does that; it trains from now on only with is_trainable=True). On any
        error the model is left as it was."""
        lora = self._lora("given a second adapter")
        if adapter_name in self.peft_configs:
            raise PeftError(f"an adapter named {adapter_name!r} is already loaded")
        folder = adapter_folder(model_id, subfolder)
        config, tensors = load_adapter_config(folder), load_adapter_tensors(folder)
        if not isinstance(config, LoraConfig):
            raise PeftError(f"{folder / CONFIG_NAME}: a {config.peft_type} adapter; only LoRA "
                            "adapters can share a model")
        config.inference_mode = not is_trainable
        flags = [(p, p.requires_grad) for p in self.parameters()]
        try:
            lora.add_adapter(adapter_name, config)
        except PeftError as e:
            raise PeftError(f"{folder / CONFIG_NAME}: {e}") from None
        try:
            self.load_adapter_state_dict(tensors, str(folder / WEIGHTS_NAME), adapter_name)
        except Exception:
            lora.remove_adapter(adapter_name)
            raise
        for p, flag in flags:
            p.requires_grad_(flag)
        if not is_trainable:   # as PEFT: frozen until set_adapter switches to it
            for p in self.adapter_parameters(adapter_name).values():
                p.requires_grad_(False)

    @torch.no_grad()
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", density: float | None = None,
                             majority_sign_method: str = "total") -> None:
        """A new LoRA adapter from weighted existing ones, with PEFT's semantics and formulas
        (merge.py): "linear", "cat", "ties" (needs `density`) or "svd". The new adapter is
        frozen and not made active. Nothing happens if `adapter_name` exists, as in PEFT."""
        lora = self._lora("combined")
        if adapter_name in self.peft_configs:
            return
        unknown = [a for a in adapters if a not in self.peft_configs]
        if unknown or not adapters:
            raise PeftError(f"add_weighted_adapter: no adapter named {unknown or adapters!r}; "
                            f"this model has {sorted(self.peft_configs)}")
        config, kind = combined_config([self.peft_configs[a] for a in adapters], list(weights),
                                       combination_type, density)
        lora.add_adapter(adapter_name, config)
        for layer in lora.lora_layers().values():
            new = layer.parts(adapter_name)
            found = [(layer.parts(a), w) for a, w in zip(adapters, weights) if layer.parts(a)]
            if new is None or not found:
                continue
            A, B = combine([(p.lora_A.weight, p.lora_B.weight, p.scaling) for p, _ in found],
                           [w for _, w in found], kind, config.r, density, majority_sign_method)
            new.lora_A.weight.copy_(A)
            new.lora_B.weight.copy_(B)
        for p in self.adapter_parameters(adapter_name).values():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ files
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """What adapter `adapter_name`'s (default: the active one) adapter_model.safetensors
        holds, under PEFT's key names."""
        return {k: v.detach() for k, v in self._adapter_targets(adapter_name).items()}

    def _adapter_targets(self, adapter_name=None) -> dict[str, torch.Tensor]:
        if self.is_lora:
            tensors = self.base_model.adapter_tensors(adapter_name or self._active)
            return {PREFIX + k: v for k, v in tensors.items()}
        if self.is_prompt_learning:  # the final virtual tokens only, as PEFT
            if not isinstance(self.prompt_encoder, PromptEmbedding):
                with torch.no_grad():
                    return {"prompt_embeddings": self.prompt_encoder()}
            return {"prompt_embeddings": self.prompt_encoder.embedding.weight}
        return self.adapter_parameters()

    def save_pretrained(self, save_directory) -> None:
        """Write adapter_config.json + adapter_model.safetensors, PEFT's format: the adapter
        "default" in `save_directory`, every other one in `save_directory/<name>/` (PEFT's
        subfolders)."""
        for name, config in self.peft_configs.items():
            folder = Path(save_directory) / (name if name != "default" else "")
            folder.mkdir(parents=True, exist_ok=True)
            tensors = {k: v.contiguous().cpu() for k, v in self.adapter_state_dict(name).items()}
            save_safetensors(folder / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
            write_json(folder / CONFIG_NAME, config_to_dict(config))

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id, adapter_name: str = "default",
                        is_trainable: bool = False, subfolder: str | None = None) -> PeftModel:
        """Load an adapter folder saved by minift or PEFT onto `model`. On any error the model
        is left as it was. is_trainable=True continues training the loaded values (for the
        virtual-token methods: the saved tokens themselves; encoders are not saved)."""
        folder = adapter_folder(model_id, subfolder)
        config = load_adapter_config(folder)
        tensors = load_adapter_tensors(folder)
        config.inference_mode = True      # a loaded prompt is the saved form (see prompts.py)
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            peft_model = cls(model, config, adapter_name)
        except PeftError as e:  # the config does not fit this model: name the file
            raise PeftError(f"{folder / CONFIG_NAME}: {e}") from None
        try:
            peft_model.load_adapter_state_dict(tensors, str(folder / WEIGHTS_NAME))
        except Exception:
            peft_model.unload()
            for p, flag in flags:
                p.requires_grad_(flag)
            raise
        peft_model.peft_config.inference_mode = not is_trainable
        peft_model.set_adapter_trainable(is_trainable)
        if not is_trainable:  # as PEFT: an adapter loaded for inference comes in eval mode,
            peft_model.eval()  # so LoRA dropout is off without a further call
        return peft_model

    @torch.no_grad()
    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], source="state dict",
                                adapter_name: str | None = None):
        """Copy adapter tensors in; every key and shape is checked before anything is copied."""
        if self.is_prompt_learning and not isinstance(self.prompt_encoder, PromptEmbedding):
            raise PeftError("saved prompt_embeddings are an encoder's output; load them with "
                            "PeftModel.from_pretrained, not into a training-form encoder")
        targets = self._adapter_targets(adapter_name)
        for key, t in tensors.items():
            if key not in targets:
                raise PeftError(f"{source}: unexpected key {key!r}; it is not a parameter of this "
                                f"{self.peft_config.peft_type} adapter on this model")
            if tuple(t.shape) != tuple(targets[key].shape):
                raise PeftError(f"{source}: key {key!r} has shape {tuple(t.shape)} but the model "
                                f"expects {tuple(targets[key].shape)}")
        missing = sorted(set(targets) - set(tensors))
        if missing:
            raise PeftError(f"{source}: missing {len(missing)} adapter tensors, e.g. {missing[0]!r}")
        for key, t in tensors.items():
            targets[key].copy_(t)


def get_peft_model(model: nn.Module, peft_config) -> PeftModel:
    """PEFT's entry point: freeze `model`, add the adapter, return the PeftModel."""
    return PeftModel(model, peft_config)
