"""Remedies against forgetting and overfitting that act on the optimisation itself.

- `EWC`: elastic weight consolidation (Kirkpatrick et al. 2017, "Overcoming catastrophic
  forgetting in neural networks", eq. 3): a quadratic pull towards the starting weights,
  weighted by how much each weight mattered on the reference (pre-training) data.
- `GradualUnfreezing`: ULMFiT's gradual unfreezing (Howard & Ruder 2018, "Universal Language
  Model Fine-tuning for Text Classification", §3.3): train the top first, then one more
  block at a time.
- Discriminative learning rates (ULMFiT §3.2) are parameter groups: see
  `minift.optim.build_param_groups(..., layer_decay=...)`, which uses the same depth
  convention as `layer_depth` below.
- `EarlyStopping`: stop when the validation loss stops improving (the remedy for
  overfitting that needs no change to the model; Prechelt 1998, "Early Stopping - But When?").
- `set_dropout`: one dropout rate for GPT-2's three dropouts (Srivastava et al. 2014),
  the usual first remedy when a small fine-tuning set is overfitted.

`train()` wires them from `TrainConfig` (`ewc_lambda`, `unfreeze_every`, `layer_decay`,
`dropout`); each is also usable on its own in a hand-written loop.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from .model import GPT, MLP, CausalSelfAttention

_BLOCK = re.compile(r"(?:^|\.)h\.(\d+)\.")  # transformer.h.{i}.  (also under a PEFT wrapper)


def num_blocks(model: nn.Module) -> int:
    """Number of transformer blocks, counted from the parameter names (frozen ones too)."""
    found = [int(m.group(1)) for n, _ in model.named_parameters() if (m := _BLOCK.search(n))]
    return max(found) + 1 if found else 0


def layer_depth(name: str, n_layer: int) -> int:
    """Depth of a parameter counted down from the output, as optim.build_param_groups does:
    0 for ln_f, lm_head and anything outside the blocks and embeddings (prompts, prefixes),
    n_layer - i inside block i, n_layer + 1 for the embeddings wte / wpe."""
    if m := _BLOCK.search(name):
        return n_layer - int(m.group(1))
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in ("wte", "wpe"):
        return n_layer + 1
    return 0


# ----------------------------------------------------------------------------- EWC
def fisher_diagonal(model: nn.Module, examples: list[dict], pad_token_id: int = 0,
                    max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the trainable parameters at the current weights.

    F_i = mean over examples x of (d l(x) / d theta_i)^2, with l(x) the example's mean
    next-token loss (the same per-token normalisation as the training loss, so one
    `lambda` suits any sequence length). One example per backward: the textbook
    per-example Fisher; squaring a batch-mean gradient instead would underestimate F by
    about the batch size. Runs in eval mode (no dropout) and leaves `.grad` untouched.
    Examples without a target token are skipped.
    """
    from .data import collate  # local: data.py imports nothing from here, but keep it lazy
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("fisher_diagonal: the model has no trainable parameters")
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
    was_training = model.training
    model.eval()
    used = 0
    try:
        for ex in examples:
            batch = {k: v.to(named[0][1].device)
                     for k, v in collate([ex], pad_token_id, max_length).items()}
            if not bool((batch["labels"][:, 1:] != -100).any()):
                continue
            loss = model(**batch, return_logits=False).loss
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            for (n, _), g in zip(named, grads):
                if g is not None:
                    fisher[n].add_(g.float().square())
            used += 1
    finally:
        model.train(was_training)
    if used == 0:
        raise ValueError("fisher_diagonal: the reference data has no example with a target token")
    for f in fisher.values():
        f.div_(used)
    return fisher


class EWC:
    """penalty(model) = lambda / 2 * sum_i F_i (theta_i - theta*_i)^2   (Kirkpatrick et al., eq. 3)

    theta* are the weights when the Fisher F was estimated (the start of fine-tuning).
    Its gradient is lambda * F * (theta - theta*). Memory: two extra copies of the
    trainable parameters (F and theta*), on their device.
    """

    def __init__(self, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
                 lam: float):
        if lam < 0:
            raise ValueError(f"EWC: lambda must be >= 0, got {lam}")
        if set(fisher) != set(anchor):
            raise ValueError("EWC: fisher and anchor must name the same parameters")
        self.fisher, self.anchor, self.lam = fisher, anchor, float(lam)

    @classmethod
    def from_data(cls, model: nn.Module, reference_data: list[dict], lam: float,
                  pad_token_id: int = 0, max_length: int | None = None) -> EWC:
        """Estimate F on reference_data and anchor at the model's current trainable weights."""
        fisher = fisher_diagonal(model, reference_data, pad_token_id, max_length)
        params = dict(model.named_parameters())
        anchor = {n: params[n].detach().clone() for n in fisher}
        return cls(fisher, anchor, lam)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """A differentiable 0-dim tensor; zero at theta = theta*."""
        params = dict(model.named_parameters())
        total = None
        for n, f in self.fisher.items():
            if n not in params:
                raise ValueError(f"EWC: the model has no parameter {n!r}")
            term = (f * (params[n].float() - self.anchor[n].float()).square()).sum()
            total = term if total is None else total + term
        return 0.5 * self.lam * total


