"""The training loop: accumulation, clipping, schedules, evaluation, early stopping,
checkpoints and resume, signals, non-finite guards and data-parallel training.

    result = train(model, train_data, val_data, TrainConfig(output_dir="run", max_steps=1000))

One optimizer step consumes `gradient_accumulation_steps` micro-batches of `batch_size`
examples on each of the `world_size` processes. Its loss is the mean over every target
token of all of them,

    loss = (sum over micro-batches j of sum over targets t of l_jt) / N,   N = all targets,

so micro-batch j backpropagates (its mean loss) * n_j / N. Accumulated, unaccumulated and
multi-process runs then get the same gradient. (Dividing each micro-batch mean by the
number of micro-batches instead over-weights tokens of short micro-batches.)

Everything random in a step is a function of (seed, step, micro-batch index in the step):
the data order comes from `data.shuffled_batches(seed, epoch)` and each micro-batch runs
under its own seeded RNG (`torch.random.fork_rng`, so the caller's RNG is untouched).
A resumed run, or N processes versus one with N times the accumulation, therefore
computes the same numbers, dropout included.

Data-parallel (under torchrun, WORLD_SIZE > 1): process r takes micro-batches r, r + world,
... of each step; the target count and summed loss are all-reduced, and the gradients of
the trainable parameters are summed by one all_reduce over a flat buffer. There is no DDP
wrapper, so frozen parameters and a trainable set that changes (gradual unfreezing) need
no special care; the price is no overlap of communication with the backward pass. Every
rank reads a checkpoint on resume, so output_dir must be on a filesystem all ranks see.

SIGINT / SIGTERM finish the current step, write a checkpoint and raise TrainingInterrupted
(exit_code 130 / 143). A nan/inf loss or gradient raises NonFiniteError naming the step
and the batch or parameter (nonfinite="skip" drops that step instead).

Files in `output_dir` (rank 0 writes, other ranks only read):
    run.json                  the config of the run (marks the folder as a run)
    metrics.jsonl             one JSON object per log / eval event
    checkpoints/step-000100/  trainable.safetensors, optimizer.pt, rng.safetensors,
                              state.json, and manifest.json (sha256 of each file)
    best/                     trainable.safetensors + state.json of the best evaluation
Each checkpoint is written into a temporary folder, fsynced, then renamed into place, so a
crash leaves either the whole checkpoint or none; the manifest catches later damage, and
resume then falls back to the previous checkpoint. optimizer.pt holds only tensors and
plain containers and is read with `torch.load(weights_only=True)`: nothing is unpickled.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from .data import IGNORE_INDEX, DataError, collate, shuffled_batches
from .model import GPT, MLP, CausalSelfAttention, compile_blocks
from .optim import (AdamW, build_param_groups, get_constant_schedule_with_warmup,
                    get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup)
from .regularize import EWC, GradualUnfreezing

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
    bf16: bool | None = None          # bf16 autocast; None = on for CUDA devices that support it

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


# ----------------------------------------------------------------------------- model switches
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


# ----------------------------------------------------------------------------- batches
def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Target tokens of a collated batch: labels after the shift that are not -100."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def micro_batch_stream(data, batch_size: int, seed: int, epoch: int = 0, index: int = 0,
                       epochs: int | None = None):
    """Yield (epoch, index, examples) from position (epoch, index) on, epoch after epoch;
    `epochs` epochs in all, or forever with None. Each epoch's order is fixed by (seed, epoch)."""
    while epochs is None or epoch < epochs:
        for i, examples in enumerate(shuffled_batches(data, batch_size, seed, epoch, start=index),
                                     start=index):
            yield epoch, i, examples
        epoch, index = epoch + 1, 0


