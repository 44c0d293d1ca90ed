"""`minift finetune`: fine-tune a model and write a run folder.

The options (every TrainConfig field among them), their defaults and the --config file are
options.py's; this module turns them into flags, stacks defaults < config file (or a resumed
run's config.json) < flags in `resolve_finetune`, trains, and writes the run folder:
config.json first (so an interrupted run resumes), then the adapter or model, report.md,
report.json and loss.png. Nothing in the folder is written or deleted (--overwrite) until
every file and option is checked; --resume rewrites config.json only once a checkpoint loaded.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from ..checkpoint import check_tokenizer_fits
from ..config import TrainConfig
from ..data import DataError
from ..formats import HUB_ID, SUFFIXES
from ..distributed import gather_to_rank0, is_sharded, native_bf16
from ..evaluate import forgetting_report
from ..tables import format_table
from ..model import GPT
from ..options import (METHOD_DEFAULTS, METHODS, MODEL_KEYS, OPTIONS, RUN_OPTIONS, TRAIN_OPTIONS,
                       VIRTUAL, Opt, UsageError, _show, convert, defaults, read_config_file)
from ..peft.config import find_targets
from ..peft import (AdapterConfig, LoraConfig, PrefixTuningConfig, PromptEncoderConfig,
                    PromptTuningConfig, freeze_all_but_top, get_peft_model, unfreeze_all)
from ..io import write_json
from ..machine import default_device
from ..report import (METRIC_NAMES, MemoryProbe, StepTimer, finetune_markdown, loss_curves,
                      metrics_rows, plot_losses, read_metrics)
from ..tokenizer import Tokenizer
from ..trackers import finish_all, open_trackers, require as require_trackers
from ..train import check_inputs, train
from .common import (RANK, add_command, check_run_dir, clear_run_dir, read_run_config,
                     say, set_threads, show, write_run_config)
from .preference_task import evaluate_preferences, load_preference_task, with_reference
from .taskdata import evaluate_model, load_task_data

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

def register(subparsers) -> None:
    p = add_command(subparsers, "finetune", "fine-tune a model and write a run folder",
                    FINETUNE_EPILOG, run)
    p.add_argument("--config", metavar="FILE", help="TOML or JSON file of options")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR with its config.json (flags override it)")
    p.add_argument("--overwrite", action="store_true", help="replace a run in --output-dir")
    shown = defaults("lora")
    data, method = p.add_argument_group("model, data, evaluation"), p.add_argument_group("method")
    for o in RUN_OPTIONS:
        # LoRA's own defaults where the CLI has them (r=16, no dropout), else the option's
        d = "lora " + _show(shown[o.name]) if o.name == "target_modules" else _show(
            shown.get(o.name, o.default))
        _add_option(method if o.name == "method" or o.methods else data, o, d)
    group = p.add_argument_group("training (TrainConfig fields)")
    for o in TRAIN_OPTIONS:
        d = ", ".join(f"{m} {v['lr']:g}" for m, v in METHOD_DEFAULTS.items()) if o.name == "lr" \
            else _show(shown[o.name])
        _add_option(group, o, d)


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
    if opts.get("objective") != "sft" and "packing" not in merged:
        opts["packing"] = False   # the default packing is exact for sft only (options.py)
    for name in ("model", "data", "val_data", "test_data", "reference"):
        if opts[name] is not None and Path(opts[name]).expanduser().exists():
            opts[name] = str(Path(opts[name]).expanduser().resolve())
    if resume:
        opts["output_dir"] = str(resume)
    elif opts["output_dir"] is None:
        opts["output_dir"] = str(Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}")
    return opts


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
                              use_dora=o["use_dora"], **targets, **common)
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


def run(args) -> int:
    resume, overwrite = bool(getattr(args, "resume", None)), args.overwrite
    opts = resolve_finetune(args)
    config = train_config(opts, resume, overwrite)   # checks every training option now
    require_trackers(config.report_to)               # a missing tracker package, too
    peft_config = method_config(opts)
    out = Path(opts["output_dir"])
    # Everything that can be checked is checked before the run folder is written: a failed
    # command leaves an existing run as it was (and no half-made folder to refuse next time).
    check_run_dir(out, resume, overwrite)
    _check_options(opts)   # fail before any loading

    say(f"loading {opts['model']} and the data ...")
    model, tok = GPT.from_pretrained(opts["model"]), Tokenizer.from_pretrained(opts["model"])
    check_tokenizer_fits(tok, model.config.vocab_size, opts["model"])
    set_threads(opts["threads"], model.num_parameters())
    _check_targets(model, peft_config)   # now, not after the base model's evaluation
    dpo = config.objective == "dpo"   # preference pairs, scored by reward accuracy
    data = (load_preference_task if dpo else load_task_data)(opts, tok, model.config.n_positions)
    config = replace(config, max_length=data.max_length)
    device = opts["device"] or default_device()
    model.to(device)
    eval_args = (tok, data, opts["eval_batch_size"] or opts["batch_size"])
    evaluate = partial(evaluate_preferences, beta=config.dpo_beta) if dpo else evaluate_model
    if dpo:   # the reference: the model before the method is applied, once
        with_reference(model, data, config.pad_token_id, eval_args[2])
    before, before_preds, before_items = None, [], {}
    if opts["eval_before"] and RANK == 0:
        say("evaluating the base model ...")
        before, before_preds, before_items = evaluate(model, *eval_args)
        show("before fine-tuning:", format_table(
            {name: before[k] for k, name in METRIC_NAMES.items() if k in before}), "")

    torch.manual_seed(opts["seed"])  # the adapter's random initialisation
    model = apply_method(model, opts["method"], opts, peft_config)
    check_inputs(model, data.train, data.val, config, data.reference_examples)  # train()'s own
    if RANK == 0 and overwrite:
        clear_run_dir(out)
    if not resume:  # before training, so that an interrupted run can be resumed
        write_run_config(out, opts)
    # Trackers opened here (not by train()) are finished with report.json's numbers.
    trackers, opened = open_trackers(config.report_to, out) if RANK == 0 else ([], [])
    try:
        model, training = _train(model, data, replace(config, report_to=trackers), opts,
                                 device, out)
    except BaseException:
        finish_all(opened, {})
        raise
    if RANK != 0:
        return 0
    artifact = "model" if opts["method"] in ("full", "partial") else "adapter"
    model.save_pretrained(out / artifact)
    tok.save_pretrained(out / artifact)
    say("evaluating the fine-tuned model ...")
    after, after_preds, after_items = evaluate(model, *eval_args)
    samples = [{"prompt": r["prompt"], "reference": r["completion"],
                **({"before": before_preds[i]} if before_preds else {}), "after": after_preds[i]}
               for i, r in enumerate(data.records[:opts["num_samples"]])]
    items = {"before": before_items, "after": after_items}
    _report(out, opts, peft_config, model, data, before, after, samples, training, artifact, items)
    finish_all(opened, json.loads((out / "report.json").read_text(encoding="utf-8")))
    return 0


def _check_options(opts: dict) -> None:
    """The files, and the options that would fail only late (in an evaluation after training,
    or in the first step), checked before anything is loaded."""
    for name in ("data", "val_data", "test_data", "reference"):
        if opts[name] is None:
            continue
        path = Path(opts[name])
        found = path.is_file() if name == "reference" else path.is_file() or _dataset(path)
        if not found:
            raise DataError(f"{opts[name]}: no such file (--{name.replace('_', '-')})")
    if opts["bf16"] and not native_bf16(torch.device(opts["device"] or default_device())):
        raise UsageError("--bf16 needs a CUDA GPU or a CPU with native bf16 (AVX512-BF16 or "
                         "AMX); drop it (the default turns bf16 on where it is native)")
    if opts["packing"] and opts["method"] in VIRTUAL:
        raise UsageError(f"--packing does not work with --method {opts['method']}: its virtual "
                         "tokens would lead only the first example of a packed row; drop "
                         "--packing")


def _dataset(path: Path) -> bool:
    """Whether load_dataset reads `path` as other than a file: a `datasets` save_to_disk
    folder, or a name that is no file and looks like a Hugging Face dataset id (formats.rows'
    rule; the local cache is looked up when the data is loaded, with its own message)."""
    return path.is_dir() or (not path.exists() and path.suffix.lower() not in SUFFIXES
                             and HUB_ID.fullmatch(str(path)) is not None)


def _check_targets(model: GPT, peft_config) -> None:
    """--target-modules against the model (LoRA, adapter), before the model is evaluated or
    changed: get_peft_model would find a wrong name only after the base model's evaluation."""
    if getattr(peft_config, "target_modules", None) is not None:
        try:
            find_targets(model, peft_config)
        except ValueError as e:  # PeftError
            raise UsageError(f"--target-modules: {e}") from None


