"""AdamW, parameter groups (no decay on bias/LayerNorm/embeddings, optional layer-wise
lr decay, LoRA+'s faster B) and the three warmup schedules of transformers.optimization.

AdamW is written from the update rule of Loshchilov & Hutter, "Decoupled Weight Decay
Regularization" (ICLR 2019, Algorithm 2) on top of Adam (Kingma & Ba, ICLR 2015,
Algorithm 1), vectorised with torch._foreach_* ops and ordered so its numbers equal
torch.optim.AdamW's.
"""
import math
import re
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay. For each parameter p with gradient g, step t:

        p <- p * (1 - lr * weight_decay)             decay, outside the adaptive step (L&H §2)
        m <- beta1 * m + (1 - beta1) * g             first moment  (Kingma & Ba Alg. 1)
        v <- beta2 * v + (1 - beta2) * g^2           second moment
        p <- p - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps),  bc_i = 1 - beta_i^t

    correct_bias=False sets bc1 = bc2 = 1 (the original BERT/HF AdamW without bias
    correction). Decay is applied before the Adam step, as torch.optim.AdamW does.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 correct_bias=True):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        correct_bias=correct_bias)
        super().__init__(params, defaults)  # calls add_param_group, which validates

    def add_param_group(self, param_group):
        super().add_param_group(param_group)  # fills in missing keys from the defaults
        g = self.param_groups[-1]
        name = f"param group {len(self.param_groups) - 1}"
        if not isinstance(g["lr"], (int, float)) or g["lr"] < 0:
            raise ValueError(f"AdamW: {name}: lr must be a number >= 0, got {g['lr']!r}")
        if len(g["betas"]) != 2 or not all(0.0 <= b < 1.0 for b in g["betas"]):
            raise ValueError(f"AdamW: {name}: betas must be two numbers in [0, 1), got {g['betas']!r}")
        if g["eps"] < 0:
            raise ValueError(f"AdamW: {name}: eps must be >= 0, got {g['eps']!r}")
        if g["weight_decay"] < 0:
            raise ValueError(f"AdamW: {name}: weight_decay must be >= 0, got {g['weight_decay']!r}")

    def __setstate__(self, state):  # load_state_dict ends here; a torch.optim.AdamW state
        super().__setstate__(state)   # has no "correct_bias", so fill in our defaults
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # One list per (device, dtype): a _foreach op needs all its tensors alike.
            buckets = {}
            for p in group["params"]:
                if p.grad is None:
                    continue  # frozen or unused this step: leave p and its state alone
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients; "
                                       "use torch.optim.SparseAdam or a dense embedding")
                state = self.state[p]
                if not state:
                    state["step"] = 0  # a plain int: exact, and round-trips through torch.save
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] = int(state["step"]) + 1  # int() also accepts torch's tensor steps
                b = buckets.setdefault((p.device, p.dtype), ([], [], [], [], []))
                for lst, x in zip(b, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                    lst.append(x)
            for ps, gs, ms, vs, steps in buckets.values():
                self._update(group, ps, gs, ms, vs, steps)
        return loss

    @staticmethod
    def _update(group, ps, gs, ms, vs, steps):
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if wd != 0:
            # Decoupled decay (L&H Alg. 2, line 12), scaled by lr as torch.optim.AdamW does.
            torch._foreach_mul_(ps, 1 - lr * wd)
        # m <- m + (1 - beta1) (g - m): the same moving average as beta1 m + (1 - beta1) g,
        # written as one lerp (torch.optim.AdamW does the same, so the roundings agree).
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, 1 - beta2)
        if group["correct_bias"]:  # Kingma & Ba §3: undo the bias toward the zero init
            bc1 = [1 - beta1 ** t for t in steps]
            bc2_sqrt = [(1 - beta2 ** t) ** 0.5 for t in steps]
        else:
            bc1 = bc2_sqrt = [1.0] * len(steps)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bc2_sqrt)  # eps goes after the bias correction
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, ms, denom, [-lr / c for c in bc1])


# Module types and GPT-2 module names whose parameters get no weight decay: shrinking a
# LayerNorm gain, a bias or an embedding towards 0 does not regularise, it just distorts.
NO_DECAY = ("bias", "ln_1", "ln_2", "ln_f", "wte", "wpe")
_BLOCK = re.compile(r"(?:^|\.)h\.(\d+)\.")  # transformer.h.{i}.  (also under a PEFT wrapper)


