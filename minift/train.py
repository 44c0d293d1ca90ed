"""The training loop: accumulation, clipping, schedules, evaluation, early stopping,
signals and non-finite guards.

    result = train(model, train_data, val_data, TrainConfig(output_dir="run", max_steps=1000))

TrainConfig (config.py) holds every option, with its help text.

One optimizer step consumes `gradient_accumulation_steps` micro-batches of `batch_size`
examples on each of the `world_size` processes; its loss is the mean over every target
token of all of them, so accumulated, unaccumulated and multi-process runs get the same
gradient (step.py spells out the sum; distributed.py how it is split).

Everything random in a step is a function of (seed, step, micro-batch index in the step):
the data order comes from `data.shuffled_batches(seed, epoch)` and each micro-batch runs
under its own seeded RNG (`torch.random.fork_rng`, so the caller's RNG is untouched).
A resumed run, or N processes versus one with N times the accumulation, therefore
computes the same numbers, dropout included.

SIGINT / SIGTERM finish the current step, write a checkpoint and raise TrainingInterrupted
(exit_code 130 / 143). A nan/inf loss or gradient raises NonFiniteError naming the step
and the batch or parameter (nonfinite="skip" drops that step instead).

Three neighbours do the rest: step.py is one optimizer step (where accumulation is
normalised by the step's target tokens, then clipping, EWC and the update); distributed.py
splits a step over processes (data parallel, or sharded with FSDP) and evaluates;
rundir.py writes the run folder (metrics, atomic checkpoints with a sha256 manifest,
best/) and resumes from it.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import TrainConfig
from .distributed import (barrier, broadcast_parameters, choose_device,
                          init_process_group, micro_batch_stream, rank_world, reshard, shard_model)
from .model import GPT, compile_blocks
from .objectives import SFT, objective_for
from .optim import (AdamW, build_param_groups, get_constant_schedule_with_warmup,
                    get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup)
from .regularize import EWC, EarlyStopping, GradualUnfreezing, restore_dropout, set_dropout
from .rundir import Progress, Run, StopSignals, prepare_output_dir
from .step import train_step
from .trackers import config_dict, finish_all, open_trackers


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM stopped training after a checkpoint; `exit_code` is 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


@dataclass
class TrainResult:
    step: int = 0                        # optimizer steps done
    train_loss: list[float] = field(default_factory=list)   # per step, mean per target token
    evals: list[dict] = field(default_factory=list)         # {"step", "val_loss"} per evaluation
    best_step: int | None = None
    best_val_loss: float | None = None
    skipped_steps: list[int] = field(default_factory=list)  # non-finite steps skipped
    stopped: str = ""                    # "max_steps", "epochs", "early_stopping", "callback"


# ----------------------------------------------------------------------------- optimizer
def make_optimizer(model: nn.Module, config: TrainConfig, num_training_steps: int):
    """AdamW over the trainable parameters, grouped by optim.build_param_groups (no decay on
    biases/LayerNorm/embeddings; layer_decay gives group lr = lr * layer_decay**depth), and
    the warmup schedule. Returns (optimizer, scheduler)."""
    groups = build_param_groups(model, config.weight_decay, lr=config.lr,
                                layer_decay=config.layer_decay,
                                loraplus_lr_ratio=config.loraplus_lr_ratio)
    if not groups:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    optimizer = AdamW(groups, lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps,
                      weight_decay=config.weight_decay)
    warmup = config.warmup_steps
    if config.schedule == "constant":
        return optimizer, get_constant_schedule_with_warmup(optimizer, warmup)
    if config.schedule == "cosine":
        return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, num_training_steps)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, num_training_steps)


def total_steps(n_examples: int, config: TrainConfig, world_size: int = 1) -> int:
    if config.max_steps is not None:
        return config.max_steps
    per_step = config.gradient_accumulation_steps * world_size      # micro-batches per step
    return math.ceil(config.epochs * math.ceil(n_examples / config.batch_size) / per_step)


# ----------------------------------------------------------------------------- train()
def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def check_inputs(model: nn.Module, train_data, val_data=None, config: TrainConfig | None = None,
                 reference_data=None) -> None:
    """What train() checks before it writes anything in output_dir: the data's shape, the
    options that need val_data or reference_data, trainable parameters, and packing against
    the model's method. Public so that a caller with files of its own (the CLI) can fail
    before it touches them too."""
    config = config or TrainConfig()
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)  # GPT's or PeftModel's
    objective = objective_for(config)   # what an example looks like (objectives.py)
    objective.check(train_data, "train_data", vocab)
    if val_data is not None:
        objective.check(val_data, "val_data", vocab)
    elif config.patience is not None or config.restore_best:
        raise ValueError("early stopping (patience) and restore_best need val_data")
    if config.ewc_lambda > 0 and not reference_data:
        raise ValueError("ewc_lambda > 0 needs reference_data (examples of the original domain)")
    if config.ewc_lambda > 0:
        SFT().check(reference_data, "reference_data", vocab)
    if not _trainable(model):
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    if config.packing and getattr(model, "is_prompt_learning", False):
        # (the forward refuses them too, but only once the run folder is written)
        raise ValueError(f"{model.peft_config.peft_type}: packed rows (segment_ids) are not "
                         "supported with virtual tokens, which only a row's first example would "
                         "see; train with packing=False")


def _autocast_for(device: torch.device, bf16: bool) -> Callable:
    """A factory of the forward passes' autocast context (bf16 matmuls, fp32 weights)."""
    if bf16:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def train(model: nn.Module, train_data, val_data=None, config: TrainConfig | None = None, *,
          reference_data=None, callback: Callable[[dict], bool | None] | None = None
          ) -> TrainResult:
    """Fine-tune `model` in place on `train_data` (a list of {"input_ids", "labels"}).

    model: a GPT, a PEFT-wrapped GPT or any module with GPT's forward; only parameters with
    requires_grad=True are trained, checkpointed and reduced across processes.
    val_data: evaluated every `eval_every` steps and at the end (needed for early stopping
    and restore_best). reference_data: examples of the pre-training domain, for EWC's Fisher.
    callback(record): called after every step with {"step", "loss", "lr", "grad_norm", ...
    "val_loss" when evaluated}; return True to stop (a checkpoint is written).

    Under torchrun (WORLD_SIZE > 1) it joins the process group (gloo on CPU, nccl on CUDA;
    the group stays for the rest of the process) and trains data-parallel, or sharded with
    fsdp=True (the model then stays sharded); rank 0 writes the files. The model's
    training/eval mode, dropout rates, gradient-checkpointing flag and requires_grad flags
    are restored at the end; its trainable weights are the result.
    """
    config = config or TrainConfig()
    config.validate()
    check_inputs(model, train_data, val_data, config, reference_data)   # before any file
    device, bf16 = choose_device(config.device, config.bf16)
    autocast = _autocast_for(device, bf16)
    init_process_group(device)   # under torchrun; left in place for the caller
    rank, world = rank_world()
    n_steps = total_steps(len(train_data), config, world)
    progress = Progress(n_steps, config.log_every, enabled=rank == 0)
    max_length = config.max_length or getattr(getattr(model, "config", None), "n_positions", None)
    # DPO: the reference log-probs, once, before any checkpoint is resumed (objectives.py)
    objective = objective_for(config)
    train_data = objective.prepare(model.to(device), train_data, config)
    val_data = objective.prepare(model, val_data, config)
    with contextlib.ExitStack() as undo:   # restores the model's settings, even on errors
        undo.callback(progress.close)      # (runs first: ends a \r status line before errors)
        run, ewc, unfreezing = _prepare(model, config, device, autocast, progress, max_length,
                                        reference_data, undo)
        model.train()
        with StopSignals(progress.say) as signals:
            _loop(_Loop(run, train_data, val_data, n_steps, max_length, device, autocast, ewc,
                        unfreezing, signals, callback))
        progress.close()
        barrier()   # when train() returns, rank 0's files are complete
        if run.sharded:
            reshard(model)   # before restore_best writes the shards, and for the caller
        if config.restore_best:
            if run.best_state is None:
                progress.say("restore_best: no best weights to restore (no finite evaluation)")
            else:
                run.restore_best()
        r = run.result
        run.summary.update(steps=r.step, train_loss=r.train_loss[-1] if r.train_loss else None,
                           best_step=r.best_step, best_val_loss=r.best_val_loss)
        return r


