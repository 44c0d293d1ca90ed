"""The `minift` command: fine-tune, generate, evaluate, merge and compare from a shell.

    minift finetune                        # LoRA on the built-in task with minift-tiny
    minift finetune --method full --max-steps 200 --output-dir runs/full
    minift generate --run runs/full --prompt 'def f(x):'
    minift eval --run runs/full --json
    minift merge --run runs/lora --out merged
    minift compare --quick                 # every method, one table

The options of `finetune`, every TrainConfig field among them, their defaults and the
--config file are options.py's; this module turns them into flags, stacks defaults < config
file (or a resumed run's config.json) < flags in `resolve_finetune`, and runs the commands.

Exit codes: 0 success; 2 usage errors (argparse's convention; also unknown keys and bad
values in a config file); 1 other errors a user can cause (files, data, models); 130 / 143
when SIGINT / SIGTERM stopped training after a checkpoint. Errors are one line on stderr;
MINIFT_DEBUG=1 shows the traceback instead. Under torchrun only rank 0 prints or writes.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import __version__
from .data import DataError, load_dataset, load_text, train_val_split
from .distributed import gather_to_rank0, is_sharded
from .evaluate import (bias_probe, evaluate_generation, forgetting_report, format_table,
                       generate_completions, perplexity, task_metrics)
from .model import GPT
from .options import (MANAGED, METHOD_DEFAULTS, METHODS, MODEL_KEYS, OPTIONS, RECIPE,
                      RUN_OPTIONS, TRAIN_OPTIONS, VIRTUAL, Opt, UsageError, _show, convert,
                      defaults, read_config_file)
from .peft import (AdapterConfig, LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig,
                   PromptTuningConfig, freeze_all_but_top, get_peft_model, unfreeze_all)
from .peft.model import CONFIG_NAME, adapter_folder, load_adapter_config
from .report import (METRIC_NAMES, MemoryProbe, StepTimer, compare_markdown, compare_rows,
                     finetune_markdown, loss_curves, metrics_rows, plot_losses, read_metrics,
                     write_json)
from .tokenizer import Tokenizer
from .train import (RUN_FILES, NonFiniteError, TrainConfig, TrainingInterrupted, evaluate_loss,
                    train)

TASK = Path(__file__).parent / "assets" / "task"   # the built-in task (see its README.md)
COMPARE_METHODS = ["full", "partial", "adapter", "lora", "prefix", "prompt", "ptuning", "full+ewc"]
QUICK = dict(max_steps=50, eval_every=25, eval_samples=32)  # `compare --quick`
EWC_LAMBDA = 1e4   # full+ewc in `compare`
SMALL_MODEL = 10_000_000  # parameters: below this, one CPU thread by default (set_threads)
RANK = int(os.environ.get("RANK", "0"))          # torchrun's process rank; only 0 talks


# ----------------------------------------------------------------------------- parsers
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), raised as UsageError for main()."""
    commands: dict = {}  # the top parser's {name: subparser}, set by build_parser

    def error(self, message):
        hint = ""
        if message.startswith("unrecognized arguments:"):
            bad = next((a.split("=")[0] for a in message.split()[2:] if a.startswith("--")), "")
            close = difflib.get_close_matches(bad, list(self._option_string_actions), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
        raise UsageError(f"{message}{hint} (see '{self.prog} --help')")


def _add_option(group, opt: Opt, shown_default: str) -> None:
    """--name for `opt`. Its default is SUPPRESS: a flag that is not given stays out of the
    namespace, so it cannot override the config file; defaults are merged in later."""
    flag = "--" + opt.name.replace("_", "-")
    text = f"{opt.help} (default: {shown_default})".replace("%", "%%")
    if opt.kind == "bool":
        group.add_argument(flag, dest=opt.name, action=argparse.BooleanOptionalAction, help=text,
                           default=argparse.SUPPRESS)
        return
    metavar = opt.metavar or ("{" + ",".join(opt.choices) + "}" if opt.choices else
                              {"int": "N", "float": "X", "str": "TEXT", "list": "A,B",
                               "pair": "X"}[opt.kind])
    if opt.kind == "pair":  # two numbers; resolve_finetune makes them a tuple
        group.add_argument(flag, dest=opt.name, metavar=metavar, help=text, nargs=2, type=float,
                           default=argparse.SUPPRESS)
        return
    group.add_argument(flag, dest=opt.name, metavar=metavar, help=text, default=argparse.SUPPRESS,
                       type=lambda s, o=opt: _cli_value(o, s))


def _cli_value(opt: Opt, text: str):
    try:
        return convert(opt, text, "")
    except UsageError as e:  # argparse prefixes "argument --name: "
        raise argparse.ArgumentTypeError(str(e).removeprefix(": ")) from None


TOP_EPILOG = """examples:
  minift finetune                           LoRA on the built-in task (1-2 minutes)
  minift finetune --method adapter --max-steps 500 --output-dir runs/adapter
  minift generate --run runs/adapter --prompt $'def os.getcwd():\\n    \"\"\"'
  minift eval --run runs/adapter --forgetting --bias
  minift merge --run runs/lora-20250101-120000 --out merged
  minift compare --quick                    every method on the same budget, one table

'minift COMMAND --help' shows each command's options. Exit codes: 0 ok, 1 error,
2 usage error, 130/143 training stopped by SIGINT/SIGTERM (after a checkpoint)."""

FINETUNE_EPILOG = """examples:
  minift finetune
  minift finetune --method full --lr 1e-4 --max-steps 500 --output-dir runs/full
  minift finetune --data my.jsonl --val-data my-val.jsonl --r 16 --target-modules c_attn,c_fc
  minift finetune --config run.toml --lr 3e-3          flags override the file
  minift finetune --resume runs/full --max-steps 800   continue (or extend) a run
  torchrun --nproc_per_node=2 -m minift finetune --method full

config file (TOML or JSON; keys are the option names, with _ or -):
  method = "lora"
  r = 16
  max_steps = 500
  target_modules = ["c_attn", "c_fc"]
  patience = "none"          # "none" where an option takes none

the run folder: config.json (all options), metrics.jsonl, adapter/ (PEFT format) or
model/ (full, partial: a Hugging Face folder), each with the tokenizer; report.md,
report.json, loss.png (with matplotlib); checkpoints/, best/, run.json (for --resume)."""

GENERATE_EPILOG = """examples:
  minift generate --prompt 'The os module'
  minift generate --run runs/lora-20250101-120000 --prompt $'def os.getcwd():\\n    \"\"\"'
  minift generate --model gpt2 --adapter my-adapter --prompt Hi --do-sample --top-p 0.9 --seed 1
  echo 'some prompt' | minift generate --prompt -
Sampling is on with --do-sample, or when --temperature, --top-k or --top-p is given."""

EVAL_EPILOG = """examples:
  minift eval                                   minift-tiny on the built-in test split
  minift eval --run runs/lora-20250101-120000 --forgetting --bias
  minift eval --model gpt2 --adapter my-adapter --data test.jsonl --json
Prints loss and perplexity on --data (every target token), task metrics (exact match,
token F1, ROUGE-L of greedy answers) when its lines are {"prompt", "completion"},
reference perplexity with --forgetting (and the base model's, for an adapter or a run),
and the log-likelihood gaps of minift's minimal pairs with --bias."""

MERGE_EPILOG = """examples:
  minift merge --run runs/lora-20250101-120000 --out merged
  minift merge --model gpt2 --adapter my-lora --out gpt2-merged
The output is a Hugging Face folder (model + tokenizer) that transformers and minift load.
Only LoRA merges into the weights; other adapters are refused."""

COMPARE_EPILOG = """examples:
  minift compare --quick                          2-3 minutes on 2 CPU cores
  minift compare --methods lora,full,full+ewc --max-steps 200
methods: """ + ", ".join(COMPARE_METHODS) + """
(full+ewc: full fine-tuning with an EWC penalty, its Fisher from the reference text).
Each method is a `minift finetune` in its own process (honest peak memory, for about 3 s
of start-up each), on the same data, step budget, batch size, seed and CPU threads, with
its own learning rate. Writes report.md, report.json, loss_curves.png and
a run folder per method."""


def number(parser, flag: str, kind, default, help: str) -> None:
    """An int or float option; its default (when not None) is shown in the help."""
    shown = "" if default is None or "default:" in help else f" (default: {default:g})"
    parser.add_argument(flag, type=kind, default=default, metavar="N" if kind is int else "X",
                        help=help + shown)


def build_parser() -> argparse.ArgumentParser:
    top = _Parser(prog="minift", description="Fine-tune GPT-2-style language models.",
                  epilog=TOP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                  allow_abbrev=False)
    top.add_argument("--version", action="version", version=f"minift {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    top.commands = sub.choices

    def command(name, help, epilog, func):
        p = sub.add_parser(name, help=help, description=help, epilog=epilog, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = command("finetune", "fine-tune a model and write a run folder", FINETUNE_EPILOG,
                cmd_finetune)
    p.add_argument("--config", metavar="FILE", help="TOML or JSON file of options")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR with its config.json (flags override it)")
    p.add_argument("--overwrite", action="store_true", help="replace a run in --output-dir")
    shown = defaults("lora")
    run, method = p.add_argument_group("model, data, evaluation"), p.add_argument_group("method")
    for o in RUN_OPTIONS:
        d = "lora " + _show(shown[o.name]) if o.name == "target_modules" else _show(o.default)
        _add_option(method if o.name == "method" or o.methods else run, o, d)
    group = p.add_argument_group("training (TrainConfig fields)")
    for o in TRAIN_OPTIONS:
        d = ", ".join(f"{m} {v['lr']:g}" for m, v in METHOD_DEFAULTS.items()) if o.name == "lr" \
            else _show(shown[o.name])
        _add_option(group, o, d)

    for name, help, epilog, func in (
            ("generate", "continue a prompt", GENERATE_EPILOG, cmd_generate),
            ("eval", "evaluate a model, an adapter or a run", EVAL_EPILOG, cmd_eval),
            ("merge", "fold a LoRA adapter into a full Hugging Face model folder", MERGE_EPILOG,
             cmd_merge)):
        p = command(name, help, epilog, func)
        p.add_argument("--model", metavar="PATH", help="base model: folder, cached hub id or "
                       "minift-tiny (default: minift-tiny)")
        p.add_argument("--adapter", metavar="DIR", help="adapter folder (PEFT format)")
        p.add_argument("--run", metavar="RUN_DIR", help="a finetune run: its model and adapter")
        if name == "merge":
            p.add_argument("--out", required=True, metavar="DIR", help="output folder")
            p.add_argument("--overwrite", action="store_true", help="replace a model in --out")
            continue
        p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
        if name == "generate":
            p.add_argument("--prompt", required=True, help="the text to continue; - reads "
                           "stdin (without the newline echo adds)")
            number(p, "--max-new-tokens", int, 50, "tokens to generate")
            p.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
            number(p, "--temperature", float, None, "sampling temperature (1.0 when sampling)")
            number(p, "--top-k", int, None, "sample from the k most likely tokens")
            number(p, "--top-p", float, None, "nucleus sampling: the smallest set of mass p")
            number(p, "--seed", int, 0, "sampling seed")
        else:
            p.add_argument("--data", metavar="FILE",
                           help="a .jsonl or .txt file (default: the built-in test split)")
            number(p, "--eval-samples", int, 64, "task metrics on the first N prompts")
            number(p, "--max-new-tokens", int, 48, "answer length for the task metrics")
            number(p, "--batch-size", int, RECIPE["batch_size"], "as finetune's evaluations")
            p.add_argument("--forgetting", action="store_true",
                           help="perplexity on --reference, and the base model's for comparison")
            p.add_argument("--reference", metavar="FILE",
                           help="text for --forgetting (default: the built-in reference.txt)")
            p.add_argument("--bias", action="store_true", help="run the minimal-pairs bias probe")
            p.add_argument("--bias-pairs", metavar="FILE",
                           help="JSONL of {category, a, b} pairs (default: minift's 40)")
            p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = command("compare", "train every method on the same budget; one table", COMPARE_EPILOG,
                cmd_compare)
    p.add_argument("--quick", action="store_true", help=f"a short budget: {QUICK['max_steps']} "
                   f"steps, task metrics on {QUICK['eval_samples']} prompts")
    p.add_argument("--methods", default=",".join(COMPARE_METHODS), metavar="A,B",
                   help="comma-separated subset (default: all)")
    number(p, "--max-steps", int, None, f"steps per method (default: {RECIPE['max_steps']}, "
           f"--quick {QUICK['max_steps']})")
    number(p, "--eval-every", int, None, f"steps between evaluations (default: "
           f"{RECIPE['eval_every']}, --quick {QUICK['eval_every']})")
    number(p, "--eval-samples", int, None, f"prompts for the task metrics (default: 64, "
           f"--quick {QUICK['eval_samples']})")
    number(p, "--batch-size", int, RECIPE["batch_size"], "examples per step")
    number(p, "--seed", int, 0, "data order, initialisation, dropout")
    number(p, "--ewc-lambda", float, EWC_LAMBDA, "EWC strength of full+ewc")
    number(p, "--threads", int, None, "CPU threads of every process (default: as finetune's, "
           "one for minift-tiny)")
    for o in ("model", "data", "val_data", "test_data", "reference"):
        p.add_argument("--" + o.replace("_", "-"), metavar=OPTIONS[o].metavar,
                       help=OPTIONS[o].help.replace("%", "%%"))
    p.add_argument("--output-dir", metavar="DIR", help="(default: runs/compare-<date>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous comparison")
    return top


# ----------------------------------------------------------------------------- resolving
def resolve_finetune(args) -> dict:
    """All options of a finetune run: defaults < --config file (or the resumed run's own
    config.json) < flags. Paths that exist become absolute, so a saved run keeps working."""
    given = {k: convert(OPTIONS[k], v, "--" + k.replace("_", "-"))
             for k, v in vars(args).items() if k in OPTIONS}
    resume = getattr(args, "resume", None)
    if resume:
        if getattr(args, "config", None):
            raise UsageError("--resume continues with the run's own config.json; drop --config")
        saved = read_run_config(Path(resume))
        changed = sorted(k for k in given if k in MODEL_KEYS and given[k] != saved.get(k))
        if changed:
            raise UsageError(f"--resume cannot change {', '.join(changed)}: the checkpoints "
                             "belong to the saved model and method")
        out = given.pop("output_dir", None)
        if out is not None and Path(out).resolve() != Path(resume).resolve():
            raise UsageError("--resume continues in RUN_DIR; drop --output-dir")
        merged = {**saved, **given}
    else:
        merged = {**(read_config_file(args.config) if getattr(args, "config", None) else {}),
                  **given}
    method = merged.get("method", "lora")
    for name in merged:
        if OPTIONS[name].methods and method not in OPTIONS[name].methods:
            raise UsageError(f"--{name.replace('_', '-')} applies to --method "
                             f"{' or '.join(OPTIONS[name].methods)}, not {method}")
    if "epochs" in merged and "max_steps" not in merged:
        merged["max_steps"] = None  # --epochs alone means epochs (the recipe counts steps)
    opts = {**defaults(method), **merged}
    for name in ("model", "data", "val_data", "test_data", "reference"):
        if opts[name] is not None and Path(opts[name]).expanduser().exists():
            opts[name] = str(Path(opts[name]).expanduser().resolve())
    if resume:
        opts["output_dir"] = str(resume)
    elif opts["output_dir"] is None:
        opts["output_dir"] = str(Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}")
    return opts


def read_run_config(run: Path) -> dict:
    if not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run}: no config.json, so not a minift finetune run folder")
    return read_config_file(run / "config.json")


def train_config(opts: dict, resume: bool, overwrite: bool) -> TrainConfig:
    try:
        return TrainConfig(**{o.name: opts[o.name] for o in TRAIN_OPTIONS},
                           output_dir=opts["output_dir"], resume=resume, overwrite=overwrite)
    except ValueError as e:
        raise UsageError(str(e)) from None


def method_config(opts: dict):
    """The PEFT config of the method (None for full and partial); bad values are usage errors."""
    o, common = opts, {"base_model_name_or_path": opts["model"]}
    targets = {"target_modules": o["target_modules"]} if o.get("target_modules") else {}
    try:
        if o["method"] == "lora":
            return LoraConfig(r=o["r"], lora_alpha=o["lora_alpha"], lora_dropout=o["lora_dropout"],
                              **targets, **common)
        if o["method"] == "adapter":
            return AdapterConfig(bottleneck_size=o["bottleneck_size"], **targets, **common)
        if o["method"] == "prefix":
            return PrefixTuningConfig(num_virtual_tokens=o["num_virtual_tokens"],
                                      prefix_projection=o["prefix_projection"],
                                      encoder_hidden_size=o["encoder_hidden_size"], **common)
        if o["method"] == "prompt":
            return PromptTuningConfig(num_virtual_tokens=o["num_virtual_tokens"],
                                      prompt_tuning_init=o["prompt_tuning_init"], **common)
        if o["method"] == "ptuning":
            return PromptEncoderConfig(num_virtual_tokens=o["num_virtual_tokens"],
                                       encoder_hidden_size=o["encoder_hidden_size"], **common)
    except ValueError as e:  # PeftError
        raise UsageError(str(e)) from None
    return None


def apply_method(model: GPT, method: str, opts: dict, peft_config):
    """Make the method's parameters trainable: a PeftModel, or the GPT with requires_grad set."""
    if method == "full":
        unfreeze_all(model)
        return model
    if method == "partial":
        freeze_all_but_top(model, opts["top_k_blocks"])
        return model
    return get_peft_model(model, peft_config)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), each shared tensor (tied lm_head / wte) counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ----------------------------------------------------------------------------- data
def context_length(n_positions: int, n_virtual: int) -> tuple[int, int]:
    """(longest example, reference perplexity block) for a model of n_positions context whose
    adapter puts n_virtual tokens in front. The reference text is scored in blocks of half
    the context (128 tokens for minift-tiny) whatever the method, so that virtual tokens fit
    and every method's perplexity compares with the base model's."""
    context = n_positions - n_virtual
    if context < 2:
        raise ValueError(f"{n_virtual} virtual tokens leave no room in the model's context "
                         f"n_positions={n_positions}")
    return context, min(n_positions // 2, context)


@dataclass
class TaskData:
    train: list                # tokenised examples
    val: list
    records: list[dict]        # {"prompt", "completion"} for the task metrics (may be empty)
    reference: str | None      # text for forgetting (None: off)
    reference_block: int       # ... scored in non-overlapping blocks of this many tokens
    reference_examples: list | None  # ... in max_length blocks, for EWC's Fisher
    reference_name: str | None
    max_length: int            # longest example, in tokens
    detail: str                # for the reports
    eval_detail: str


def _records(path: Path) -> list[dict]:
    """The lines of a JSONL file that load_dataset has already checked, one per example
    (a .txt file has none)."""
    if path.suffix.lower() != ".jsonl":
        return []
    text = path.read_text(encoding="utf-8-sig")
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def load_task_data(opts: dict, tok, n_positions: int) -> TaskData:
    builtin = opts["data"] is None
    n_virtual = opts["num_virtual_tokens"] if opts["method"] in VIRTUAL else 0
    context, block = context_length(n_positions, n_virtual)
    max_len = min(opts["max_length"] or context, context)
    train_path = TASK / "train.jsonl" if builtin else Path(opts["data"])
    val_path = Path(opts["val_data"]) if opts["val_data"] else (
        TASK / "validation.jsonl" if builtin else None)
    test_path = Path(opts["test_data"]) if opts["test_data"] else (
        TASK / "test.jsonl" if builtin else None)

    def load(path):
        return load_dataset(path, tok, block_size=max_len, max_length=max_len)

    train_data = load(train_path)
    if val_path is not None:
        val, val_records = load(val_path), _records(val_path)
        split = f"validation {len(val)} ({val_path.name})"
    else:  # the same seeded split of the examples and of the lines they came from
        train_data, val = train_val_split(train_data, opts["val_fraction"], opts["seed"])
        lines = _records(train_path)
        val_records = train_val_split(lines, opts["val_fraction"], opts["seed"])[1] if lines else []
        split = f"validation {len(val)} (a {opts['val_fraction']:g} split of it)"
    if test_path is not None:
        load(test_path)  # checks every line
        records, where = _records(test_path), f"test ({test_path.name})"
    else:
        records, where = val_records, "validation"
    records = [r for r in records if "prompt" in r]
    n_all = len(records)
    room = context - opts["max_new_tokens"]  # the answer must fit in the context too
    records = [r for r in records if len(tok.encode(r["prompt"])) <= room][:opts["eval_samples"]]
    eval_detail = (f"the first {len(records)} of {n_all} {where} prompts" if records else
                   "no prompts (the data has no {\"prompt\", \"completion\"} lines)")

    ref_path = Path(opts["reference"]) if opts["reference"] else TASK / "reference.txt"
    reference = ref_examples = ref_name = None
    if opts["forgetting"]:
        try:
            reference = ref_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"{ref_path}: no such reference text file") from None
        ref_name = str(ref_path) if opts["reference"] else "the built-in reference.txt"
    if opts["ewc_lambda"] > 0:
        ref_examples = load_text(ref_path, tok, max_len)
    name = "the built-in task" if builtin else str(train_path)
    return TaskData(train_data, val, records, reference, block, ref_examples, ref_name, max_len,
                    f"{name}: train {len(train_data)}, {split}", eval_detail)


# ----------------------------------------------------------------------------- finetune
RUN_OUTPUTS = ("config.json", "adapter", "model", "report.md", "report.json", "loss.png")


def _say(*lines) -> None:
    """Progress for a human, on stderr (stdout carries the results); rank 0 only."""
    if RANK == 0:
        print(*lines, sep="\n", file=sys.stderr, flush=True)


def _print(*lines) -> None:
    if RANK == 0:
        print(*lines, sep="\n", flush=True)


def set_threads(threads: int | None, n_parameters: int) -> None:
    """--threads; or, for None, one thread for a model under SMALL_MODEL parameters unless
    OMP_NUM_THREADS says otherwise, and torch's default (a thread per core) for larger ones.
    Measured on 2 cores shared with other jobs: minift-tiny's default run took 80 s with one
    thread and up to 700 s with two (their tiny matmuls wait at every thread barrier for a
    descheduled thread); with a core to spare two threads make a step about 1.7x faster."""
    if threads is None and n_parameters < SMALL_MODEL and "OMP_NUM_THREADS" not in os.environ:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)


