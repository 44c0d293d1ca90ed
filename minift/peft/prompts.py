"""Virtual-token methods: prompt tuning, P-tuning and prefix tuning.

- Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
  Tuning", §2): n trainable input embeddings placed before the text; initialised at random,
  from sampled vocabulary embeddings, or from the embeddings of a text (§2.1).
- P-tuning (Liu et al. 2021, "GPT Understands, Too", §3.2): the same n input embeddings, but
  produced by a prompt encoder, an MLP or a bidirectional LSTM + MLP, over trainable inputs.
- Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
  Generation", §4.2): n trainable keys and values at every layer, seen by every token as
  an attention prefix; optionally reparameterised as P = MLP(P') (§4.3).

Only the result is kept after training, as PEFT does: the file holds `prompt_embeddings`,
(n, n_embd) for the first two and (n, n_layer * 2 * n_embd) for prefix tuning, and a loaded
adapter uses that tensor directly (the encoder networks are training-time only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
import torch.nn as nn

from .config import PeftError, check_task_type

SHAPE_FIELDS = {"token_dim": "n_embd", "num_layers": "n_layer", "num_attention_heads": "n_head"}


@dataclass
class VirtualTokenConfig:
    """The fields every virtual-token method shares (PEFT's PromptLearningConfig); the three
    configs below add their own. Not used on its own: it has no peft_type."""
    task_type: str | None = "CAUSAL_LM"        # PEFT's field; causal LM is all minift does
    inference_mode: bool = False               # True: the prompt is frozen (saved files say True)
    base_model_name_or_path: str | None = None  # recorded in adapter_config.json, never opened
    num_virtual_tokens: int = 20               # prompt / prefix length
    token_dim: int | None = None               # PEFT's model-shape fields: filled from the model
    num_layers: int | None = None              # (n_embd, n_layer, n_head) and checked on load
    num_attention_heads: int | None = None
    num_transformer_submodules: int | None = None  # 1 for a decoder-only model

    def __post_init__(self):
        check_task_type(self.task_type)
        self.task_type = "CAUSAL_LM"
        n = self.num_virtual_tokens
        if not isinstance(n, int) or n <= 0:
            raise PeftError(f"num_virtual_tokens must be a positive integer, got {n!r}")
        if self.num_transformer_submodules not in (None, 1):
            raise PeftError(f"num_transformer_submodules={self.num_transformer_submodules}: "
                            "GPT-2 is decoder-only, so it must be 1")

    def extra_json(self) -> dict:
        return {}


@dataclass
class PromptTuningConfig(VirtualTokenConfig):
    num_virtual_tokens: int = 20               # Lester et al. §3.2: gains flatten beyond ~20
    prompt_tuning_init: str = "RANDOM"         # "RANDOM" N(0, 1); "SAMPLE_VOCAB" rows of wte for
                                               # random ids; "TEXT" the embeddings of init text
    prompt_tuning_init_text: str | None = None  # for "TEXT": repeated / cut to num_virtual_tokens
    tokenizer_name_or_path: str | None = None  # for "TEXT": a folder minift's Tokenizer loads, or...
    tokenizer: Any = field(default=None, repr=False, compare=False, metadata={"save": False})
    # ...any tokenizer object: minift's Tokenizer, a transformers tokenizer, or anything with
    # __call__(text)["input_ids"] or encode(text). Used once at init; not saved.
    peft_type: ClassVar[str] = "PROMPT_TUNING"

    def __post_init__(self):
        super().__post_init__()
        if self.prompt_tuning_init not in ("RANDOM", "SAMPLE_VOCAB", "TEXT"):
            raise PeftError(f"prompt_tuning_init={self.prompt_tuning_init!r}; choose RANDOM, "
                            "SAMPLE_VOCAB or TEXT")
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise PeftError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")

    def extra_json(self) -> dict:
        # PEFT refuses a TEXT config without a tokenizer name even though it only reads the
        # tokenizer when re-initialising; say honestly that an object was used.
        if self.prompt_tuning_init == "TEXT" and not self.tokenizer_name_or_path:
            name = getattr(self.tokenizer, "name_or_path", None)
            return {"tokenizer_name_or_path": name or f"<{type(self.tokenizer).__name__} object>"}
        return {}


@dataclass
class PromptEncoderConfig(VirtualTokenConfig):
    encoder_reparameterization_type: str = "MLP"  # "MLP" (3 linear layers) or "LSTM" (bi-LSTM + MLP)
    encoder_hidden_size: int | None = None     # width of the encoder; None: the model's n_embd
    encoder_num_layers: int = 2                # LSTM layers; ignored by the MLP, as in PEFT
    encoder_dropout: float = 0.0               # between LSTM layers
    peft_type: ClassVar[str] = "P_TUNING"

    def __post_init__(self):
        super().__post_init__()
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise PeftError(f"encoder_reparameterization_type="
                            f"{self.encoder_reparameterization_type!r}; choose 'MLP' or 'LSTM'")


@dataclass
class PrefixTuningConfig(VirtualTokenConfig):
    num_virtual_tokens: int = 20               # prefix length (Li & Liang use 10 to 200)
    prefix_projection: bool = False            # P = MLP(P'), tanh MLP, §4.3 (stabler training)
    encoder_hidden_size: int | None = None     # that MLP's width; None: the model's n_embd
    init_weights: str | None = None            # "zero": the prefix starts at zero keys and values
    peft_type: ClassVar[str] = "PREFIX_TUNING"

    def __post_init__(self):
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise PeftError(f"init_weights={self.init_weights!r}; use None or 'zero'")


PROMPT_CONFIGS = (PromptTuningConfig, PromptEncoderConfig, PrefixTuningConfig)


def fit_to_model(config, gpt_config):
    """A copy of `config` with PEFT's shape fields filled from the model; a field already set
    (an adapter file) must agree. num_virtual_tokens must leave room in the context."""
    values = {}
    for name, model_name in SHAPE_FIELDS.items():
        want, have = getattr(gpt_config, model_name), getattr(config, name)
        if have is not None and have != want:
            raise PeftError(f"adapter {name}={have} does not fit the model, whose "
                            f"{model_name}={want}")
        values[name] = want
    if config.num_virtual_tokens >= gpt_config.n_positions:
        raise PeftError(f"num_virtual_tokens={config.num_virtual_tokens} fills the model's whole "
                        f"context (n_positions={gpt_config.n_positions}); use fewer")
    if getattr(config, "encoder_hidden_size", 0) is None:   # P-tuning / prefix MLP width
        values["encoder_hidden_size"] = gpt_config.n_embd
    return replace(config, num_transformer_submodules=1, **values)


# --------------------------------------------------------------------------- encoders
class PromptEmbedding(nn.Module):
    """Prompt tuning's n input embeddings, (n, dim). Also the saved/inference form of P-tuning
    and prefix tuning, where `embedding` holds the trained encoder's output."""

    def __init__(self, n: int, dim: int, device=None, dtype=None):
        super().__init__()
        self.embedding = nn.Embedding(n, dim, device=device, dtype=dtype)  # N(0, 1): "RANDOM"

    def forward(self) -> torch.Tensor:
        return self.embedding.weight                                   # (n, dim)


class PromptEncoder(nn.Module):
    """P-tuning's encoder: trainable inputs (n, C) -> MLP, or bi-LSTM then MLP -> (n, C)."""

    def __init__(self, n: int, C: int, hidden: int, kind="MLP", num_layers=2, dropout=0.0,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.kind = kind
        self.embedding = nn.Embedding(n, C, **kw)
        if kind == "LSTM":
            self.lstm_head = nn.LSTM(C, hidden, num_layers=num_layers, dropout=dropout,
                                     bidirectional=True, batch_first=True, **kw)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **kw), nn.ReLU(),
                                          nn.Linear(2 * hidden, C, **kw))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(C, hidden, **kw), nn.ReLU(),
                                          nn.Linear(hidden, hidden, **kw), nn.ReLU(),
                                          nn.Linear(hidden, C, **kw))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight[None]            # (1, n, C): the encoder sees the n as a sequence
        if self.kind == "LSTM":
            x = self.lstm_head(x)[0]               # (1, n, 2 * hidden): both directions
        return self.mlp_head(x)[0]                 # (n, C)


