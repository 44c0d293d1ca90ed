"""TrainConfig: every option of `train()`, each field with its help text.

One flat dataclass; `validate()` raises one ValueError naming the first bad field. The help
texts are field metadata (`_opt`): options.py makes a `minift finetune --flag` from each
field, with its type, default and help, so the library and the command line never drift.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from .machine import device_problem
from .trackers import check_report_to

SCHEDULES = ("linear", "cosine", "constant")
OBJECTIVES = ("sft", "dpo")
NONFINITE_POLICIES = ("stop", "skip")


def _opt(default, help: str):
    """A TrainConfig field with its help text (options.py makes the --flag from it)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # -- where and how to start
    output_dir: str | None = _opt(None, "checkpoints, best/, metrics.jsonl; None writes nothing")
    resume: bool = _opt(False, "continue from the newest intact checkpoint in output_dir")
    overwrite: bool = _opt(False, "delete a previous run's files in output_dir first")
    seed: int = _opt(0, "data order and dropout masks")
    # -- how long
    max_steps: int | None = _opt(None, "optimizer steps; when set, `epochs` is ignored")
    epochs: int = _opt(1, "passes over train_data when max_steps is None")
    # -- batches
    batch_size: int = _opt(8, "examples per micro-batch, per process")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step, per process")
    max_length: int | None = _opt(None, "truncate examples; None = the model's n_positions")
    pad_token_id: int = _opt(0, "any valid id: padding is masked out and has label -100")
    # -- optimizer (AdamW, Loshchilov & Hutter 2019) and learning-rate schedule
    lr: float = _opt(5e-5, "full fine-tuning of GPT-2; LoRA / prompts want ~1e-3")
    weight_decay: float = _opt(0.01, "decoupled; never on biases, LayerNorm or embeddings")
    adam_betas: tuple[float, float] = _opt((0.9, 0.999), "Adam's defaults (Kingma & Ba 2015)")
    adam_eps: float = _opt(1e-8, "AdamW's epsilon, added to the denominator")
    max_grad_norm: float | None = _opt(1.0, "clip the global L2 norm of the gradient; None = off")
    schedule: str = _opt("linear", 'after warmup: "linear" or "cosine" decay to 0, or "constant"')
    warmup_steps: int = _opt(0, "lr rises linearly from 0 over these steps")
    dropout: float | None = _opt(None, "replaces GPT-2's three dropout rates; None keeps the "
                                 "model's")
    # -- evaluation and early stopping (needs val_data)
    eval_every: int = _opt(100, "steps between evaluations; the last step is always evaluated")
    eval_batch_size: int | None = _opt(None, "None = batch_size")
    patience: int | None = _opt(None, "stop after this many evaluations without improvement")
    min_delta: float = _opt(0.0, "an improvement must lower the val loss by more than this")
    restore_best: bool = _opt(False, "end with the trainable weights of the best evaluation")
    # -- logging and checkpoints
    log_every: int = _opt(10, "steps between metrics.jsonl lines (stderr lines off a TTY)")
    save_every: int | None = _opt(None, "steps between checkpoints; None = eval_every")
    keep_last: int = _opt(3, "checkpoints kept (older ones deleted); best/ is kept apart")
    nonfinite: str = _opt("stop", 'on a nan/inf loss or gradient: "stop" (raise) or "skip"')
    # -- regularisation (regularize.py)
    ewc_lambda: float = _opt(0.0, "EWC strength; > 0 needs reference_data. F is small "
                             "(per-token mean loss), so useful values are ~1e4-1e6")
    unfreeze_every: int | None = _opt(None, "gradual unfreezing: a block more every N steps "
                                      "(ULMFiT 3.3)")
    layer_decay: float | None = _opt(None, "discriminative lr: lr * layer_decay**depth "
                                     "(ULMFiT §3.2)")
    loraplus_lr_ratio: float | None = _opt(None, "LoRA+: every lora_B at lr * ratio in groups "
                                           "of its own (Hayou et al. 2024 §3; ~16)")
    # -- objective (objectives.py)
    objective: str = _opt("sft", '"sft" (next-token loss) or "dpo" (preference pairs, '
                          'Rafailov et al. 2023; data from minift.preference)')
    dpo_beta: float = _opt(0.1, "DPO's beta: how far the policy may move from the reference")
    # -- speed and memory
    packing: bool = _opt(False, "pack each micro-batch's examples several to a row (packing.py): "
                         "the same loss and gradients with less padding; sft only, not with "
                         "virtual-token methods (prefix, prompt, ptuning)")
    compile: bool = _opt(False, "torch.compile the blocks in place (model.compile_blocks)")
    gradient_checkpointing: bool = _opt(False, "True sets model.gradient_checkpointing during "
                                        "train()")
    device: str | None = _opt(None, "None: CUDA if available (cuda:LOCAL_RANK under torchrun)")
    bf16: bool | None = _opt(None, "bf16 autocast; None = on where bf16 is native (most CUDA "
                             "GPUs; CPUs with AVX512-BF16 or AMX), fp32 weights")
    fsdp: bool = _opt(False, "under torchrun: shard weights, gradients and AdamW state over the "
                      "processes (FSDP2, see distributed.py)")
    # -- experiment trackers (trackers.py)
    report_to: list = field(default_factory=list, metadata={"help": "trackers that get the "
                            "metrics.jsonl numbers, the config and the final metrics: "
                            "tensorboard, mlflow, wandb (extra: trackers); objects with "
                            "log_config/log_metrics/finish too; none by default"})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise one ValueError naming the first bad field: a wrong type as well as a wrong
        value (a string "0.1" would otherwise fail later as a TypeError naming no field)."""
        def need(ok, name, what):
            if not ok:
                raise ValueError(f"TrainConfig.{name} {what}, got {getattr(self, name)!r}")

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        def is_number(x):  # inf and nan too would pass a comparison, and train on nonsense
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

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
        for name in ("lr", "weight_decay", "adam_eps", "min_delta", "ewc_lambda"):
            v = getattr(self, name)
            need(is_number(v) and v >= 0, name, "must be a finite number >= 0")
        for name in ("max_grad_norm", "layer_decay", "loraplus_lr_ratio"):
            v = getattr(self, name)
            need(v is None or (is_number(v) and v > 0), name, "must be None or a finite number > 0")
        need(isinstance(self.adam_betas, (tuple, list)) and len(self.adam_betas) == 2
             and all(is_number(b) and 0 <= b < 1 for b in self.adam_betas), "adam_betas",
             "must be two numbers in [0, 1)")
        need(self.dropout is None or (is_number(self.dropout) and 0 <= self.dropout < 1),
             "dropout", "must be None or a number in [0, 1)")
        need(is_number(self.dpo_beta) and self.dpo_beta > 0, "dpo_beta",
             "must be a finite number > 0")
        for name in ("resume", "overwrite", "restore_best", "packing", "compile",
                     "gradient_checkpointing", "fsdp"):
            need(isinstance(getattr(self, name), bool), name, "must be True or False")
        need(self.bf16 is None or isinstance(self.bf16, bool), "bf16", "must be None, True or False")
        need(self.output_dir is None or isinstance(self.output_dir, (str, os.PathLike)),
             "output_dir", "must be None or a path")
        if self.device is not None:   # a name torch reads, of a device this machine has
            problem = (device_problem(self.device) if isinstance(self.device, (str, torch.device))
                       else "must be None or a device name such as 'cpu' or 'cuda'")
            need(problem is None, "device", problem)
        need(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}")
        need(self.nonfinite in NONFINITE_POLICIES, "nonfinite",
             f"must be one of {NONFINITE_POLICIES}")
        need(self.objective in OBJECTIVES, "objective", f"must be one of {OBJECTIVES}")
        need(not (self.packing and self.objective != "sft"), "packing",
             f"applies to objective='sft' only, not {self.objective!r}")
        problem = check_report_to(self.report_to)
        need(problem is None, "report_to", problem)
        need(not (self.resume and self.overwrite), "overwrite",
             "cannot be combined with resume=True")
        need(self.output_dir is not None or not self.resume, "resume", "needs an output_dir")
        for name, why in (("ewc_lambda", "the Fisher needs per-example gradients of whole weights"),
                          ("unfreeze_every", "changing which sharded weights train is unsupported"),
                          ("compile", "compiling sharded blocks is not supported")):
            need(not (self.fsdp and getattr(self, name)), "fsdp",
                 f"cannot be combined with {name} ({why})")