def evaluate_model(model, tok, data: TaskData, batch_size: int, max_new_tokens: int):
    """({val_loss, val_ppl, exact_match, f1, rouge_l, n, reference_ppl}, greedy answers)."""
    val_loss = evaluate_loss(model, data.val, batch_size)
    metrics = {"val_loss": val_loss, "val_ppl": math.exp(val_loss)}
    preds = []
    if data.records:
        preds = generate_completions(model, tok, [r["prompt"] for r in data.records],
                                     max_new_tokens, batch_size)
        metrics.update(task_metrics(preds, [r["completion"] for r in data.records]))
    if data.reference is not None:
        metrics["reference_ppl"] = perplexity(model, data.reference, tok, batch_size,
                                              data.reference_block)
    return metrics, preds


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder holding a run unless resuming or overwriting (then ours are deleted
    here; train() deletes its own)."""
    if resume and overwrite:
        raise UsageError("--resume continues a run and --overwrite replaces it; pick one")
    existing = [f for f in (*RUN_FILES, *RUN_OUTPUTS) if (out / f).exists()]
    if existing and not (resume or overwrite):
        raise ValueError(f"{out} already holds a run ({', '.join(existing[:3])}); pass "
                         "--overwrite to replace it or --resume to continue it")
    if overwrite and RANK == 0:
        for f in RUN_OUTPUTS:
            path = out / f
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def cmd_finetune(args) -> int:
    resume, overwrite = bool(getattr(args, "resume", None)), args.overwrite
    opts = resolve_finetune(args)
    config = train_config(opts, resume, overwrite)   # checks every training option now
    peft_config = method_config(opts)
    out = Path(opts["output_dir"])
    prepare_run_dir(out, resume, overwrite)
    for name in ("data", "val_data", "test_data", "reference"):  # fail before any loading
        if opts[name] is not None and not Path(opts[name]).is_file():
            raise DataError(f"{opts[name]}: no such file (--{name.replace('_', '-')})")

    if opts["threads"] is not None and opts["threads"] < 1:
        raise UsageError(f"--threads must be at least 1, got {opts['threads']}")
    _say(f"loading {opts['model']} and the data ...")
    model, tok = GPT.from_pretrained(opts["model"]), Tokenizer.from_pretrained(opts["model"])
    set_threads(opts["threads"], model.num_parameters())
    data = load_task_data(opts, tok, model.config.n_positions)
    config = replace(config, max_length=data.max_length)
    device = opts["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    if RANK == 0:  # before training, so that an interrupted run can be resumed
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {"minift_version": __version__,
                                         **{k: v for k, v in opts.items() if k != "output_dir"}})
    eval_args = (tok, data, opts["eval_batch_size"] or opts["batch_size"], opts["max_new_tokens"])
    before, before_preds = None, []
    if opts["eval_before"] and RANK == 0:
        _say("evaluating the base model ...")
        before, before_preds = evaluate_model(model, *eval_args)
        _print("before fine-tuning:", format_table(
            {name: before[k] for k, name in METRIC_NAMES.items() if k in before}), "")

    torch.manual_seed(opts["seed"])  # the adapter's random initialisation
    model = apply_method(model, opts["method"], opts, peft_config)
    trainable, total = count_parameters(model)
    _say(f"{opts['method']}: {trainable:,d} of {total:,d} parameters trainable "
         f"({100 * trainable / total:.3g}%); training in {out} ...")
    timer = StepTimer()
    t0 = time.perf_counter()
    with MemoryProbe() as memory:  # SIGINT/SIGTERM: TrainingInterrupted names the checkpoint
        result = train(model, data.train, data.val, config,
                       reference_data=data.reference_examples, callback=timer)
    training = {"steps": result.step, "stopped": result.stopped, "best_step": result.best_step,
                "best_val_loss": result.best_val_loss, "seconds": time.perf_counter() - t0,
                "seconds_per_step": timer.median(), "peak_rss_mb": memory.peak_mb,
                "rss_growth_mb": memory.growth_mb}
    if is_sharded(model):  # fsdp: rank 0 gets the full weights, in a fresh unsharded copy
        full = gather_to_rank0(dict(model.named_parameters()))  # a collective: every rank
        if RANK == 0:
            model = apply_method(GPT.from_pretrained(opts["model"]), opts["method"], opts,
                                 method_config(opts)).to(device)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(full[name])
    if torch.distributed.is_initialized():  # train() joined torchrun's group and left it to us
        torch.distributed.destroy_process_group()
    if RANK != 0:
        return 0

    artifact = "model" if opts["method"] in ("full", "partial") else "adapter"
    model.save_pretrained(out / artifact)
    tok.save_pretrained(out / artifact)
    _say("evaluating the fine-tuned model ...")
    after, after_preds = evaluate_model(model, *eval_args)
    samples = [{"prompt": r["prompt"], "reference": r["completion"],
                **({"before": before_preds[i]} if before_preds else {}), "after": after_preds[i]}
               for i, r in enumerate(data.records[:opts["num_samples"]])]
    curve = loss_curves(read_metrics(out / "metrics.jsonl"), before and before["val_loss"])
    plotted = plot_losses({opts["method"]: curve}, out / "loss.png",
                          f"minift finetune: {opts['method']} on {opts['model']}")
    summary = {
        "method": opts["method"], "model": opts["model"], "lr": opts["lr"],
        "method_detail": _method_detail(opts, peft_config),
        "data_detail": data.detail, "eval_detail": data.eval_detail,
        "reference": data.reference_name, "reference_block": data.reference_block,
        "trainable_params": trainable, "total_params": total,
        "before": before, "after": after, "samples": samples,
        "forgetting": forgetting_report(before["reference_ppl"], after["reference_ppl"])
        if before and "reference_ppl" in before else None,
        "train": training, "artifact": artifact, "plot": "loss.png" if plotted else None,
    }
    write_json(out / "report.json", summary)
    (out / "report.md").write_text(finetune_markdown(summary), encoding="utf-8")

    _print("before and after fine-tuning:", format_table(
        [{k: "-" if v is None else v for k, v in r.items()} for r in metrics_rows(before, after)]),
        "")
    if samples:
        _print("samples:", format_table([{k: v or "(empty)" for k, v in r.items()}
                                         for r in samples], max_width=36), "")
    _print(f"run folder: {out} (report.md, {artifact}/, metrics.jsonl, config.json)"
           + ("" if plotted else "; no loss.png: install matplotlib (pip install minift[plot])"))
    return 0


def _method_detail(opts: dict, peft_config) -> str:
    """The method's description and the option values its adapter uses ("...; r=8, ...")."""
    values = ", ".join(f"{k}={_show(getattr(peft_config, k, opts[k]))}"
                       for k in opts if OPTIONS[k].methods)
    return METHODS[opts["method"]] + (f"; {values}" if values else "")


