"""The model-size planner: will this method and model fit, and what will a step cost?

    from minift.plan import plan
    for e in plan("gpt2-medium", ["lora", "full"], batch_size=8, max_length=512):
        print(e.method, e.total_bytes / 2**30, "GiB", e.fits)

`minift plan` (commands/plan.py) prints the same as a table, or as JSON.

Nothing is loaded or allocated: the model is built on the meta device (shapes only) from its
config.json, or from a named shape (gpt2, gpt2-medium, gpt2-large, gpt2-xl), and the method
is applied to it by minift's own code, so the parameter counts are exactly the ones training
will have. Memory per micro-batch (B examples of T tokens):

  parameters   every weight, fp32 (bf16 autocast keeps fp32 weights; tied lm_head once)
  gradients    the trainable weights, fp32
  optimizer    AdamW's two moments (exp_avg, exp_avg_sq) per trainable weight, fp32
  activations  what autograd keeps from the forward for the backward, op by op as minift's
               forward saves it (`_activations` walks one block); under bf16, the bf16
               weight copies autocast makes are kept too
  workspace    the largest temporaries: one chunk of LM-head logits and one MLP-wide gradient

FLOPs per token count the matmuls of forward and backward (2 per multiply-add): the input
gradient wherever a gradient flows, the weight gradient only for trainable weights,
minift's attention recompute on CPU, and a second forward per block with gradient
checkpointing. The step time divides them by a matmul rate measured here (a short timing
of machine.matmul_rate, minift's own kernel), so it is a lower bound: real steps also spend
time outside matmuls.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint import _from_hf_cache, read_config, resolve_source
from .loss import HEAD_CHUNK
from .machine import default_device, free_memory, matmul_rate
from .model import GPT, GPTConfig
from .ops import QUERY_BLOCK, query_blocks
from .peft import (AdapterConfig, LoraConfig, PrefixTuningConfig, PromptEncoderConfig,
                   PromptTuningConfig, get_peft_model)
from .peft.partial import freeze_all_but_top, unfreeze_all

# GPT-2's four released sizes (Radford et al. 2019, Table 2): (n_layer, n_head, n_embd)
SHAPES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
          "gpt2-xl": (48, 25, 1600)}
METHODS = ("full", "partial", "lora", "dora", "adapter", "prefix", "prompt", "ptuning")
DTYPES = ("fp32", "bf16")


@dataclass
class MethodOptions:
    """The method's knobs, with the library's defaults (LoRA as PEFT's LoraConfig: r 8,
    dropout 0.05, c_attn); `minift plan` passes `minift finetune`'s instead."""
    r: int = 8                         # LoRA rank
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None   # None: c_attn, as PEFT does for GPT-2
    bottleneck_size: int = 32          # Houlsby adapter width
    num_virtual_tokens: int = 20       # prefix / prompt / P-tuning length
    encoder_hidden_size: int | None = None
    top_k_blocks: int = 2              # partial fine-tuning


@dataclass
class Estimate:
    model: str
    method: str
    batch_size: int
    max_length: int
    gradient_accumulation_steps: int
    dtype: str
    gradient_checkpointing: bool
    total_params: int                  # with the method's added parameters
    model_params: int                  # the model's own (what `full` trains)
    trainable_params: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    workspace_bytes: int
    total_bytes: int
    budget_bytes: int | None           # free memory here, or the --memory budget
    fits: bool | None
    flops_per_token: float             # training: forward + backward
    step_flops: float                  # one optimizer step (all micro-batches)
    matmul_flops_per_s: float | None
    step_seconds: float | None         # at that rate: a lower bound
    adapter_file_bytes: int            # the saved adapter (or model.safetensors for full/partial)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- the model
def model_config(src: str) -> GPTConfig:
    """A folder, a cached hub id, "minift-tiny" or a named shape -> its GPTConfig; only
    config.json is read. A shape name that is also in the hub cache reads the cached one."""
    if src in SHAPES and not Path(src).exists() and _from_hf_cache(src) is None:
        n_layer, n_head, n_embd = SHAPES[src]
        return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    try:
        return GPTConfig.from_dict(read_config(resolve_source(src)))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (or name a shape: {', '.join(SHAPES)})") from None