def accumulate_gradients(model: nn.Module, batches: list[dict], n_targets: int | None = None,
                         autocast: Callable = contextlib.nullcontext,
                         seeds: list[int] | None = None) -> torch.Tensor:
    """Backpropagate the mean loss over all `n_targets` target tokens of `batches` (default:
    the targets in `batches`; pass the global count when other processes hold the rest).
    Gradients add into `.grad`. Returns each micro-batch's summed (not mean) loss, (k,)
    float64, detached. `seeds[j]` seeds the RNG before micro-batch j (dropout masks)."""
    counts = [count_targets(b) for b in batches]
    total = sum(counts) if n_targets is None else n_targets
    sums = []   # kept on the device: no synchronisation per micro-batch
    for j, (batch, n) in enumerate(zip(batches, counts)):
        if n == 0:  # its loss would be nan (0/0), and it has nothing to learn from
            sums.append(torch.zeros((), dtype=torch.float64, device=batch["labels"].device))
            continue
        if seeds is not None:
            torch.manual_seed(seeds[j])
        with autocast():
            loss = model(**batch, return_logits=False).loss      # mean over this batch's n targets
        (loss * (n / total)).backward()                          # = its summed loss / N
        sums.append(loss.detach().double() * n)
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64)


@torch.no_grad()
def evaluate_loss(model: nn.Module, data, batch_size: int = 8, pad_token_id: int = 0,
                  max_length: int | None = None, autocast: Callable = contextlib.nullcontext,
                  rank: int = 0, world_size: int = 1) -> float:
    """Mean loss per target token over the whole of `data` (eval mode, no gradients).
    With world_size > 1 each rank takes every world_size-th batch and the sums are reduced."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    acc = torch.zeros(2, dtype=torch.float64, device=device)   # (summed loss, targets)
    try:
        for b, i in enumerate(range(0, len(data), batch_size)):
            if b % world_size != rank:
                continue
            batch = _to(collate(list(data[i:i + batch_size]), pad_token_id, max_length), device)
            n = count_targets(batch)
            if n:
                with autocast():
                    acc[0] += model(**batch, return_logits=False).loss.double() * n
                acc[1] += n
    finally:
        model.train(was_training)
    if world_size > 1:
        dist.all_reduce(acc)
    return (acc[0] / acc[1]).item() if acc[1] > 0 else float("nan")


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _microbatch_seed(seed: int, step: int, j: int) -> int:
    return ((seed * 1_000_003 + step) * 65_537 + j) % 2**63


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


# ----------------------------------------------------------------------------- distributed
def _init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); True if we created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _reduce_gradients(params: list[nn.Parameter]) -> None:
    """Sum the gradients of `params` over all processes with one all_reduce of a flat
    buffer (what DDP does, without its bucketing/overlap, and without wrapping the model,
    so frozen parameters and changing trainable sets need no special care). A parameter
    gets a gradient if any process has one, so AdamW skips it exactly as in one process."""
    like = params[0]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params]
                     + [torch.tensor([float(p.grad is not None) for p in params],
                                     dtype=like.dtype, device=like.device)])
    dist.all_reduce(flat)
    offset = 0
    has_grad = flat[-len(params):]
    for k, p in enumerate(params):
        g = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        p.grad = g.clone() if has_grad[k] > 0 else None


# ----------------------------------------------------------------------------- files
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some platforms/filesystems cannot fsync a folder
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def write_checkpoint_dir(final: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Atomically create `final` holding one file per writer, plus manifest.json (sha256 of
    each file, written last): write into a temporary folder, fsync, rename into place."""
    tmp = final.with_name(f".tmp-{final.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    manifest = {}
    for name, write in writers.items():
        write(tmp / name)
        _fsync(tmp / name)
        manifest[name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
    _write_json(tmp / "manifest.json", {"files": manifest})
    _fsync(tmp / "manifest.json")
    _fsync(tmp)
    old = final.with_name(f".old-{final.name}")
    if final.exists():  # replacing (e.g. best/): move the old one aside, then swap
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync(final.parent)
    if old.exists():
        shutil.rmtree(old)


def verify_checkpoint_dir(folder: Path) -> str | None:
    """None if every file matches manifest.json, else what is wrong."""
    try:
        files = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return "manifest.json is missing (the checkpoint was not finished)"
    except (ValueError, KeyError, TypeError) as e:
        return f"manifest.json is unreadable ({e})"
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, expected {meta['bytes']} (truncated?)"
        if _sha256(path) != meta["sha256"]:
            return f"{name} does not match its sha256 (corrupted)"
    return None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first (temporary folders are ignored)."""
    folder = Path(output_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step-*")
             if p.is_dir() and (m := _STEP_DIR.match(p.name))] if folder.is_dir() else []
    return [p for _, p in sorted(found)]


RUN_FILES = ("run.json", "metrics.jsonl", "checkpoints", "best")


def _check_output_dir(out: Path, config: TrainConfig) -> None:
    if any((out / f).exists() for f in RUN_FILES) and not (config.resume or config.overwrite):
        raise ValueError(f"{out} already holds a training run; pass resume=True to continue it "
                         "or overwrite=True to start again (this deletes its checkpoints)")


def _prepare_output_dir(out: Path, config: TrainConfig, rank: int) -> None:
    if rank == 0:
        if config.overwrite:
            for f in RUN_FILES:
                path = out / f
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "run.json").exists():
            _write_json(out / "run.json", {"config": asdict(config)})


# ----------------------------------------------------------------------------- signals, progress
class _StopSignals:
    """While active, SIGINT/SIGTERM only set `self.signum`; training checks it after each
    step. A second SIGINT (Ctrl-C twice) aborts at once; further SIGTERMs are ignored
    (torchrun forwards a SIGTERM after the terminal's SIGINT; a scheduler that loses
    patience sends SIGKILL anyway). The previous handlers come back on exit."""

    def __init__(self, say: Callable[[str], None]):
        self.signum, self.say, self.previous = None, say, {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt("second SIGINT: aborting without a checkpoint")
            return
        self.signum = signum
        self.say(f"\n{signal.Signals(signum).name} received: finishing this step and writing a "
                 "checkpoint (send it again to abort at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals are main-thread only
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class _Progress:
    """One status line on stderr: rewritten with \\r on a terminal, a plain line every
    log_every steps otherwise (logs, CI). Silent when disabled (ranks > 0)."""

    def __init__(self, total: int, log_every: int, enabled: bool):
        self.total, self.log_every, self.enabled = total, log_every, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.pending_cr = False

    def say(self, message: str) -> None:
        if self.enabled:
            if self.pending_cr:
                sys.stderr.write("\n")
                self.pending_cr = False
            print(message.lstrip("\n"), file=sys.stderr, flush=True)

    def update(self, step, loss, lr, tokens_per_s, eta_s) -> None:
        if not self.enabled or not (self.tty or step % self.log_every == 0 or step == self.total):
            return
        eta = time.strftime("%H:%M:%S", time.gmtime(eta_s)) if math.isfinite(eta_s) else "?"
        line = (f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.3g} | "
                f"{tokens_per_s:,.0f} tok/s | ETA {eta}")
        if self.tty:
            sys.stderr.write("\r" + line.ljust(78))
            sys.stderr.flush()
            self.pending_cr = True
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.pending_cr:
            sys.stderr.write("\n")
            self.pending_cr = False


# ----------------------------------------------------------------------------- the loop
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


class _Run:
    """The mutable state of one training run and the files that record it."""

    def __init__(self, model, config, optimizer, scheduler, trainable, out, rank, progress):
        self.model, self.config = model, config
        self.optimizer, self.scheduler = optimizer, scheduler
        self.trainable = trainable                    # [(name, param)] at the start of train()
        self.out, self.rank, self.progress = out, rank, progress
        self.epoch, self.batch = 0, 0                 # position of the next micro-batch
        self.result = TrainResult()
        self.es = EarlyStopping(config.patience, config.min_delta)
        self.best_state: dict[str, torch.Tensor] | None = None   # CPU copy, for restore_best
        self.last_saved = -1

    # -- files (rank 0 only)
    def log(self, record: dict) -> None:
        if self.out is not None and self.rank == 0:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.trainable}

    def save(self) -> None:
        step = self.result.step
        if self.out is None or self.last_saved == step:
            return
        self.last_saved = step
        if self.rank != 0:
            return
        # train() draws its own randomness from per-micro-batch seeds (inside fork_rng), so
        # it needs no RNG state; the process's RNG states are saved and restored so that a
        # resumed process continues the caller's random streams as an uninterrupted one would.
        state = {"step": step, "epoch": self.epoch, "batch": self.batch,
                 "early_stopping": self.es.state_dict(), "result": asdict(self.result),
                 "python_rng": random.getstate(),   # (version, tuple of ints, gauss): JSON-able
                 "world_size": _rank_world()[1], "config": asdict(self.config)}
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        write_checkpoint_dir(self.out / "checkpoints" / f"step-{step:06d}", {
            "trainable.safetensors": lambda p: save_file(self._weights(), str(p)),
            "optimizer.pt": lambda p: torch.save({"optimizer": self.optimizer.state_dict(),
                                                  "scheduler": self.scheduler.state_dict()}, p),
            "rng.safetensors": lambda p: save_file(rng, str(p)),
            "state.json": lambda p: _write_json(p, state),
        })
        for old in list_checkpoints(self.out)[:-self.config.keep_last]:
            shutil.rmtree(old)

    def save_best(self, val_loss: float) -> None:
        if self.config.restore_best:
            self.best_state = {n: p.detach().to("cpu", copy=True) for n, p in self.trainable}
        if self.out is not None and self.rank == 0:
            info = {"step": self.result.step, "val_loss": val_loss}
            write_checkpoint_dir(self.out / "best", {
                "trainable.safetensors": lambda p: save_file(self._weights(), str(p)),
                "state.json": lambda p: _write_json(p, info)})

    # -- resume
    def resume(self) -> None:
        """Load the newest intact checkpoint; damaged ones are reported and skipped."""
        damaged = []
        for folder in reversed(list_checkpoints(self.out)):
            problem = verify_checkpoint_dir(folder)
            if problem is None:
                return self._load(folder)
            damaged.append(folder)
            self.progress.say(f"checkpoint {folder} is damaged: {problem}")
        if damaged:
            raise ValueError(f"{self.out}: no intact checkpoint to resume from "
                             f"({len(damaged)} damaged); start again with overwrite=True")
        self.progress.say(f"{self.out}: no checkpoint yet, starting from the beginning")
        self._truncate_metrics()

    def _load(self, folder: Path) -> None:
        weights = load_file(str(folder / "trainable.safetensors"))
        names = {n for n, _ in self.trainable}
        if set(weights) != names:
            diff = sorted(set(weights) ^ names)[:3]
            raise ValueError(f"{folder}: its trainable parameters differ from the model's "
                             f"(e.g. {diff}); resume with the same model and strategy")
        with torch.no_grad():
            for n, p in self.trainable:
                p.copy_(weights[n])
        saved = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
        except ValueError as e:  # e.g. other parameter groups (layer_decay changed)
            raise ValueError(f"{folder / 'optimizer.pt'}: {e}; resume with the same model, "
                             "strategy and optimizer options") from None
        self.scheduler.load_state_dict(saved["scheduler"])
        rng = load_file(str(folder / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        self.epoch, self.batch = state["epoch"], state["batch"]
        self.es.load_state_dict(state["early_stopping"])
        self.result = TrainResult(**{**state["result"], "stopped": ""})  # set by this run
        self.last_saved = self.result.step
        if state["world_size"] != _rank_world()[1]:
            self.progress.say(f"note: {folder} was written by {state['world_size']} processes, "
                              f"now {_rank_world()[1]}; steps keep their size only if "
                              "processes x gradient_accumulation_steps is unchanged")
        self._load_best()
        self._truncate_metrics()
        self.progress.say(f"resumed from {folder} (step {self.result.step})")

    def _load_best(self) -> None:
        """best/ may be ahead of the checkpoint (written after it): then the resumed run
        reaches that evaluation again and rewrites it. Only a matching step is loaded."""
        if not self.config.restore_best or self.result.best_step is None:
            return
        folder = self.out / "best"
        if not folder.is_dir():
            folder = self.out / ".old-best"   # a crash mid-swap leaves the previous one here
        problem = verify_checkpoint_dir(folder) if folder.is_dir() else "it is missing"
        if problem is None:
            info = json.loads((folder / "state.json").read_text(encoding="utf-8"))
            if info["step"] == self.result.best_step:
                self.best_state = load_file(str(folder / "trainable.safetensors"))
                return
            problem = f"it holds step {info['step']}, not {self.result.best_step}"
        self.progress.say(f"note: cannot load the best weights (step {self.result.best_step}) "
                          f"from {folder}: {problem}; restore_best will use a later best, if any")

    def _truncate_metrics(self) -> None:
        """Drop metrics.jsonl lines of steps after the checkpoint: they will be redone."""
        path = self.out / "metrics.jsonl"
        if self.rank != 0 or not path.exists():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= self.result.step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                pass  # a line cut short by a crash
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
        os.replace(tmp, path)


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

    Under torchrun (WORLD_SIZE > 1) it joins the process group (gloo on CPU, nccl on CUDA)
    and trains data-parallel; rank 0 writes the files. The model's training/eval mode,
    dropout rates, gradient-checkpointing flag and requires_grad flags are restored at the
    end; its trainable weights are the result.
    """
    config = config or TrainConfig()
    config.validate()
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    _check_examples(train_data, "train_data", vocab)
    if val_data is not None:
        _check_examples(val_data, "val_data", vocab)
    elif config.patience is not None or config.restore_best:
        raise ValueError("early stopping (patience) and restore_best need val_data")
    if config.ewc_lambda > 0 and not reference_data:
        raise ValueError("ewc_lambda > 0 needs reference_data (examples of the original domain)")
    if config.ewc_lambda > 0:
        _check_examples(reference_data, "reference_data", vocab)

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1       # by torchrun
    if device.type == "cuda" and device.index is None and launched:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if config.bf16 and device.type != "cuda":
        raise ValueError("TrainConfig.bf16=True needs a CUDA device (CPU trains in fp32)")
    bf16 = config.bf16 if config.bf16 is not None else (
        device.type == "cuda" and torch.cuda.is_bf16_supported())
    if device.type == "cuda":
        torch.cuda.set_device(device)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    owns_group = _init_distributed(device)
    rank, world = _rank_world()
    out = Path(config.output_dir) if config.output_dir else None
    was_training = model.training
    gpts = [m for m in model.modules() if isinstance(m, GPT)]
    old_checkpointing = [m.gradient_checkpointing for m in gpts]
    old_dropout = unfreezing = progress = None
    max_length = config.max_length or getattr(getattr(model, "config", None), "n_positions", None)
    try:
        if out is not None:
            _check_output_dir(out, config)
            if world > 1:
                dist.barrier()   # every rank has checked the folder before rank 0 writes to it
            _prepare_output_dir(out, config, rank)
        model.to(device)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
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
        n_steps = total_steps(len(train_data), config, world)
        optimizer, scheduler = make_optimizer(model, config, n_steps)
        if config.unfreeze_every is not None:  # after the optimizer: it holds every stage
            unfreezing = GradualUnfreezing(model, config.unfreeze_every)
        progress = _Progress(n_steps, config.log_every, enabled=rank == 0)
        run = _Run(model, config, optimizer, scheduler, trainable, out, rank, progress)
        if config.resume:
            run.resume()
        if world > 1:  # every rank starts from rank 0's weights (e.g. a randomly initialised LoRA)
            for _, p in trainable:
                dist.broadcast(p.data, 0)
        model.train()
        with _StopSignals(progress.say) as signals:
            _loop(run, train_data, val_data, n_steps, ewc, unfreezing, autocast, signals,
                  callback, device, max_length, world)
        progress.close()
        if world > 1:
            dist.barrier()   # when train() returns, rank 0's files are complete
        if config.restore_best:
            if run.best_state is None:
                progress.say("restore_best: no best weights to restore (no finite evaluation)")
            else:
                with torch.no_grad():
                    for n, p in trainable:
                        p.copy_(run.best_state[n])
        return run.result
    finally:
        if progress is not None:
            progress.close()   # end a \r status line before any error message
        if unfreezing is not None:
            unfreezing.restore()
        if old_dropout is not None:
            restore_dropout(model, old_dropout)
        for m, flag in zip(gpts, old_checkpointing):
            m.gradient_checkpointing = flag
        model.train(was_training)
        if owns_group:
            dist.destroy_process_group()


def _loop(run: _Run, train_data, val_data, n_steps, ewc, unfreezing, autocast, signals,
          callback, device, max_length, world) -> None:
    config, model, optimizer, result = run.config, run.model, run.optimizer, run.result
    per_step = config.gradient_accumulation_steps * world
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
            run, step, chunk, ewc, autocast, signals, device, max_length, world)
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
                                     autocast, run.rank, world)
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
                     "continue with resume=True (minift train ... --resume)"
                     if run.out is not None else "no output_dir, so nothing was saved")
            run.progress.close()
            raise TrainingInterrupted(f"training interrupted by {signal.Signals(signum).name} "
                                      f"after step {step}; {where}", signum)
        if result.stopped:
            break
    else:
        result.stopped = "max_steps" if config.max_steps is not None else "epochs"
    run.save()   # no-op if this step is saved already