# ----------------------------------------------------------------------------- unfreezing
class GradualUnfreezing:
    """Unfreeze the trainable parameters one stage at a time, from the top (ULMFiT §3.3).

    Stages follow `layer_depth`: stage 0 is the head side (ln_f, lm_head, prompts) together
    with the top block, then each lower block, then the embeddings (with GPT-2's tied
    lm_head, the output matrix *is* wte, so it unfreezes last). Stages without a trainable
    parameter (e.g. LoRA adds none outside the blocks) are skipped, so every `every` steps
    something new is unfrozen. Only parameters trainable at construction take part;
    `restore()` makes them all trainable again.

    A frozen parameter gets no gradient, so AdamW skips it entirely: no moment update and
    no weight decay. Build the optimizer over all the trainable parameters *before* the
    first `apply`, so it already holds the ones that will be unfrozen later.
    """

    def __init__(self, model: nn.Module, every: int):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"GradualUnfreezing: every must be an integer >= 1, got {every!r}")
        self.every = every
        n_layer = num_blocks(model)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("GradualUnfreezing: the model has no trainable parameters")
        stage_of = {n: max(layer_depth(n, n_layer) - 1, 0) for n, _ in trainable}
        levels = sorted(set(stage_of.values()))
        self.stages: list[list[str]] = [[n for n, _ in trainable if stage_of[n] == lv]
                                        for lv in levels]
        self.params = dict(trainable)

    def num_unfrozen(self, step: int) -> int:
        """Stages trainable during optimizer step `step` (0-based)."""
        return min(1 + step // self.every, len(self.stages))

    def apply(self, step: int) -> list[str]:
        """Set requires_grad for `step`; returns the names unfrozen by this call (for logs)."""
        k = self.num_unfrozen(step)
        newly = []
        for i, names in enumerate(self.stages):
            for n in names:
                p = self.params[n]
                if i < k and not p.requires_grad:
                    newly.append(n)
                p.requires_grad_(i < k)
        return newly

    def restore(self) -> None:
        for p in self.params.values():
            p.requires_grad_(True)


# ----------------------------------------------------------------------------- dropout
def set_dropout(model: nn.Module, p: float) -> dict[str, float]:
    """Set GPT-2's three dropout rates (embeddings, attention probabilities, residual
    branches) of every GPT inside `model` to p; returns the previous rates by module name
    for `restore_dropout`. Dropouts of adapters (e.g. lora_dropout) keep their own rate."""
    previous = {}
    for name, m in model.named_modules():
        if isinstance(m, GPT):
            previous[f"{name}.transformer.drop"] = m.transformer.drop.p
            m.transformer.drop.p = p
        elif isinstance(m, CausalSelfAttention):
            previous[f"{name}.attn_pdrop"] = m.attn_pdrop   # a float: SDPA's dropout_p
            previous[f"{name}.resid_dropout"] = m.resid_dropout.p
            m.attn_pdrop = m.resid_dropout.p = p
        elif isinstance(m, MLP):
            previous[f"{name}.dropout"] = m.dropout.p
            m.dropout.p = p
    return previous


def restore_dropout(model: nn.Module, previous: dict[str, float]) -> None:
    for key, p in previous.items():
        owner, _, attr = key.rpartition(".")
        module = model.get_submodule(owner.lstrip("."))
        if attr == "attn_pdrop":
            module.attn_pdrop = p
        else:
            getattr(module, attr).p = p


# ----------------------------------------------------------------------------- early stopping
class EarlyStopping:
    """Stop when the validation loss has not improved by more than `min_delta` for
    `patience` evaluations in a row (the PyTorch tutorials' class):

        es = EarlyStopping(patience=3, min_delta=0.01)
        for epoch in ...:
            es(val_loss)
            if es.early_stop:
                break

    After each call, `es.improved` says whether this loss became the new `best_loss`.
    patience=None only tracks the best loss and never stops. A nan loss is no improvement.
    """

    def __init__(self, patience: int | None = 5, min_delta: float = 0.0):
        if patience is not None and (not isinstance(patience, int) or patience < 1):
            raise ValueError("EarlyStopping: patience must be None or an integer >= 1, "
                             f"got {patience!r}")
        if min_delta < 0:
            raise ValueError(f"EarlyStopping: min_delta must be >= 0, got {min_delta!r}")
        self.patience, self.min_delta = patience, float(min_delta)
        self.best_loss: float | None = None
        self.counter = 0          # evaluations since the last improvement
        self.early_stop = False
        self.improved = False

    def __call__(self, val_loss: float) -> bool:
        loss = float(val_loss)
        self.improved = math.isfinite(loss) and (self.best_loss is None
                                                 or loss < self.best_loss - self.min_delta)
        if self.improved:
            self.best_loss, self.counter = loss, 0
        else:
            self.counter += 1
        self.early_stop = self.patience is not None and self.counter >= self.patience
        return self.early_stop

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "counter": self.counter, "early_stop": self.early_stop}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.counter = state["best_loss"], state["counter"]
        self.early_stop = state["early_stop"]
