"""GPT-2, readable top to bottom (Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners"; architecture of Radford et al. 2018 with pre-LayerNorm, §2.3).

Module and parameter names are GPT-2's own (`transformer.h.0.attn.c_attn.weight`, ...),
so Hugging Face checkpoints load with one loop (checkpoint.py reads the files). Unlike
OpenAI's Conv1D, every projection here is an `nn.Linear` storing (out, in): linear.Linear,
which on the CPU in float32 multiplies through oneDNN (faster there than torch's MKL). Where
a reference calls nn.Dropout, scaled_dot_product_attention, c_proj(act(h)) or the full
cross-entropy, this calls ops.py's and loss.py's equals, which keep less for the backward.

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

from . import checkpoint as files
from .generation import generate
from .linear import Linear
from .loss import masked_lm_loss
from .ops import ACTIVATIONS, ActLinear, Dropout, attention

# A KV cache / prefix: one (key, value) pair per layer, each (B, nh, P, hs).
KeyValues = list[tuple[torch.Tensor, torch.Tensor]]


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


class CausalLMOutput:
    """GPT.forward's result, with transformers' names: loss, logits (B, T, V), past_key_values.

    The logits are computed when first read (then kept): lm_head over the final hidden
    states the forward returned, under the grad mode and autocast state the forward ran
    in, so they are the very numbers, and as differentiable, as logits computed eagerly.
    A loop that reads only `.loss` never builds the (B, T, V) logits.

    The one edge: logits first read after `loss.backward()` hang below a graph autograd has
    freed; their values are right, but a backward through them raises ("backward through
    the graph a second time"). Read them before the backward, or pass return_logits=True.
    """

    def __init__(self, loss=None, logits=None, past_key_values=None, hidden=None, head=None):
        self.loss, self.past_key_values = loss, past_key_values
        self._logits, self._hidden, self._head = logits, hidden, head
        if hidden is not None:  # the forward's modes, to compute the logits in later
            dev = hidden.device.type
            self._modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), dev,
                           torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))

    @property
    def logits(self) -> torch.Tensor | None:
        if self._logits is None and self._hidden is not None:
            grad, inference, dev, autocast, dtype = self._modes
            # inference_mode first: leaving it (mode False) turns grad mode on
            with (torch.inference_mode(inference), torch.set_grad_enabled(grad),
                  torch.autocast(dev, dtype=dtype, enabled=autocast)):
                self._logits = self._head(self._hidden)
            self._hidden = self._head = None
        return self._logits

    @logits.setter
    def logits(self, value):
        self._logits, self._hidden, self._head = value, None, None

    def __repr__(self):
        lazy = self._logits is None and self._hidden is not None
        logits = "<not computed yet>" if lazy else self._logits
        return (f"CausalLMOutput(loss={self.loss}, logits={logits}, "
                f"past_key_values={'None' if self.past_key_values is None else '...'})")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = Dropout(config.resid_pdrop)

    def forward(self, x, mask=None, past=None, use_cache=False):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if past is not None:  # prepend cached or prefix keys/values: (B, nh, P + T, hs)
            k = torch.cat([past[0].to(k.dtype), k], dim=2)
            v = torch.cat([past[1].to(v.dtype), v], dim=2)
        # mask: None means causal (query i sees keys j <= P + i); else bool (B, 1, T, P + T)
        dropout_p = self.attn_pdrop if self.training else 0.0
        y = attention(q, k, v, mask, dropout_p)                          # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y)), ((k, v) if use_cache else None)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = Linear(config.n_embd, inner)
        self.c_proj = Linear(inner, config.n_embd)
        self.activation = config.activation_function
        self.act = ACTIVATIONS[self.activation]
        self.dropout = Dropout(config.resid_pdrop)

    def forward(self, x):
        h = self.c_fc(x)                                                 # (B, T, 4C)
        proj = self.c_proj  # an adapter may wrap it; then it runs as its own module
        if (type(proj) is Linear and proj.weight.requires_grad and torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):  # inductor picks what to recompute itself
            # c_proj(act(h)) keeping h only for the backward (ops.ActLinear)
            return self.dropout(ActLinear.apply(h, proj.weight, proj.bias, self.activation))
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


def attention_mask_4d(attention_mask: torch.Tensor, T: int,
                      segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, P + T) padding mask of 1/0 -> bool (B, 1, T, P + T): causal AND not padding,
    AND (with segment_ids (B, T), P = 0: packed rows) within the same segment.

    Query i (absolute position P + i) may attend key j when j <= P + i and key j is real.
    A query whose row is all False (a left-padding position) gets zeros from SDPA, as in
    transformers; its logits are meaningless and its labels should be -100. In a packed
    row (packing.py) the mask is block-diagonal: no token attends across examples.
    """
    S = attention_mask.shape[1]
    q_pos = torch.arange(S - T, S, device=attention_mask.device)[:, None]   # (T, 1)
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]          # (1, S)
    mask = (k_pos <= q_pos)[None, None] & attention_mask.bool()[:, None, None, :]
    if segment_ids is not None:
        mask &= segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return mask


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
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
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
                return_logits: bool | None = None, segment_ids=None) -> CausalLMOutput:
        """input_ids (B, T) or inputs_embeds (B, T, C); attention_mask (B, P + T) of 1/0 over
        past and new tokens; labels (B, T), shifted inside, -100 ignored (transformers' rules).
        A packed row (packing.py) also passes position_ids (B, T), restarting at 0 with each
        example, and segment_ids (B, T), one id per example: no token attends across them.

        With labels, the loss runs the LM head only at target positions (loss.masked_lm_loss)
        and `out.logits` is computed when read (see CausalLMOutput). return_logits=True
        computes the logits now and the loss from them (transformers' way, same numbers);
        False gives no logits at all.
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
        mask = self._mask(attention_mask, segment_ids, B, P, T, x.device)

        presents = [] if use_cache else None
        for i, block in enumerate(self.transformer.h):
            past = past_key_values[i] if past_key_values else None
            if self.gradient_checkpointing and self.training and not use_cache:
                x, kv = checkpoint(block, x, mask, past, False, use_reentrant=False)
            else:
                x, kv = block(x, mask, past, use_cache)
            if use_cache:
                presents.append(kv)
        x = self.transformer.ln_f(x)                                     # (B, T, C)

        if return_logits is None and torch._C._are_functorch_transforms_active():
            return_logits = True  # torch.func's grad / vmap: the full head (a plain composition)
        if not return_logits:  # None or False: the loss from the target positions only
            loss = None if labels is None else masked_lm_loss(x, self.lm_head.weight, labels)
            lazy = dict(hidden=x, head=self.lm_head) if return_logits is None else {}
            return CausalLMOutput(loss, None, presents, **lazy)
        logits = self.lm_head(x)                                         # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        return CausalLMOutput(loss, logits, presents)

    @staticmethod
    def _mask(attention_mask, segment_ids, B, P, T, device) -> torch.Tensor | None:
        """The bool (B, 1, T, P + T) attention mask, or None for plain causal attention."""
        if attention_mask is not None and attention_mask.shape != (B, P + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"expected (batch, past + new tokens) = ({B}, {P + T})")
        if segment_ids is not None:
            if segment_ids.shape != (B, T) or P:
                raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}, expected "
                                 f"(batch, tokens) = ({B}, {T}) and no past_key_values")
            if attention_mask is None:
                attention_mask = torch.ones(B, T, dtype=torch.bool, device=device)
            return attention_mask_4d(attention_mask, T, segment_ids.to(device))
        if attention_mask is None or bool(attention_mask.bool().all()):
            return None
        return attention_mask_4d(attention_mask, T)

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

    @classmethod
    def from_pretrained(cls, src, dtype: torch.dtype | None = None, device=None) -> GPT:
        """Load a Hugging Face GPT-2 folder, a cached hub id, or "minift-tiny"; in eval mode,
        as transformers does. Every tensor is shape-checked by name (checkpoint.py)."""
        folder = files.resolve_source(src)
        try:
            config = GPTConfig.from_dict(files.read_config(folder))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{folder / 'config.json'}: {e}") from None
        with torch.device("meta"):  # no random init: every tensor is overwritten below
            model = cls(config)
        expected = {n: p.shape for n, p in model.named_parameters()}  # a tied lm_head: wte only
        model.load_state_dict(files.read_weights(folder, expected, config.n_layer, dtype),
                              strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.transformer.wte.weight
        model.eval()
        return model.to(device) if device is not None else model

    def save_pretrained(self, folder) -> None:
        """Write config.json + model.safetensors in the layout transformers loads."""
        files.write_folder(folder, self.config.to_dict(), self.state_dict())


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
    (LoRA's op is one autograd.Function with no graph break; attention with dropout runs
    ops.AttentionDropout as one block over the whole square, which inductor fuses), prefix
    key/values and padding masks get their own graph, and `model.gradient_checkpointing` recomputes a
    block by calling the compiled code again. On CPU inductor emits C++ (a C++ compiler
    is needed); on CUDA, Triton.

    On the CPU, inductor is told to draw dropout masks with torch's own generator
    (`fallback_random`): its C++ random numbers are slower than torch's, and the compiled
    blocks then draw the very masks eager ones do (up to T = ops.QUERY_BLOCK tokens; longer
    rows draw attention's mask in query blocks when eager, so the streams part there).
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