def _train_step(run: _Run, step, chunk, ewc, autocast, signals, device, max_length, world):
    """One optimizer step on `chunk`, the step's micro-batches [(epoch, index, examples)]:
    forward/backward with token-count normalisation, gradient reduction across processes,
    EWC, the non-finite guard, clipping and the AdamW update. The scheduler is left to
    the caller. Returns (loss, grad norm, EWC penalty, input tokens, stop requested)."""
    config, model, optimizer = run.config, run.model, run.optimizer
    mine = chunk[run.rank::world]   # this process's share: micro-batches rank, rank + world, ...
    batches = [_to(collate(ex, config.pad_token_id, max_length), device) for _, _, ex in mine]
    counts = torch.tensor([sum(count_targets(b) for b in batches),
                           sum(int(b["attention_mask"].sum()) for b in batches)],
                          dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(counts)
    n_targets, n_tokens = int(counts[0]), int(counts[1])

    params = [p for _, p in run.trainable if p.requires_grad]
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):   # the caller's RNG is left as it was
        seeds = [_microbatch_seed(config.seed, step, j) for j in range(run.rank, len(chunk), world)]
        sums = accumulate_gradients(model, batches, max(n_targets, 1), autocast, seeds)
    # summed loss and "stop requested" of all processes, so all take the same decisions
    shared = torch.tensor([float(sums.sum()), float(signals.signum is not None)],
                          dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(shared)
        _reduce_gradients(params)
    loss = shared[0].item() / max(n_targets, 1)

    penalty = 0.0
    if ewc is not None:  # after the reduction, so it is added exactly once
        pen = ewc.penalty(model)
        pen.backward()
        penalty = pen.item()

    grads = [p.grad for p in params if p.grad is not None]
    norm = (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item()
            if grads else 0.0)                                  # global L2 norm
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
            torch._foreach_mul_(grads, coef)
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
        culprit = next((names[id(p)] for p in params
                        if p.grad is not None and not bool(torch.isfinite(p.grad).all())), "?")
        return f"step {step}: non-finite gradient (norm {norm}) in {culprit}"
    return None


def _last_checkpoint_hint(run: _Run) -> str:
    if run.out is None:
        return "no checkpoint (no output_dir)"
    found = list_checkpoints(run.out)
    return f"the last checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
