"""The training loop: accumulation, clipping, schedules, evaluation, early stopping,
signals and non-finite guards.

    result = train(model, train_data, val_data, TrainConfig(output_dir="run", max_steps=1000))

One optimizer step consumes `gradient_accumulation_steps` micro-batches of `batch_size`
examples on each of the `world_size` processes; its loss is the mean over every target
token of all of them, so accumulated, unaccumulated and multi-process runs get the same
gradient (distributed.py spells out the sum and how it is split).

Everything random in a step is a function of (seed, step, micro-batch index in the step):
the data order comes from `data.shuffled_batches(seed, epoch)` and each micro-batch runs
under its own seeded RNG (`torch.random.fork_rng`, so the caller's RNG is untouched).
A resumed run, or N processes versus one with N times the accumulation, therefore
computes the same numbers, dropout included.

SIGINT / SIGTERM finish the current step, write a checkpoint and raise TrainingInterrupted
(exit_code 130 / 143). A nan/inf loss or gradient raises NonFiniteError naming the step
and the batch or parameter (nonfinite="skip" drops that step instead).

Two neighbours do the rest: distributed.py splits a step over micro-batches and
processes (data parallel, or sharded with FSDP); rundir.py writes the run folder
(metrics, atomic checkpoints with a sha256 manifest, best/) and resumes from it.
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

from .data import DataError, collate
from .distributed import (accumulate_gradients, all_reduce_sum, barrier, broadcast_parameters,
                          choose_device, count_targets, evaluate_loss, grad_norm, idle_pass,
                          init_process_group, local, micro_batch_stream, microbatch_seed,
                          rank_world, reduce_gradients, reshard, shard_model, to_device)
from .model import GPT, compile_blocks
from .optim import (AdamW, build_param_groups, get_constant_schedule_with_warmup,
                    get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup)
from .regularize import EWC, EarlyStopping, GradualUnfreezing, restore_dropout, set_dropout
from .rundir import RUN_FILES, Progress, Run, StopSignals, list_checkpoints, prepare_output_dir

# The names the loop's users import from here, including those that live next door.
__all__ = ["TrainConfig", "train", "TrainResult", "TrainingInterrupted", "NonFiniteError",
           "make_optimizer", "total_steps", "EarlyStopping", "set_dropout", "restore_dropout",
           "evaluate_loss", "accumulate_gradients", "count_targets", "micro_batch_stream",
           "RUN_FILES", "list_checkpoints"]

SCHEDULES = ("linear", "cosine", "constant")
NONFINITE_POLICIES = ("stop", "skip")


@dataclass
class TrainConfig:
    # -- where and how to start
    output_dir: str | None = None     # checkpoints, best/, metrics.jsonl; None writes nothing
    resume: bool = False              # continue from the newest intact checkpoint in output_dir
    overwrite: bool = False           # delete a previous run's files in output_dir first
    seed: int = 0                     # data order and dropout masks
    # -- how long
    max_steps: int | None = None      # optimizer steps; when set, `epochs` is ignored
    epochs: int = 1                   # passes over train_data when max_steps is None
    # -- batches
    batch_size: int = 8               # examples per micro-batch, per process
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step, per process
    max_length: int | None = None     # truncate examples; None = the model's n_positions
    pad_token_id: int = 0             # any valid id: padding is masked out and has label -100
    # -- optimizer (AdamW, Loshchilov & Hutter 2019) and learning-rate schedule
    lr: float = 5e-5                  # full fine-tuning of GPT-2; LoRA / prompts want ~1e-3
    weight_decay: float = 0.01        # decoupled; never on biases, LayerNorm or embeddings
    adam_betas: tuple[float, float] = (0.9, 0.999)  # Adam's defaults (Kingma & Ba 2015)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # clip the global L2 norm of the gradient; None = off
    schedule: str = "linear"          # after warmup: "linear" or "cosine" decay to 0, or "constant"
    warmup_steps: int = 0             # lr rises linearly from 0 over these steps
    dropout: float | None = None      # replaces GPT-2's three dropout rates; None keeps the model's
    # -- evaluation and early stopping (needs val_data)
    eval_every: int = 100             # steps between evaluations; the last step is always evaluated
    eval_batch_size: int | None = None  # None = batch_size
    patience: int | None = None       # stop after this many evaluations without improvement
    min_delta: float = 0.0            # an improvement must lower the val loss by more than this
    restore_best: bool = False        # end with the trainable weights of the best evaluation
    # -- logging and checkpoints
    log_every: int = 10               # steps between metrics.jsonl lines (stderr lines off a TTY)
    save_every: int | None = None     # steps between checkpoints; None = eval_every
    keep_last: int = 3                # checkpoints kept (older ones deleted); best/ is kept apart
    nonfinite: str = "stop"           # on a nan/inf loss or gradient: "stop" (raise) or "skip"
    # -- regularisation (regularize.py)
    ewc_lambda: float = 0.0           # EWC strength; > 0 needs reference_data. F is small
                                      # (per-token mean loss), so useful values are ~1e4-1e6
    unfreeze_every: int | None = None  # gradual unfreezing: a block more every N steps (ULMFiT 3.3)
    layer_decay: float | None = None  # discriminative lr: lr * layer_decay**depth (ULMFiT §3.2)
    # -- speed and memory
    compile: bool = False             # torch.compile the blocks in place (model.compile_blocks)
    gradient_checkpointing: bool = False  # True sets model.gradient_checkpointing during train()
    device: str | None = None         # None: CUDA if available (cuda:LOCAL_RANK under torchrun)
    bf16: bool | None = None          # bf16 autocast; None = on where bf16 is native (most
                                      # CUDA GPUs; CPUs with AVX512-BF16 or AMX), fp32 weights
    fsdp: bool = False                # under torchrun: shard weights, gradients and AdamW state
                                      # over the processes (FSDP2, see distributed.py)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise one ValueError naming the first bad field."""
        def need(ok, name, what):
            if not ok:
                raise ValueError(f"TrainConfig.{name} {what}, got {getattr(self, name)!r}")

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        for name in ("batch_size", "gradient_accumulation_steps", "epochs", "eval_every",
                     "log_every", "keep_last"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 1, name,
                 "must be an integer >= 1")
        for name in ("max_steps", "eval_batch_size", "save_every", "patience", "unfreeze_every",
                     "max_length"):
            v = getattr(self, name)
            need(v is None or (is_int(v) and v >= 1), name, "must be None or an integer >= 1")
        need(is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps",
             "must be an integer >= 0")
        need(is_int(self.seed) and self.seed >= 0, "seed", "must be an integer >= 0")
        need(is_int(self.pad_token_id) and self.pad_token_id >= 0, "pad_token_id",
             "must be an integer >= 0")
        need(isinstance(self.lr, (int, float)) and self.lr >= 0, "lr", "must be a number >= 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "adam_betas",
             "must be two numbers in [0, 1)")
        need(self.adam_eps >= 0, "adam_eps", "must be >= 0")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm",
             "must be None or > 0")
        need(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}")
        need(self.nonfinite in NONFINITE_POLICIES, "nonfinite",
             f"must be one of {NONFINITE_POLICIES}")
        need(self.dropout is None or 0 <= self.dropout < 1, "dropout", "must be None or in [0, 1)")
        need(self.min_delta >= 0, "min_delta", "must be >= 0")
        need(self.ewc_lambda >= 0, "ewc_lambda", "must be >= 0")
        need(self.layer_decay is None or self.layer_decay > 0, "layer_decay", "must be None or > 0")
        need(not (self.resume and self.overwrite), "overwrite",
             "cannot be combined with resume=True")
        need(self.output_dir is not None or not self.resume, "resume", "needs an output_dir")
        for name, why in (("ewc_lambda", "the Fisher needs per-example gradients of whole weights"),
                          ("unfreeze_every", "changing which sharded weights train is unsupported"),
                          ("compile", "compiling sharded blocks is not supported")):
            need(not (self.fsdp and getattr(self, name)), "fsdp",
                 f"cannot be combined with {name} ({why})")


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM stopped training after a checkpoint; `exit_code` is 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