class PrefixEncoder(nn.Module):
    """Prefix tuning's keys and values for all layers, flattened to (n, L * 2 * C). With
    `projection`, they are MLP(P') for a smaller P' (n, C): C -> hidden -> tanh -> L * 2 * C."""

    def __init__(self, n: int, C: int, L: int, hidden: int | None = None, projection=False,
                 init_zero=False, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.embedding = nn.Embedding(n, C if projection else L * 2 * C, **kw)
        self.transform = None
        if projection:
            self.transform = nn.Sequential(nn.Linear(C, hidden, **kw), nn.Tanh(),
                                           nn.Linear(hidden, L * 2 * C, **kw))
        if init_zero:
            last = self.transform[-1] if projection else self.embedding
            for p in last.parameters():
                nn.init.zeros_(p)

    def forward(self) -> torch.Tensor:
        w = self.embedding.weight
        return w if self.transform is None else self.transform(w)   # (n, L * 2 * C)


def prefix_key_values(flat: torch.Tensor, batch_size: int, n_layer: int, n_head: int):
    """(n, L * 2 * C) -> one (key, value) pair per layer, each (B, nh, n, hs), in PEFT's
    layout: a virtual token's 2L slots are layer 0 key, layer 0 value, layer 1 key, ..."""
    n = flat.shape[0]
    hs = flat.shape[1] // (2 * n_layer * n_head)
    kv = flat.view(n, 2 * n_layer, n_head, hs).permute(1, 2, 0, 3)   # (2L, nh, n, hs)
    kv = kv[:, None].expand(-1, batch_size, -1, -1, -1)              # (2L, B, nh, n, hs)
    return [(kv[2 * i], kv[2 * i + 1]) for i in range(n_layer)]


def text_token_ids(config) -> list[int]:
    """Token ids of prompt_tuning_init_text, from config.tokenizer or tokenizer_name_or_path."""
    tok = config.tokenizer
    if tok is None:
        if not config.tokenizer_name_or_path:
            raise PeftError("prompt_tuning_init='TEXT' needs a tokenizer: pass tokenizer=<object> "
                            "or tokenizer_name_or_path=<folder>")
        from ..tokenizer import Tokenizer
        tok = Tokenizer.from_pretrained(config.tokenizer_name_or_path)
    out = tok(config.prompt_tuning_init_text) if callable(tok) else tok.encode(
        config.prompt_tuning_init_text)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    ids = list(getattr(ids, "ids", ids))  # a `tokenizers` Encoding carries .ids
    if not ids:
        raise PeftError("prompt_tuning_init_text encodes to no tokens")
    return ids


def initial_prompt(config, wte: nn.Embedding) -> torch.Tensor | None:
    """Prompt tuning's starting values (n, C), or None for RANDOM (nn.Embedding's N(0, 1)).
    Lester et al. §2.1: vocabulary-based starts beat random ones, most for small models."""
    n = config.num_virtual_tokens
    if config.prompt_tuning_init == "RANDOM":
        return None
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, wte.num_embeddings, (n,))
    else:  # TEXT: the text's tokens, repeated to fill n, then cut to n (as PEFT)
        ids = text_token_ids(config)
        ids = torch.tensor((ids * math.ceil(n / len(ids)))[:n])
        if int(ids.max()) >= wte.num_embeddings:
            raise PeftError(f"the tokenizer produced id {int(ids.max())}, outside the model's "
                            f"vocabulary of {wte.num_embeddings}")
    return wte.weight[ids.to(wte.weight.device)].detach().float()   # (n, C)