# ----------------------------------------------------------------------------- inference
class Loaded(typing.NamedTuple):
    model: torch.nn.Module   # in eval mode
    tok: Tokenizer
    weights: str             # the folder or id of the model's own weights
    base: str                # the model it was fine-tuned from (== weights for a base model)
    adapter: Path | None


def load_for_inference(args) -> Loaded:
    """The model of --model (+ --adapter), or of --run: a run's model/ folder (full, partial)
    is loaded as the model itself, its adapter/ onto its base model."""
    if args.run is not None:
        if args.model or args.adapter:
            raise UsageError("--run names the model and adapter already; drop --model/--adapter")
        run = Path(args.run)
        base = read_run_config(run)["model"]
        if (run / "model").is_dir():
            return Loaded(GPT.from_pretrained(run / "model").eval(),
                          Tokenizer.from_pretrained(run / "model"), str(run / "model"), base,
                          None)
        adapter = run / "adapter"
        if not adapter.is_dir():
            raise FileNotFoundError(f"{run}: no adapter/ or model/ folder yet (training did not "
                                    f"finish); continue it with: minift finetune --resume {run}")
    else:
        base = args.model or "minift-tiny"
        adapter = Path(args.adapter) if args.adapter else None
    model = GPT.from_pretrained(base)
    has_tokenizer = adapter is not None and any(
        (adapter / f).is_file() for f in ("tokenizer.json", "vocab.json"))
    tok = Tokenizer.from_pretrained(adapter if has_tokenizer else base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return Loaded(model.eval(), tok, base, base, adapter)  # eval(): new modules start training


def _device(args) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_generate(args) -> int:
    prompt = sys.stdin.read().removesuffix("\n") if args.prompt == "-" else args.prompt
    if not prompt:
        raise UsageError("--prompt is empty; the model needs at least one token to continue")
    model, tok, *_ = load_for_inference(args)
    model.to(_device(args))
    sample = args.do_sample or any(v is not None
                                   for v in (args.temperature, args.top_k, args.top_p))
    ids = torch.tensor([tok.encode(prompt)], device=model.device)
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=sample,
                         temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
                         eos_token_id=tok.eos_token_id, seed=args.seed)
    new = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    print(prompt + tok.decode(new))
    return 0


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        elif v is not None:
            flat[prefix + k] = v
    return flat


