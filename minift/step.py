"""One optimizer step: the step's micro-batches -> gradients normalised by the step's target
tokens -> reduction across processes -> EWC -> non-finite guard -> clipping -> AdamW.

The normalisation is the library's headline correctness property. A step's loss is the
mean over every target token of all its micro-batches, on all processes,

    loss = (sum over micro-batches j of sum over targets t of l_jt) / N,   N = all targets,

so micro-batch j backpropagates (its mean loss) * n_j / N (`accumulate_gradients`), and the
processes sum what they hold (distributed.py). Accumulated, unaccumulated and multi-process
runs then get the same gradient. Dividing each micro-batch's mean by the number of
micro-batches instead over-weights the tokens of short micro-batches.

train.py calls `train_step` once per step; the scheduler and the logs are its business.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import nn

from .distributed import (all_reduce_sum, grad_norm, idle_pass, local,
                          microbatch_seed, reduce_gradients, to_device)
from .objectives import SFT, objective_for
from .rundir import Run, list_checkpoints


class NonFiniteError(RuntimeError):
    """A nan/inf loss or gradient with nonfinite="stop"; the message names the step and the
    batch or parameter."""


def accumulate_gradients(model: nn.Module, batches: list[dict], n_targets: int | None = None,
                         autocast: Callable = contextlib.nullcontext,
                         seeds: list[int] | None = None, objective=SFT()) -> torch.Tensor:
    """Backpropagate the mean loss over all `n_targets` target tokens of `batches` (default:
    the targets in `batches`; pass the global count when other processes hold the rest).
    Gradients add into `.grad`. Returns each micro-batch's summed (not mean) loss, (k,)
    float64, detached. `seeds[j]` seeds the RNG before micro-batch j (dropout masks).
    `objective` (objectives.py) says what a target is: a token (sft), a pair (dpo)."""
    counts = [objective.count(b) for b in batches]
    total = sum(counts) if n_targets is None else n_targets
    sums = []   # kept on the device: no synchronisation per micro-batch
    for j, (batch, n) in enumerate(zip(batches, counts)):
        if n == 0:  # its loss would be nan (0/0), and it has nothing to learn from
            sums.append(torch.zeros((), dtype=torch.float64, device=batch["labels"].device))
            continue
        if seeds is not None:
            torch.manual_seed(seeds[j])
        with autocast():
            loss = objective.loss(model, batch)                  # mean over this batch's n targets
        (loss * (n / total)).backward()                          # = its summed loss / N
        sums.append(loss.detach().double() * n)
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64)


def train_step(run: Run, step, chunk, ewc, autocast, signals, device, max_length):
    """One optimizer step on `chunk`, the step's micro-batches [(epoch, index, examples)]:
    forward/backward with token-count normalisation, gradient reduction across processes,
    EWC, the non-finite guard, clipping and the AdamW update. The scheduler is left to
    the caller. Returns (loss, grad norm, EWC penalty, input tokens, stop requested)."""
    config, model, optimizer, world = run.config, run.model, run.optimizer, run.world
    objective = objective_for(config)
    mine = chunk[run.rank::world]   # this process's share: micro-batches rank, rank + world, ...
    batches = [to_device(objective.collate(ex, config, max_length), device) for _, _, ex in mine]
    counts = all_reduce_sum(torch.tensor([sum(objective.count(b) for b in batches),
                                          sum(int(b["attention_mask"].sum()) for b in batches)],
                                         dtype=torch.float64, device=device))
    n_targets, n_tokens = int(counts[0]), int(counts[1])     # N above, over every process

    params = [p for _, p in run.trainable if p.requires_grad]
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):   # the caller's RNG is left as it was
        seeds = [microbatch_seed(config.seed, step, j) for j in range(run.rank, len(chunk), world)]
        sums = accumulate_gradients(model, batches, max(n_targets, 1), autocast, seeds, objective)
        if run.sharded and n_targets > 0:  # FSDP: as many passes as the busiest process
            passes = sum(objective.count(b) > 0 for b in batches)
            for _ in range(math.ceil(len(chunk) / world) - passes):
                idle_pass(model, device, autocast)
    # summed loss and "stop requested" of all processes, so all take the same decisions
    shared = all_reduce_sum(torch.tensor([float(sums.sum()), float(signals.signum is not None)],
                                         dtype=torch.float64, device=device))
    if world > 1 and not run.sharded:   # (FSDP has reduce-scattered them during backward)
        reduce_gradients(params)
    loss = shared[0].item() / max(n_targets, 1)

    penalty = 0.0
    if ewc is not None:  # after the reduction, so it is added exactly once
        pen = ewc.penalty(model)
        pen.backward()
        penalty = pen.item()

    grads = [p.grad for p in params if p.grad is not None]
    norm = grad_norm(grads)                                     # global L2 norm
    problem = _nonfinite_problem(step, loss, norm, sums, mine, params, run)
    if problem and config.nonfinite == "stop":
        raise NonFiniteError(f"{problem}; {_last_checkpoint_hint(run)} "
                             "(nonfinite='skip' skips such steps instead)")
    if problem:
        run.progress.say(problem + "; skipping this step (nonfinite='skip')")
        run.result.skipped_steps.append(step)
    else:
        coef = config.max_grad_norm / (norm + 1e-6) if config.max_grad_norm else 1.0
        if coef < 1.0:  # the same rule as torch.nn.utils.clip_grad_norm_
            torch._foreach_mul_([local(g) for g in grads], coef)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, norm, penalty, n_tokens, shared[1].item() > 0


def _nonfinite_problem(step, loss, norm, sums, mine, params, run) -> str | None:
    """None if loss and gradient norm are finite, else a message naming the culprit."""
    if not math.isfinite(loss):
        bad = [j for j in range(len(sums)) if not math.isfinite(sums[j].item())]
        if bad:
            e, i, _ = mine[bad[0]]
            where = f"micro-batch {bad[0]} of this process (epoch {e}, batch {i})"
        else:
            where = "a micro-batch of another process"
        return f"step {step}: the loss is {loss} on {where}"
    if not math.isfinite(norm):
        names = {id(p): n for n, p in run.trainable}
        culprit = next((names[id(p)] for p in params if p.grad is not None
                        and not bool(torch.isfinite(local(p.grad)).all())),
                       "a parameter shard of another process")
        return f"step {step}: non-finite gradient (norm {norm}) in {culprit}"
    return None


def _last_checkpoint_hint(run: Run) -> str:
    if run.out is None:
        return "no checkpoint (no output_dir)"
    found = list_checkpoints(run.out)
    return f"the last checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