def _train(model, data, config: TrainConfig, opts: dict, device, out: Path):
    """train(), with its timing and memory -> (the trained model, unsharded on rank 0; the
    report's "train" section)."""
    trainable, total = model.num_parameters(trainable_only=True), model.num_parameters()
    say(f"{opts['method']}: {trainable:,d} of {total:,d} parameters trainable "
        f"({100 * trainable / total:.3g}%); training in {out} ...")
    timer, config_due = StepTimer(), config.resume

    def on_step(record: dict) -> None:
        # --resume: config.json takes the new options only now, once train() has loaded a
        # checkpoint (a resume that fails leaves the run as it was), and at the first step,
        # so that a run interrupted from here on resumes with them
        nonlocal config_due
        if config_due:
            write_run_config(out, opts)
            config_due = False
        timer(record)

    t0 = time.perf_counter()
    with MemoryProbe() as memory:  # SIGINT/SIGTERM: TrainingInterrupted names the checkpoint
        result = train(model, data.train, data.val, config,
                       reference_data=data.reference_examples, callback=on_step)
    if config_due:   # a finished run resumed: no step was left to take
        write_run_config(out, opts)
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
    return model, training


def _report(out: Path, opts, peft_config, model, data, before, after, samples, training,
            artifact, items) -> None:
    """report.json, report.md and loss.png in the run folder; the tables on stdout."""
    trainable, total = model.num_parameters(trainable_only=True), model.num_parameters()
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
        "item_scores": items,   # {"before"/"after": {metric: [score per test item]}}
    }
    write_json(out / "report.json", summary)
    (out / "report.md").write_text(finetune_markdown(summary), encoding="utf-8")
    show("before and after fine-tuning:", format_table(
        [{k: "-" if v is None else v for k, v in r.items()} for r in metrics_rows(before, after)]),
        "")
    if samples:
        show("samples:", format_table([{k: v or "(empty)" for k, v in r.items()}
                                       for r in samples], max_width=36), "")
    show(f"run folder: {out} (report.md, {artifact}/, metrics.jsonl, config.json)"
         + ("" if plotted else "; no loss.png: install matplotlib (pip install minift[plot])"))


def _method_detail(opts: dict, peft_config) -> str:
    """The method's description and the option values its adapter uses ("...; r=8, ...")."""
    values = ", ".join(f"{k}={_show(getattr(peft_config, k, opts[k]))}"
                       for k in opts if OPTIONS[k].methods)
    return METHODS[opts["method"]] + (f"; {values}" if values else "")