def cmd_eval(args) -> int:
    model, tok, weights, base, adapter = load_for_inference(args)
    model.to(_device(args))
    n_virtual = model.peft_config.num_virtual_tokens if getattr(
        model, "is_prompt_learning", False) else 0
    context, block = context_length(model.config.n_positions, n_virtual)
    path = Path(args.data) if args.data else TASK / "test.jsonl"
    examples = load_dataset(path, tok, block_size=context, max_length=context)
    ppl = perplexity(model, examples, batch_size=args.batch_size)
    result = {"model": weights, "adapter": str(adapter) if adapter else None,
              "base_model": base if weights != base else None, "data": str(path),
              "examples": len(examples), "loss": math.log(ppl), "perplexity": ppl}
    room = context - args.max_new_tokens
    records = [r for r in _records(path) if "prompt" in r and len(tok.encode(r["prompt"])) <= room]
    if records:
        result["task"] = evaluate_generation(model, tok, records[:args.eval_samples],
                                             args.max_new_tokens, args.batch_size)
    if args.forgetting:
        ref_path = Path(args.reference) if args.reference else TASK / "reference.txt"
        try:
            text = ref_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"{ref_path}: no such reference text file") from None
        ppl_ref = perplexity(model, text, tok, args.batch_size, block)
        result["reference"] = {"file": str(ref_path), "perplexity": ppl_ref}
        if weights != base or adapter is not None:  # the base model, for comparison
            base_model = GPT.from_pretrained(base).to(_device(args))
            result["reference"]["forgetting"] = forgetting_report(
                perplexity(base_model, text, tok, args.batch_size, block), ppl_ref)
    if args.bias:
        probe = bias_probe(model, tok, args.bias_pairs, args.batch_size)
        result["bias"] = {k: v for k, v in probe.items() if k != "pairs"}
    print(json.dumps(result, indent=2) if args.json else
          format_table(_flatten(result), max_width=60))
    return 0