def build_param_groups(model, weight_decay, lr=None, layer_decay=None, no_decay=NO_DECAY,
                       loraplus_lr_ratio=None):
    """Parameter groups for AdamW: trainable parameters with and without weight decay.

    A parameter gets no decay if any dotted part of its name is in `no_decay` (biases,
    ln_1/ln_2/ln_f, wte/wpe) or its module is an nn.LayerNorm or nn.Embedding. Frozen
    parameters are left out; a tied parameter (lm_head.weight is wte.weight) appears once,
    under its first name. Every group has a "name" key; `lr`, if given, is set on each.

    layer_decay (ULMFiT's discriminative fine-tuning, Howard & Ruder 2018 §3.2) gives a
    parameter lr = lr * layer_decay ** depth, where depth counts down from the output:
      depth 0            ln_f, lm_head, and everything outside the blocks and embeddings
                         (e.g. prompt/prefix parameters)
      depth n_layer - i  anything inside block i, `transformer.h.{i}.` (adapters included)
      depth n_layer + 1  the embeddings wte and wpe (so a tied lm_head gets this lr too)
    Groups are then named like "depth3_decay" and ordered from the embeddings up.

    loraplus_lr_ratio (LoRA+, Hayou et al. 2024 §3: B learns faster than A, lr_B = ratio * lr_A)
    puts every `lora_B` matrix in groups of its own (names ending "_lora_B") with lr * ratio;
    their weight decay follows the rule above, as for every other parameter. (PEFT's
    create_loraplus_optimizer also gives the ratio to every 1-D trainable parameter, e.g.
    DoRA's magnitude; here only the B matrices get it, as in the paper.)
    """
    _check_group_options(lr, layer_decay, loraplus_lr_ratio)
    blocks = [int(m.group(1)) for n, _ in model.named_parameters() if (m := _BLOCK.search(n))]
    n_layer = max(blocks) + 1 if blocks else 0  # counted over all params, frozen ones too

    groups = {}  # (depth, decay, is_b) -> params, in model order
    for mod_name, module, name, p in _trainable_parameters(model):
        parts = name.split(".")
        decay = not (any(x in no_decay for x in parts)
                     or isinstance(module, (nn.LayerNorm, nn.Embedding)))
        depth = _depth(name, mod_name, n_layer) if layer_decay is not None else 0
        is_b = loraplus_lr_ratio is not None and "lora_B" in parts
        groups.setdefault((depth, decay, is_b), []).append(p)
    if loraplus_lr_ratio is not None and groups and not any(b for _, _, b in groups):
        raise ValueError("build_param_groups: loraplus_lr_ratio is set but no trainable "
                         "parameter is a lora_B matrix (LoRA+ needs a LoRA adapter)")

    def order(key):  # from the embeddings up; in each depth A-side, then B; decay first
        depth, decay, is_b = key
        return -depth, is_b, not decay

    return [_group(groups[key], *key, weight_decay, lr, layer_decay, loraplus_lr_ratio)
            for key in sorted(groups, key=order)]


def _check_group_options(lr, layer_decay, loraplus_lr_ratio):
    if (layer_decay is not None or loraplus_lr_ratio is not None) and lr is None:
        raise ValueError("build_param_groups: layer_decay and loraplus_lr_ratio need the base lr")
    if loraplus_lr_ratio is not None and not loraplus_lr_ratio > 0:
        raise ValueError(f"build_param_groups: loraplus_lr_ratio must be > 0, "
                         f"got {loraplus_lr_ratio!r}")
    if layer_decay is not None and not 0 < layer_decay:
        raise ValueError(f"build_param_groups: layer_decay must be > 0, got {layer_decay!r}")


def _trainable_parameters(model):
    """(module name, module, parameter name, parameter) for each trainable parameter, once:
    a tied parameter (lm_head.weight is wte.weight) comes under its first name only."""
    seen = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                yield mod_name, module, f"{mod_name}.{p_name}" if mod_name else p_name, p


def _depth(name, mod_name, n_layer):
    """Layer decay's depth, counted down from the output (see build_param_groups)."""
    if m := _BLOCK.search(name):
        return n_layer - int(m.group(1))
    if mod_name.split(".")[-1] in ("wte", "wpe"):
        return n_layer + 1
    return 0


def _group(params, depth, decay, is_b, weight_decay, lr, layer_decay, loraplus_lr_ratio):
    """One AdamW param group: its decay, its name and (when lr is given) its lr."""
    g = {"params": params, "weight_decay": weight_decay if decay else 0.0,
         "name": ("decay" if decay else "no_decay")}
    if layer_decay is not None:
        g["name"] = f"depth{depth}_{g['name']}"
        g["lr"] = lr * layer_decay ** depth
    elif lr is not None:
        g["lr"] = lr
    if is_b:
        g["name"] += "_lora_B"
        g["lr"] *= loraplus_lr_ratio
    return g


# Schedules: the multiplier of each group's initial lr after `step` optimizer steps, with
# transformers' formulas. Module-level functions bound with functools.partial (not
# closures), so LambdaLR.state_dict() holds only plain data and round-trips.

def _linear(step, *, num_warmup_steps, num_training_steps):
    if step < num_warmup_steps:
        return float(step) / float(max(1, num_warmup_steps))
    return max(0.0, float(num_training_steps - step) / float(max(1, num_training_steps - num_warmup_steps)))


def _cosine(step, *, num_warmup_steps, num_training_steps, num_cycles):
    if step < num_warmup_steps:
        return float(step) / float(max(1, num_warmup_steps))
    progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    # num_cycles waves over the decay phase; 0.5 = half a cosine, from 1 down to 0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


def _constant(step, *, num_warmup_steps):
    if step < num_warmup_steps:
        return float(step) / float(max(1.0, num_warmup_steps))
    return 1.0


def get_linear_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps, last_epoch=-1):
    """lr rises linearly from 0 over num_warmup_steps, then falls linearly to 0 at num_training_steps."""
    f = partial(_linear, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps)
    return LambdaLR(optimizer, f, last_epoch)


def get_cosine_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps, num_cycles=0.5,
                                    last_epoch=-1):
    """Linear warmup, then a cosine of num_cycles waves (0.5: one half-wave down to 0)."""
    f = partial(_cosine, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps,
                num_cycles=num_cycles)
    return LambdaLR(optimizer, f, last_epoch)


def get_constant_schedule_with_warmup(optimizer, num_warmup_steps, last_epoch=-1):
    """Linear warmup from 0, then the optimizer's lr unchanged."""
    return LambdaLR(optimizer, partial(_constant, num_warmup_steps=num_warmup_steps), last_epoch)