def build(config: GPTConfig, method: str, o: MethodOptions, device="meta"):
    """The model with `method` applied, by default on the meta device: real names and
    shapes, no memory (tests build the same on the CPU to measure it)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    with torch.device(device):
        model = GPT(config)
        if method == "full":
            unfreeze_all(model)
            return model
        if method == "partial":
            freeze_all_but_top(model, o.top_k_blocks)
            return model
        targets = {"target_modules": o.target_modules} if o.target_modules else {}
        n, hidden = o.num_virtual_tokens, o.encoder_hidden_size
        peft_config = {
            "lora": lambda: LoraConfig(r=o.r, lora_dropout=o.lora_dropout, **targets),
            "dora": lambda: LoraConfig(r=o.r, lora_dropout=o.lora_dropout, use_dora=True,
                                       **targets),
            "adapter": lambda: AdapterConfig(bottleneck_size=o.bottleneck_size, **targets),
            "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=n),
            "prompt": lambda: PromptTuningConfig(num_virtual_tokens=n),
            "ptuning": lambda: PromptEncoderConfig(
                num_virtual_tokens=n, **({"encoder_hidden_size": hidden} if hidden else {})),
        }[method]()
        return get_peft_model(model, peft_config)


def _short(name: str) -> str:
    """A parameter name from `transformer.` on ("h.0.attn.c_attn.lora_A.weight")."""
    _, sep, tail = name.partition("transformer.")
    return tail if sep else name


# ----------------------------------------------------------------------------- activations
class _Walk:
    """Bytes autograd keeps and FLOPs, one op at a time, following minift's forward for a
    micro-batch: N = B * Tq query positions, S keys per query. `grad` tracks whether the
    activation at hand requires a gradient (something below it trains)."""

    def __init__(self, trains: dict[str, tuple], lora_r: dict[str, int], c: GPTConfig, B, Tq, S,
                 act: int, dropout: float, lora_dropout: float, cpu: bool):
        self.trains, self.lora_r, self.c = trains, lora_r, c
        self.dora = {n[:-len(".lora_magnitude_vector")] for n in trains
                     if n.endswith(".lora_magnitude_vector")}
        self.B, self.Tq, self.S, self.N = B, Tq, S, B * Tq
        self.act, self.drop, self.lora_drop, self.cpu = act, dropout, lora_dropout, cpu
        self.bf16 = act == 2
        self.grad, self.bytes, self.flops = False, 0, 0.0   # flops: per micro-batch

    def trained(self, prefix: str) -> bool:
        return any(n.startswith(prefix) for n in self.trains)

    def layer_norm(self, name: str) -> None:
        if self.grad or self.trained(name):   # saves its fp32 input, mean and rstd
            self.bytes += 4 * self.N * self.c.n_embd + 8 * self.N
            self.grad = True

    def dropout(self, width: int) -> None:
        if self.grad and self.drop > 0:     # a 1-byte keep mask (model.Dropout)
            self.bytes += self.N * width

    def linear(self, name: str, n_in: int, n_out: int) -> None:
        N, w_trains, r = self.N, f"{name}.weight" in self.trains, self.lora_r.get(name)
        self.flops += 2 * N * n_in * n_out * (1 + self.grad + w_trains)   # fwd, dx, dW
        if w_trains:
            self.bytes += self.act * N * n_in            # its input, for dW
        if r:                                            # LoraLinearFunction: x, mask, u
            self.bytes += 4 * N * n_in + (N * n_in if self.lora_drop > 0 else 0) + self.act * N * r
            self.flops += 2 * N * r * (n_in + n_out) * 3
        if name in self.dora:   # peft/dora.py: m / ||W + sBA|| times t, kept for m's gradient
            self.bytes += 4 * N * n_out
            if self.lora_drop > 0:   # x W^T and dropout(x) W^T besides the fused op's
                self.flops += 2 * 2 * N * n_in * n_out * (1 + self.grad)
        if self.bf16 and (self.grad or w_trains or r):  # autocast's bf16 weight copy, for dx
            self.bytes += 2 * n_in * n_out
        self.grad = self.grad or w_trains or bool(r)

    def adapter(self, name: str) -> None:
        if not self.trained(f"{name}.adapter."):
            return
        C, m = self.c.n_embd, self.trains[f"{name}.adapter.down.weight"][0]
        self.linear(f"{name}.adapter.down", C, m)
        self.bytes += self.act * self.N * m              # the activation's input
        self.linear(f"{name}.adapter.up", m, C)

    def attention(self, prefix_trains: bool) -> None:
        B, N, S, C, nh = self.B, self.N, self.S, self.c.n_embd, self.c.n_head
        g = self.grad or prefix_trains
        qkv = self.act * (N * C + 2 * B * S * C)
        mask = B * self.Tq * S                           # (B, 1, T, S) bool: padding / prefix
        if self.cpu and (self.drop > 0 or self.bf16):   # ops.AttentionDropout: causal
            pairs = B * sum((i1 - i0) * keys for i0, i1, keys in    # blocks of queries
                            query_blocks(self.Tq, S, QUERY_BLOCK))   # (query, key) per head
            # QK^T and PV forward, four matmuls backward, the recomputed QK^T
            self.flops += 2 * 2 * pairs * C * (1 + 2 * g) + (2 * pairs * C if g else 0)
            if g:                                # q, k, v and the 1-byte keep-mask (dropout)
                self.bytes += qkv + (nh * pairs if self.drop > 0 else 0) + mask
        else:                                            # SDPA: q, k, v, out, logsumexp
            self.flops += 2 * 2 * N * S * C * (1 + 2 * g)
            if g:
                self.bytes += qkv + self.act * N * C + 4 * B * nh * self.Tq + mask
        self.grad = self.grad or g


def _activations(w: _Walk, prefix_trains: bool, embeddings_train: bool, checkpointing: bool):
    c, N = w.c, w.N
    C, inner = c.n_embd, c.n_inner or 4 * c.n_embd
    w.grad = embeddings_train
    if "wte.weight" in w.trains:
        w.bytes += 8 * N                                 # the input ids, for the embedding's dW
    w.dropout(C)
    blocks = []
    for i in range(c.n_layer):
        start, p = w.bytes, f"h.{i}."
        w.layer_norm(p + "ln_1")
        w.linear(p + "attn.c_attn", C, 3 * C)
        w.attention(prefix_trains)
        w.linear(p + "attn.c_proj", C, C)
        w.adapter(p + "attn.c_proj")
        w.dropout(C)
        w.layer_norm(p + "ln_2")
        w.linear(p + "mlp.c_fc", C, inner)
        if w.grad:                                       # gelu's input (or _ActLinear's h)
            w.bytes += w.act * N * inner
        proj_trains = f"{p}mlp.c_proj.weight" in w.trains
        before = w.bytes
        w.linear(p + "mlp.c_proj", inner, C)
        if proj_trains and p + "mlp.c_proj" not in w.lora_r:   # _ActLinear keeps h only
            w.bytes = before
        w.adapter(p + "mlp.c_proj")
        w.dropout(C)
        blocks.append(w.bytes - start)
    w.layer_norm("ln_f")
    head_trains = "wte.weight" in w.trains
    targets = w.B * (w.Tq - 1)                           # at most: every next token
    w.flops += 2 * targets * C * c.vocab_size * (1 + w.grad + head_trains)
    if w.grad or head_trains:
        w.bytes += 4 * targets * C + 9 * N               # grad_h (n, C), the target mask, ids
    if checkpointing and blocks:   # each block keeps its input; one is recomputed at a time
        w.flops += sum(_forward_flops_share(w, blocks))   # (and keeps its input once more)
        inputs = c.n_layer * 4 * N * C
        return w.bytes - sum(blocks) + inputs + max(max(blocks) - 4 * N * C, 0)
    return w.bytes


def _forward_flops_share(w: _Walk, blocks) -> list[float]:
    """The extra forward a checkpointed block costs, per block: its matmuls once."""
    c, N, S = w.c, w.N, w.S
    inner = c.n_inner or 4 * c.n_embd
    per_block = 2 * N * c.n_embd * (4 * c.n_embd + 2 * inner) + 4 * N * S * c.n_embd
    return [per_block] * len(blocks)


# ----------------------------------------------------------------------------- the plan
def _safetensors_bytes(params: dict[str, tuple]) -> int:
    """A safetensors file of these fp32 tensors: 8-byte length, JSON header, data."""
    header = sum(len(n) + 60 + 8 * len(s) for n, s in params.items())
    return 8 + header + sum(4 * math.prod(s) for s in params.values())


def _check(dtype: str, **counts) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    for name, v in counts.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def estimate(src: str, method: str, batch_size: int, max_length: int | None = None,
             gradient_accumulation_steps: int = 1, dtype: str = "fp32",
             gradient_checkpointing: bool = False, options: MethodOptions | None = None,
             memory: int | None = None, matmul_flops_per_s: float | None = None,
             device: str = "cpu", dropout: float | None = None,
             config: GPTConfig | None = None) -> Estimate:
    """The plan for one method. dropout None keeps the model's rates (GPT-2: 0.1);
    memory None compares with free_memory(device); matmul_flops_per_s None: no step time."""
    o = options or MethodOptions()
    _check(dtype, batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
           max_length=1 if max_length is None else max_length)   # None: the model's context
    if dropout is not None and not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    c = config or model_config(src)
    if max_length is not None and max_length > c.n_positions:  # not silently the context
        raise ValueError(f"max_length={max_length} is more than {src}'s n_positions="
                         f"{c.n_positions}")
    model = build(c, method, o)
    n_virtual = o.num_virtual_tokens if method in ("prefix", "prompt", "ptuning") else 0
    T = min(max_length or c.n_positions, c.n_positions - n_virtual)
    if T < 2:
        raise ValueError(f"max_length leaves no room: n_positions={c.n_positions}, "
                         f"{n_virtual} virtual tokens")
    params = {n: p for n, p in model.named_parameters()}     # tied lm_head appears once
    trains = {_short(n): tuple(p.shape) for n, p in params.items() if p.requires_grad}
    lora_r = {n[:-len(".lora_A.weight")]: s[0] for n, s in trains.items()
              if n.endswith(".lora_A.weight")}
    n_total = sum(p.numel() for p in params.values())
    n_train = sum(math.prod(s) for s in trains.values())
    drop = c.resid_pdrop if dropout is None else dropout
    prompt = method in ("prompt", "ptuning")
    Tq, S = T + (n_virtual if prompt else 0), T + n_virtual
    walk = _Walk(trains, lora_r, c, batch_size, Tq, S, 2 if dtype == "bf16" else 4, drop,
                 o.lora_dropout if method in ("lora", "dora") else 0.0,
                 not device.startswith("cuda"))
    activations = _activations(walk, method == "prefix", method == "full" or prompt,
                               gradient_checkpointing)
    # a prompt encoder's matmuls (P-tuning, prefix projection): n rows, once per micro-batch
    prompt_flops = 3 * 2 * n_virtual * sum(math.prod(s) for n, s in trains.items()
                                           if len(s) == 2 and "embedding" not in n)
    workspace = 4 * min(HEAD_CHUNK, batch_size * Tq) * c.vocab_size + \
        4 * batch_size * Tq * (c.n_inner or 4 * c.n_embd)
    total = 4 * n_total + 8 * n_train + 4 * n_train + activations + workspace
    budget = memory if memory is not None else free_memory(device)
    tokens = batch_size * Tq
    flops_token = (walk.flops + prompt_flops) / tokens
    step_flops = (walk.flops + prompt_flops) * gradient_accumulation_steps
    saved = ({n: tuple(p.shape) for n, p in params.items()} if method in ("full", "partial")
             else {f"base_model.model.transformer.{n}": s for n, s in trains.items()})
    return Estimate(
        model=src, method=method, batch_size=batch_size, max_length=T,
        gradient_accumulation_steps=gradient_accumulation_steps, dtype=dtype,
        gradient_checkpointing=gradient_checkpointing, total_params=n_total,
        model_params=build(c, "full", o).num_parameters(),
        trainable_params=n_train, param_bytes=4 * n_total, grad_bytes=4 * n_train,
        optimizer_bytes=8 * n_train, activation_bytes=int(activations),
        workspace_bytes=int(workspace), total_bytes=int(total), budget_bytes=budget,
        fits=None if budget is None else total <= budget, flops_per_token=flops_token,
        step_flops=step_flops, matmul_flops_per_s=matmul_flops_per_s,
        step_seconds=step_flops / matmul_flops_per_s if matmul_flops_per_s else None,
        adapter_file_bytes=_safetensors_bytes(saved))


def plan(src: str, methods=METHODS, batch_size: int = 8, max_length: int | None = None,
         measure: bool = True, device: str | None = None,
         options: MethodOptions | dict[str, MethodOptions] | None = None, **kw) -> list[Estimate]:
    """estimate() for each method, with one matmul-rate measurement shared by all; options
    one MethodOptions for every method, or one per method (a dict by method name)."""
    device = device or default_device()
    methods = [methods] if isinstance(methods, str) else list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method {', '.join(map(repr, unknown)) or '(none)'}; "
                         f"choose from {', '.join(METHODS)}")
    config = model_config(src)
    rate = kw.pop("matmul_flops_per_s", None)
    here = not device.startswith("cuda") or torch.cuda.is_available()
    if rate is None and measure and here:   # planning for a GPU elsewhere: no step time
        rate = matmul_rate(kw.get("dtype", "fp32"), device)
    per_method = options if isinstance(options, dict) else dict.fromkeys(methods, options)
    return [estimate(src, m, batch_size, max_length, config=config, device=device,
                     matmul_flops_per_s=rate, options=per_method[m], **kw) for m in methods]