def _prepare(model, config: TrainConfig, device, autocast, progress, max_length, reference_data,
             undo: contextlib.ExitStack):
    """Put the model on its device, shard, set dropout / checkpointing / compile, compute EWC's
    Fisher, build the optimizer and resume. Each temporary change pushes its undo on `undo`.
    Returns (run, ewc or None, unfreezing or None)."""
    out = Path(config.output_dir) if config.output_dir else None
    undo.callback(model.train, model.training)
    gpts = [m for m in model.modules() if isinstance(m, GPT)]
    undo.callback(_set_checkpointing, gpts, [m.gradient_checkpointing for m in gpts])
    if out is not None:
        prepare_output_dir(out, config)
    trackers, opened = open_trackers(config.report_to, out) if rank_world()[0] == 0 else ([], [])
    summary: dict = {}   # run.summary, filled at the end; the trackers opened here get it
    undo.callback(finish_all, opened, summary)
    for t in trackers:
        t.log_config(config_dict(config))
    model.to(device)
    # every rank starts from rank 0's weights (e.g. a randomly initialised LoRA); before
    # sharding, as FSDP keeps each process's own rows
    broadcast_parameters([p for _, p in _trainable(model)])
    if config.fsdp and rank_world()[1] > 1:   # in place and lasting, like compile
        shard_model(model, device)
    elif config.fsdp:
        progress.say("note: fsdp=True has no effect in a single process")
    trainable = _trainable(model)   # after sharding: FSDP replaced the parameters
    if config.dropout is not None:
        undo.callback(restore_dropout, model, set_dropout(model, config.dropout))
    if config.gradient_checkpointing:
        _set_checkpointing(gpts, [True] * len(gpts))
    if config.compile:   # in place and lasting: the blocks stay compiled after train()
        compile_blocks(model)
    ewc = unfreezing = None
    if config.ewc_lambda > 0:  # Fisher at the starting weights, before any checkpoint loads
        with autocast():
            ewc = EWC.from_data(model, reference_data, config.ewc_lambda,
                                config.pad_token_id, max_length)
    optimizer, scheduler = make_optimizer(model, config, progress.total)  # total: n_steps
    if config.unfreeze_every is not None:  # after the optimizer: it holds every stage
        unfreezing = GradualUnfreezing(model, config.unfreeze_every)
        undo.callback(unfreezing.restore)
    run = Run(model, config, optimizer, scheduler, trainable, out, progress,
              TrainResult(), EarlyStopping(config.patience, config.min_delta))
    run.trackers, run.summary = trackers, summary
    if config.resume:
        run.resume()
    return run, ewc, unfreezing