class NonFiniteError(RuntimeError):
    """A nan/inf loss or gradient with nonfinite="stop"; the message names the step and the
    batch or parameter."""


@dataclass
class TrainResult:
    step: int = 0                        # optimizer steps done
    train_loss: list[float] = field(default_factory=list)   # per step, mean per target token
    evals: list[dict] = field(default_factory=list)         # {"step", "val_loss"} per evaluation
    best_step: int | None = None
    best_val_loss: float | None = None
    skipped_steps: list[int] = field(default_factory=list)  # non-finite steps skipped
    stopped: str = ""                    # "max_steps", "epochs", "early_stopping", "callback"


def _check_examples(data, what: str, vocab_size: int | None) -> None:
    if data is None or len(data) == 0:
        raise DataError(f"{what} is empty")
    for i, ex in enumerate(data):
        if not isinstance(ex, dict) or "input_ids" not in ex:
            raise DataError(f"{what}[{i}]: expected a dict with 'input_ids' and 'labels', "
                            f"got {type(ex).__name__}")
        ids = ex["input_ids"]
        if len(ids) == 0 or len(ex.get("labels", ids)) != len(ids):
            raise DataError(f"{what}[{i}]: input_ids is empty or labels has another length")
        if vocab_size is not None and (min(ids) < 0 or max(ids) >= vocab_size):
            bad = next(t for t in ids if not 0 <= t < vocab_size)
            raise DataError(f"{what}[{i}]: token id {bad} is outside the model's vocabulary "
                            f"(vocab_size={vocab_size}); was it made with another tokenizer?")