def cmd_merge(args) -> int:
    out = Path(args.out)
    if args.run and (Path(args.run) / "model").is_dir():
        raise ValueError(f"{args.run} fine-tuned the model's own weights; its model/ folder is "
                         "already a full Hugging Face model, with nothing to merge")
    adapter = Path(args.run) / "adapter" if args.run else args.adapter and Path(args.adapter)
    if adapter is None:
        raise UsageError("merge needs --run RUN_DIR, or --model M --adapter DIR")
    if (adapter / CONFIG_NAME).is_file():  # refuse before loading anything
        kind = load_adapter_config(adapter_folder(adapter)).peft_type
        if kind != "LORA":
            raise ValueError(f"{adapter} holds a {kind} adapter; only LoRA folds into the "
                             "weights (the others add computation, so they stay adapters)")
    if (out / "config.json").exists() and not args.overwrite:
        raise ValueError(f"{out} already holds a model; pass --overwrite to replace it")
    model, tok, *_ = load_for_inference(args)
    model.merge_and_unload().save_pretrained(out)
    tok.save_pretrained(out)
    print(f"merged {adapter} into the weights: {out} (a Hugging Face folder; GPT.from_pretrained "
          "and transformers' AutoModelForCausalLM load it)")
    return 0


# ----------------------------------------------------------------------------- compare
def cmd_compare(args) -> int:
    """Each method is `python -m minift finetune ...` in its own process, so its peak memory
    is its own; this process evaluates the base model once, the "before" of every method."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in COMPARE_METHODS]
    if unknown or not methods:
        raise UsageError(f"--methods: unknown {', '.join(unknown) or '(empty)'}; choose from "
                         f"{','.join(COMPARE_METHODS)}")
    preset = QUICK if args.quick else {**RECIPE, "eval_samples": 64}
    steps = args.max_steps or preset["max_steps"]
    n_eval = args.eval_samples or preset["eval_samples"]
    out = Path(args.output_dir or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    if any((out / f).exists() for f in ("report.json", *methods)) and not args.overwrite:
        raise ValueError(f"{out} already holds a comparison; pass --overwrite to replace it")

    common = ["--max-steps", steps, "--eval-every", min(args.eval_every or preset["eval_every"],
                                                        steps),
              "--eval-samples", n_eval, "--batch-size", args.batch_size, "--seed", args.seed,
              "--no-eval-before"]
    paths = {o: getattr(args, o) for o in ("model", "data", "val_data", "test_data", "reference")}
    for o, v in {**paths, "threads": args.threads}.items():
        common += [f"--{o.replace('_', '-')}", v] if v else []
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    opts = {**defaults("lora"), **paths, "model": args.model or "minift-tiny",
            "seed": args.seed, "eval_samples": n_eval}
    _say(f"evaluating the base model {opts['model']} ...")
    model, tok = GPT.from_pretrained(opts["model"]), Tokenizer.from_pretrained(opts["model"])
    set_threads(args.threads, model.num_parameters())
    threads = torch.get_num_threads()  # what every child will choose too
    data = load_task_data(opts, tok, model.config.n_positions)
    base, _ = evaluate_model(model, tok, data, args.batch_size, opts["max_new_tokens"])
    del model

    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(  # the children run this same minift
        [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    rows, curves = [], {}
    for i, m in enumerate(methods, 1):
        argv = [sys.executable, "-m", "minift", "finetune", "--output-dir", out / m, *common,
                "--method", "full" if m == "full+ewc" else m]
        argv += ["--ewc-lambda", args.ewc_lambda] if m == "full+ewc" else []
        argv += ["--overwrite"] if args.overwrite else []
        _say(f"[{i}/{len(methods)}] {m}: {steps} steps ...")
        (out / m).mkdir(exist_ok=True)
        t0 = time.perf_counter()
        with open(out / m / "log.txt", "w", encoding="utf-8") as log:
            code = subprocess.run(list(map(str, argv)), stdout=log, stderr=subprocess.STDOUT,
                                  env=env).returncode
        if code in (130, 143, -signal.SIGINT, -signal.SIGTERM):
            raise KeyboardInterrupt
        if code != 0:
            lines = (out / m / "log.txt").read_text(encoding="utf-8").splitlines()
            error = next((ln.split("error: ", 1)[1] for ln in reversed(lines)
                          if ln.startswith("minift: error:")), f"exit code {code}")
            rows.append({"method": m, "error": error})
            _say(f"    failed: {error} (log: {out / m / 'log.txt'})")
            continue
        r = json.loads((out / m / "report.json").read_text(encoding="utf-8"))
        r["method"] = m
        if "reference_ppl" in base:
            r["forgetting"] = forgetting_report(base["reference_ppl"], r["after"]["reference_ppl"])
        rows.append(r)
        curves[m] = loss_curves(read_metrics(out / m / "metrics.jsonl"), base["val_loss"])
        _say(f"    {time.perf_counter() - t0:.1f} s, validation loss {r['after']['val_loss']:.4f}")

    plotted = plot_losses(curves, out / "loss_curves.png", f"minift compare ({steps} steps)")
    summary = {"model": opts["model"], "data_detail": data.detail, "eval_detail": data.eval_detail,
               "reference": data.reference_name, "max_steps": steps,
               "batch_size": args.batch_size, "seed": args.seed, "threads": threads,
               "base": base, "methods": rows,
               "plot": "loss_curves.png" if plotted else None}
    write_json(out / "report.json", summary)
    (out / "report.md").write_text(compare_markdown(summary), encoding="utf-8")
    print(format_table(compare_rows(summary), max_width=44))
    print(f"\nreport: {out / 'report.md'}" + ("" if plotted else
          " (no loss_curves.png: install matplotlib, pip install minift[plot])"))
    failed = [r["method"] for r in rows if "error" in r]
    if failed:
        raise ValueError(f"{', '.join(failed)} failed; see their log.txt in {out}")
    return 0


# ----------------------------------------------------------------------------- main
def _error(e: BaseException) -> None:
    if RANK == 0:
        message = " ".join(str(e).split("\n")).strip() or type(e).__name__
        print(f"minift: error: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """The `minift` console script and `python -m minift`; returns the exit code."""
    parser = build_parser()
    debug = bool(os.environ.get("MINIFT_DEBUG"))
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported by the subcommand's parser: its name, its options
            parser.commands.get(args.command, parser).error(
                f"unrecognized arguments: {' '.join(extra)}")
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return args.func(args)
    except UsageError as e:
        if debug:
            raise
        _error(e)
        return 2
    except TrainingInterrupted as e:
        if RANK == 0:
            print(f"minift: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if RANK == 0:
            print("minift: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, NonFiniteError) as e:  # DataError, PeftError, TOML errors too
        if debug:
            raise
        _error(e)
        return 1