def build_prompt_encoder(config, model) -> nn.Module:
    """The trainable module for `config` (already fit_to_model). In inference_mode (and for a
    loaded file) it is the saved form: a PromptEmbedding holding the final values."""
    gc, n = model.config, config.num_virtual_tokens
    w = model.transformer.wte.weight
    kw = dict(device=w.device, dtype=torch.float32 if w.dtype in (torch.float16, torch.bfloat16)
              else w.dtype)  # half-precision bases get float32 prompts, as PEFT
    prefix = isinstance(config, PrefixTuningConfig)
    if config.inference_mode:
        return PromptEmbedding(n, gc.n_layer * 2 * gc.n_embd if prefix else gc.n_embd, **kw)
    if isinstance(config, PromptTuningConfig):
        encoder = PromptEmbedding(n, gc.n_embd, **kw)
        init = initial_prompt(config, model.transformer.wte)
        if init is not None:
            with torch.no_grad():
                encoder.embedding.weight.copy_(init)
        return encoder
    if isinstance(config, PromptEncoderConfig):
        return PromptEncoder(n, gc.n_embd, config.encoder_hidden_size,
                             config.encoder_reparameterization_type, config.encoder_num_layers,
                             config.encoder_dropout, **kw)
    return PrefixEncoder(n, gc.n_embd, gc.n_layer, config.encoder_hidden_size,
                         config.prefix_projection, config.init_weights == "zero", **kw)