# ----------------------------------------------------------------------------- optimizer
def make_optimizer(model: nn.Module, config: TrainConfig, num_training_steps: int):
    """AdamW over the trainable parameters, grouped by optim.build_param_groups (no decay on
    biases/LayerNorm/embeddings; layer_decay gives group lr = lr * layer_decay**depth), and
    the warmup schedule. Returns (optimizer, scheduler)."""
    groups = build_param_groups(model, config.weight_decay, lr=config.lr,
                                layer_decay=config.layer_decay)
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


# ----------------------------------------------------------------------------- the loop
def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


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
    model_config = getattr(model, "config", None)   # a GPT's or a PeftModel's GPTConfig
    vocab = getattr(model_config, "vocab_size", None)
    _check_examples(train_data, "train_data", vocab)
    if val_data is not None:
        _check_examples(val_data, "val_data", vocab)
    elif config.patience is not None or config.restore_best:
        raise ValueError("early stopping (patience) and restore_best need val_data")
    if config.ewc_lambda > 0 and not reference_data:
        raise ValueError("ewc_lambda > 0 needs reference_data (examples of the original domain)")
    if config.ewc_lambda > 0:
        _check_examples(reference_data, "reference_data", vocab)
    device, bf16 = choose_device(config.device, config.bf16)

    def autocast():
        return (torch.autocast(device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())

    init_process_group(device)   # under torchrun; left in place for the caller
    rank, world = rank_world()
    out = Path(config.output_dir) if config.output_dir else None
    was_training = model.training
    gpts = [m for m in model.modules() if isinstance(m, GPT)]
    old_checkpointing = [m.gradient_checkpointing for m in gpts]
    old_dropout = unfreezing = None
    max_length = config.max_length or getattr(model_config, "n_positions", None)
    n_steps = total_steps(len(train_data), config, world)
    progress = Progress(n_steps, config.log_every, enabled=rank == 0)
    try:
        if out is not None:
            prepare_output_dir(out, config)
        model.to(device)
        if not _trainable(model):
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        # every rank starts from rank 0's weights (e.g. a randomly initialised LoRA); before
        # sharding, as FSDP keeps each process's own rows
        broadcast_parameters([p for _, p in _trainable(model)])
        if config.fsdp and world > 1:   # in place and lasting, like compile
            shard_model(model, device)
        elif config.fsdp:
            progress.say("note: fsdp=True has no effect in a single process")
        trainable = _trainable(model)   # after sharding: FSDP replaced the parameters
        if config.dropout is not None:
            old_dropout = set_dropout(model, config.dropout)
        if config.gradient_checkpointing:
            for m in gpts:
                m.gradient_checkpointing = True
        if config.compile:   # in place and lasting: the blocks stay compiled after train()
            compile_blocks(model)
        ewc = None
        if config.ewc_lambda > 0:  # Fisher at the starting weights, before any checkpoint loads
            with autocast():
                ewc = EWC.from_data(model, reference_data, config.ewc_lambda,
                                    config.pad_token_id, max_length)
        optimizer, scheduler = make_optimizer(model, config, n_steps)
        if config.unfreeze_every is not None:  # after the optimizer: it holds every stage
            unfreezing = GradualUnfreezing(model, config.unfreeze_every)
        run = Run(model, config, optimizer, scheduler, trainable, out, progress,
                  TrainResult(), EarlyStopping(config.patience, config.min_delta))
        if config.resume:
            run.resume()
        model.train()
        with StopSignals(progress.say) as signals:
            _loop(run, train_data, val_data, n_steps, ewc, unfreezing, autocast, signals,
                  callback, device, max_length)
        progress.close()
        barrier()   # when train() returns, rank 0's files are complete
        if run.sharded:
            reshard(model)   # before restore_best writes the shards, and for the caller
        if config.restore_best:
            if run.best_state is None:
                progress.say("restore_best: no best weights to restore (no finite evaluation)")
            else:
                run.restore_best()
        return run.result
    finally:
        progress.close()   # end a \r status line before any error message
        if unfreezing is not None:
            unfreezing.restore()
        if old_dropout is not None:
            restore_dropout(model, old_dropout)
        for m, flag in zip(gpts, old_checkpointing):
            m.gradient_checkpointing = flag
        model.train(was_training)


def _loop(run: Run, train_data, val_data, n_steps, ewc, unfreezing, autocast, signals,
          callback, device, max_length) -> None:
    config, model, optimizer, result = run.config, run.model, run.optimizer, run.result
    per_step = config.gradient_accumulation_steps * run.world
    stream = micro_batch_stream(train_data, config.batch_size, config.seed, run.epoch, run.batch,
                                None if config.max_steps is not None else config.epochs)
    save_every = config.save_every or config.eval_every
    batches_per_epoch = math.ceil(len(train_data) / config.batch_size)
    eval_batch = config.eval_batch_size or config.batch_size
    t_start, steps_here = time.perf_counter(), 0
    window_tokens, window_start = 0, t_start      # throughput since the last log line
    if result.step >= n_steps or run.es.early_stop:   # a finished run was resumed
        result.stopped = "early_stopping" if run.es.early_stop else "max_steps"
        return

    while result.step < n_steps:
        step = result.step + 1                     # 1-based number of this step
        if unfreezing is not None:
            newly = unfreezing.apply(step - 1)
            if newly and step > 1:
                run.progress.say(f"step {step}: unfreezing {len(newly)} more tensors, "
                                 f"e.g. {newly[0]}")
        chunk = list(itertools.islice(stream, per_step))
        if not chunk:
            result.stopped = "epochs"
            break
        run.epoch, run.batch = chunk[-1][0], chunk[-1][1] + 1
        loss, norm, penalty, n_tokens, stop_requested = _train_step(
            run, step, chunk, ewc, autocast, signals, device, max_length)
        lr = max(g["lr"] for g in optimizer.param_groups)   # the top group's: lr * schedule
        run.scheduler.step()
        result.step = step
        result.train_loss.append(loss)
        steps_here += 1

        # -- progress, metrics
        window_tokens += n_tokens
        now = time.perf_counter()
        tokens_per_s = window_tokens / max(now - window_start, 1e-9)
        eta = (now - t_start) / steps_here * (n_steps - step)
        run.progress.update(step, loss, lr, tokens_per_s, eta)
        epoch = run.epoch + run.batch / batches_per_epoch   # 1.5 = half-way through the 2nd
        record = {"step": step, "epoch": round(epoch, 4), "loss": loss, "lr": lr, "grad_norm": norm}
        if ewc is not None:
            record["ewc_penalty"] = penalty
        if step % config.log_every == 0 or step == n_steps:
            since = result.train_loss[(step - 1) // config.log_every * config.log_every:]
            run.log({"event": "train", **record, "tokens_per_s": tokens_per_s,
                     "loss": sum(since) / len(since)})              # mean since the last line
            window_tokens, window_start = 0, now

        # -- evaluation, early stopping
        evaluated = val_data is not None and (step % config.eval_every == 0 or step == n_steps)
        if evaluated:
            val_loss = evaluate_loss(model, val_data, eval_batch, config.pad_token_id, max_length,
                                     autocast, run.rank, run.world)
            run.es(val_loss)
            result.evals.append({"step": step, "val_loss": val_loss})
            if run.es.improved:
                result.best_step, result.best_val_loss = step, val_loss
                run.save_best(val_loss)
            record["val_loss"] = val_loss
            run.log({"event": "eval", "step": step, "val_loss": val_loss,
                     "best_val_loss": run.es.best_loss})
            run.progress.say(f"step {step}: val_loss {val_loss:.4f}"
                             + (" (best)" if run.es.improved else ""))
            if run.es.early_stop:
                result.stopped = "early_stopping"
                run.progress.say(f"early stopping: no improvement in {run.es.counter} evaluations")

        if callback is not None and callback(dict(record)) is True:
            result.stopped = "callback"
        if stop_requested or result.stopped or step % save_every == 0 or step == n_steps:
            run.save()
        if stop_requested:
            signum = signals.signum or signal.SIGTERM
            where = (f"checkpoint written to {run.out / 'checkpoints' / f'step-{step:06d}'}; "
                     f"continue with resume=True (from a shell: minift finetune --resume {run.out})"
                     if run.out is not None else "no output_dir, so nothing was saved")
            run.progress.close()
            raise TrainingInterrupted(f"training interrupted by {signal.Signals(signum).name} "
                                      f"after step {step}; {where}", signum)
        if result.stopped:
            break
    else:
        result.stopped = "max_steps" if config.max_steps is not None else "epochs"
    run.save()   # no-op if this step is saved already


def _train_step(run: Run, step, chunk, ewc, autocast, signals, device, max_length):
    """One optimizer step on `chunk`, the step's micro-batches [(epoch, index, examples)]:
    forward/backward with token-count normalisation, gradient reduction across processes,
    EWC, the non-finite guard, clipping and the AdamW update. The scheduler is left to
    the caller. Returns (loss, grad norm, EWC penalty, input tokens, stop requested)."""
    config, model, optimizer, world = run.config, run.model, run.optimizer, run.world
    mine = chunk[run.rank::world]   # this process's share: micro-batches rank, rank + world, ...
    batches = [to_device(collate(ex, config.pad_token_id, max_length), device) for _, _, ex in mine]
    counts = all_reduce_sum(torch.tensor([sum(count_targets(b) for b in batches),
                                          sum(int(b["attention_mask"].sum()) for b in batches)],
                                         dtype=torch.float64, device=device))
    n_targets, n_tokens = int(counts[0]), int(counts[1])

    params = [p for _, p in run.trainable if p.requires_grad]
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):   # the caller's RNG is left as it was
        seeds = [microbatch_seed(config.seed, step, j) for j in range(run.rank, len(chunk), world)]
        sums = accumulate_gradients(model, batches, max(n_targets, 1), autocast, seeds)
        if run.sharded and n_targets > 0:  # FSDP: as many passes as the busiest process
            passes = sum(count_targets(b) > 0 for b in batches)
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