def _set_checkpointing(gpts: list[GPT], flags: list[bool]) -> None:
    for m, flag in zip(gpts, flags):
        m.gradient_checkpointing = flag


# ----------------------------------------------------------------------------- the loop
@dataclass
class _Loop:
    """What the loop needs besides the Run's state: the data, the budget, the optional parts."""
    run: Run
    train_data: list
    val_data: list | None
    n_steps: int
    max_length: int | None
    device: torch.device
    autocast: Callable
    ewc: EWC | None
    unfreezing: GradualUnfreezing | None
    signals: StopSignals
    callback: Callable[[dict], bool | None] | None


class _Throughput:
    """Input tokens per second since the last log line, and the ETA from this call's steps."""

    def __init__(self, n_steps: int):
        self.n_steps, self.steps, self.tokens = n_steps, 0, 0
        self.start = self.window_start = time.perf_counter()

    def tick(self, step: int, n_tokens: int) -> tuple[float, float]:
        """After step `step` of n_tokens input tokens -> (tokens per second, ETA in seconds)."""
        self.steps, self.tokens = self.steps + 1, self.tokens + n_tokens
        self.now = time.perf_counter()
        tokens_per_s = self.tokens / max(self.now - self.window_start, 1e-9)
        return tokens_per_s, (self.now - self.start) / self.steps * (self.n_steps - step)

    def new_window(self) -> None:
        self.tokens, self.window_start = 0, self.now


def _loop(lp: _Loop) -> None:
    run, config, result = lp.run, lp.run.config, lp.run.result
    per_step = config.gradient_accumulation_steps * run.world
    stream = micro_batch_stream(lp.train_data, config.batch_size, config.seed, run.epoch,
                                run.batch, None if config.max_steps is not None else config.epochs)
    save_every = config.save_every or config.eval_every
    clock = _Throughput(lp.n_steps)
    if result.step >= lp.n_steps or run.es.early_stop:   # a finished run was resumed
        result.stopped = "early_stopping" if run.es.early_stop else "max_steps"
        return

    while result.step < lp.n_steps:
        step = result.step + 1                     # 1-based number of this step
        if lp.unfreezing is not None:
            newly = lp.unfreezing.apply(step - 1)
            if newly and step > 1:
                run.progress.say(f"step {step}: unfreezing {len(newly)} more tensors, "
                                 f"e.g. {newly[0]}")
        chunk = list(itertools.islice(stream, per_step))
        if not chunk:
            result.stopped = "epochs"
            break
        run.epoch, run.batch = chunk[-1][0], chunk[-1][1] + 1
        loss, norm, penalty, n_tokens, stop_requested = train_step(
            run, step, chunk, lp.ewc, lp.autocast, lp.signals, lp.device, lp.max_length)
        lr = max(g["lr"] for g in run.optimizer.param_groups)   # the top group's: lr * schedule
        run.scheduler.step()
        result.step = step
        result.train_loss.append(loss)
        record = _log_step(lp, clock, step, loss, lr, norm, penalty, n_tokens)
        if lp.val_data is not None and (step % config.eval_every == 0 or step == lp.n_steps):
            record["val_loss"] = _evaluate(lp, step)
        if lp.callback is not None and lp.callback(dict(record)) is True:
            result.stopped = "callback"
        if stop_requested or result.stopped or step % save_every == 0 or step == lp.n_steps:
            run.save()
        if stop_requested:
            _interrupted(lp, step)
        if result.stopped:
            break
    else:
        result.stopped = "max_steps" if config.max_steps is not None else "epochs"
    run.save()   # no-op if this step is saved already


def _log_step(lp: _Loop, clock: _Throughput, step, loss, lr, norm, penalty, n_tokens) -> dict:
    """The progress line, and a metrics.jsonl line every log_every steps; returns the step's
    record for the callback."""
    run, config = lp.run, lp.run.config
    tokens_per_s, eta = clock.tick(step, n_tokens)
    run.progress.update(step, loss, lr, tokens_per_s, eta)
    epoch = run.epoch + run.batch / math.ceil(len(lp.train_data) / config.batch_size)
    record = {"step": step, "epoch": round(epoch, 4), "loss": loss, "lr": lr, "grad_norm": norm}
    if lp.ewc is not None:                            # (epoch 1.5 = half-way through the 2nd)
        record["ewc_penalty"] = penalty
    if step % config.log_every == 0 or step == lp.n_steps:
        since = run.result.train_loss[(step - 1) // config.log_every * config.log_every:]
        run.log({"event": "train", **record, "tokens_per_s": tokens_per_s,
                 "loss": sum(since) / len(since)})              # mean since the last line
        clock.new_window()
    return record


def _evaluate(lp: _Loop, step: int) -> float:
    """Validation loss, early stopping's bookkeeping and best/; returns the loss."""
    run, config, result = lp.run, lp.run.config, lp.run.result
    val_loss, metrics = objective_for(config).evaluate(run.model, lp.val_data, config,
                                                       lp.max_length, lp.autocast, run.rank,
                                                       run.world)   # DPO: reward accuracy, margin
    run.es(val_loss)
    result.evals.append({"step": step, "val_loss": val_loss})
    if run.es.improved:
        result.best_step, result.best_val_loss = step, val_loss
        run.save_best(val_loss)
    run.log({"event": "eval", "step": step, "val_loss": val_loss, **metrics,
             "best_val_loss": run.es.best_loss})
    run.progress.say(f"step {step}: val_loss {val_loss:.4f}"
                     + (" (best)" if run.es.improved else ""))
    if run.es.early_stop:
        result.stopped = "early_stopping"
        run.progress.say(f"early stopping: no improvement in {run.es.counter} evaluations")
    return val_loss


def _interrupted(lp: _Loop, step: int):
    """SIGINT / SIGTERM arrived during `step`, whose checkpoint is written: stop."""
    run = lp.run
    signum = lp.signals.signum or signal.SIGTERM
    where = (f"checkpoint written to {run.out / 'checkpoints' / f'step-{step:06d}'}; "
             f"continue with resume=True (from a shell: minift finetune --resume {run.out})"
             if run.out is not None else "no output_dir, so nothing was saved")
    run.progress.close()
    raise TrainingInterrupted(f"training interrupted by {signal.Signals(signum).name} "
                              f"after step {step}; {where}", signum)
