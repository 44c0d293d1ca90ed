"""`minift compare`: every method on the same budget, one table (report.md, report.json,
loss_curves.png and a run folder per method)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..evaluate import forgetting_report
from ..tables import format_table
from ..model import GPT
from ..options import OPTIONS, RECIPE, UsageError, defaults
from ..io import write_json
from ..compare_report import compare_markdown, compare_rows, plot_tradeoff
from ..report import loss_curves, plot_losses, read_metrics
from ..tokenizer import Tokenizer
from .common import add_command, number, say, set_threads
from ..tasks import get_task
from .preference_task import load_preference_task
from .taskdata import evaluate_model, load_task_data, reference_metrics

COMPARE_METHODS = ["full", "partial", "adapter", "lora", "prefix", "prompt", "ptuning", "full+ewc"]
# DPO rows (asked by name, not in the default set): `finetune --objective dpo` with the method,
# on preference pairs: the built-in preference task, or --data when it is given.
DPO_METHODS = {"lora-dpo": "lora", "full-dpo": "full"}
QUICK = dict(max_steps=50, eval_every=25)  # `compare --quick`
EWC_LAMBDA = 1e4   # full+ewc in `compare`

COMPARE_EPILOG = """examples:
  minift compare --quick                          every method, 50 steps each
  minift compare --methods lora,full,full+ewc --max-steps 200
  minift compare --methods lora,lora-dpo          a DPO row beside the supervised ones
methods: """ + ", ".join(COMPARE_METHODS) + " (the default); " + ", ".join(DPO_METHODS) + """
(full+ewc: full fine-tuning with an EWC penalty, its Fisher from the reference text;
lora-dpo, full-dpo: DPO on the built-in preference task, or on --data's preference pairs,
scored by reward accuracy and margin on the validation pairs; with no supervised method in
--methods, --val-data holds their validation pairs).
Each method is a `minift finetune` in its own process (so peak memory is honest), on
the same data, step budget, batch size, seed and CPU threads, with its own learning
rate. Writes report.md, report.json, loss_curves.png and a run folder per method."""


def register(subparsers) -> None:
    p = add_command(subparsers, "compare", "train every method on the same budget; one table",
                    COMPARE_EPILOG, run)
    p.add_argument("--quick", action="store_true", help=f"a short budget: {QUICK['max_steps']} "
                   "steps per method")
    p.add_argument("--methods", default=",".join(COMPARE_METHODS), metavar="A,B",
                   help="comma-separated subset (default: every supervised method)")
    number(p, "--max-steps", int, None, f"steps per method (default: {RECIPE['max_steps']}, "
           f"--quick {QUICK['max_steps']})")
    number(p, "--eval-every", int, None, f"steps between evaluations (default: "
           f"{RECIPE['eval_every']}, --quick {QUICK['eval_every']})")
    number(p, "--eval-samples", int, None, "prompts for the task metrics (default: every test "
           "prompt)")
    number(p, "--batch-size", int, RECIPE["batch_size"], "examples per step")
    number(p, "--seed", int, 0, "data order, initialisation, dropout")
    number(p, "--ewc-lambda", float, EWC_LAMBDA, "EWC strength of full+ewc")
    number(p, "--threads", int, None, "CPU threads of every process (default: as finetune's, "
           "one for minift-tiny)", minimum=1)
    p.add_argument("--task", choices=OPTIONS["task"].choices, default=OPTIONS["task"].default,
                   help=OPTIONS["task"].help + f" (default: {OPTIONS['task'].default})")
    for o in ("model", "data", "val_data", "test_data", "reference"):
        p.add_argument("--" + o.replace("_", "-"), metavar=OPTIONS[o].metavar,
                       help=OPTIONS[o].help.replace("%", "%%"))
    p.add_argument("--output-dir", metavar="DIR", help="(default: runs/compare-<date>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous comparison")


def run(args) -> int:
    """Each method is `python -m minift finetune ...` in its own process, so its peak memory
    is its own; this process evaluates the base model once, the "before" of every method."""
    methods = _methods(args.methods)
    sft = [m for m in methods if m not in DPO_METHODS]
    preset = QUICK if args.quick else RECIPE
    steps = args.max_steps or preset["max_steps"]
    n_eval = args.eval_samples   # None: every test prompt, so the intervals are as tight as can be
    out = Path(args.output_dir or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    if any((out / f).exists() for f in ("report.json", *methods)) and not args.overwrite:
        raise ValueError(f"{out} already holds a comparison; pass --overwrite to replace it")

    paths = {o: getattr(args, o) for o in ("model", "data", "val_data", "test_data", "reference")}
    task = None if args.data else get_task(args.task)
    if task is not None and task.kind == "dpo" and sft:
        raise UsageError(f"--task {task.name} holds preference pairs, which only DPO rows train "
                         f"on: --methods {','.join(DPO_METHODS)}")
    # The DPO rows' files: --data's pairs (with --val-data, --test-data) when --data is given,
    # else the built-in preference task, with --val-data and --test-data when no supervised
    # row claims them (a comparison of DPO rows alone).
    dpo_paths = paths if args.data or not sft else {o: paths[o] for o in ("model", "reference")}
    dpo_task = args.task if args.data else "preference"
    common, dpo_common = _child_flags(args, steps, min(args.eval_every or preset["eval_every"],
                                                      steps), n_eval, paths, dpo_paths, dpo_task)
    opts = {**defaults("lora"), **paths, "model": args.model or "minift-tiny",
            "seed": args.seed, "eval_samples": n_eval, "task": args.task}
    dpo_opts = {**opts, "task": dpo_task,
                **{o: dpo_paths.get(o) for o in ("data", "val_data", "test_data")}}
    data, pairs, base, base_items = _evaluate_base(args, opts, dpo_opts, methods)
    threads = torch.get_num_threads()  # what every child will choose too

    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(  # the children run this same minift
        [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    rows, curves = [], {}
    for i, m in enumerate(methods, 1):
        method = DPO_METHODS.get(m, "full" if m == "full+ewc" else m)
        argv = [sys.executable, "-m", "minift", "finetune", "--output-dir", out / m,
                *(dpo_common if m in DPO_METHODS else common), "--method", method]
        argv += ["--ewc-lambda", args.ewc_lambda] if m == "full+ewc" else []
        argv += ["--overwrite"] if args.overwrite else []
        say(f"[{i}/{len(methods)}] {m}: {steps} steps ...")
        row = _run_method(m, argv, out / m, env, base)
        rows.append(row)
        if "error" not in row and m not in DPO_METHODS:  # a DPO row's loss is the DPO loss
            curves[m] = loss_curves(read_metrics(out / m / "metrics.jsonl"), base.get("val_loss"))

    plotted = plot_losses(curves, out / "loss_curves.png", f"minift compare ({steps} steps)")
    summary = {"model": opts["model"], "data_detail": data.detail, "eval_detail": data.eval_detail,
               "reference": data.reference_name, "max_steps": steps,
               "batch_size": args.batch_size, "seed": args.seed, "threads": threads,
               "metric": ("reward_accuracy" if not sft else task.metrics[0] if task
                          else _user_metric(data)),
               "base": base, "base_items": base_items, "methods": rows,
               "plot": "loss_curves.png" if plotted else None}
    if pairs is not None:
        summary |= {"dpo_data_detail": pairs.detail, "dpo_eval_detail": pairs.eval_detail}
    summary["tradeoff_plot"] = "tradeoff.png" if plot_tradeoff(summary, out / "tradeoff.png") \
        else None
    _write_report(out, summary)
    failed = [r["method"] for r in rows if "error" in r]
    if failed:
        raise ValueError(f"{', '.join(failed)} failed; see their log.txt in {out}")
    return 0


def _methods(text: str) -> list[str]:
    """--methods A,B -> the names, each one of COMPARE_METHODS or DPO_METHODS."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    known = COMPARE_METHODS + list(DPO_METHODS)
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise UsageError(f"--methods: unknown {', '.join(unknown) or '(empty)'}; choose from "
                         f"{','.join(known)}")
    return methods


def _evaluate_base(args, opts: dict, dpo_opts: dict, methods: list[str]):
    """(the supervised rows' TaskData, or the pairs when there are none; the DPO rows' pairs
    or None; the base model's metrics; its per-item scores). opts: the supervised rows'
    options, dpo_opts: the DPO rows'."""
    say(f"evaluating the base model {opts['model']} ...")
    model, tok = GPT.from_pretrained(opts["model"]), Tokenizer.from_pretrained(opts["model"])
    set_threads(args.threads, model.num_parameters())
    pairs = _preference_data(methods, dpo_opts, tok, model.config.n_positions)
    if all(m in DPO_METHODS for m in methods):
        # the base model is the reference: its margins are 0, its "before" is forgetting's
        return pairs, pairs, reference_metrics(model, tok, pairs, args.batch_size), {}
    data = load_task_data(opts, tok, model.config.n_positions)
    base, _, base_items = evaluate_model(model, tok, data, args.batch_size)
    return data, pairs, base, base_items


def _preference_data(methods: list[str], opts: dict, tok, n_positions: int):
    """The DPO rows' pairs (None without DPO rows) from their options (run's dpo_opts),
    loaded here so that data which is not preference pairs fails once, before any training."""
    dpo = [m for m in methods if m in DPO_METHODS]
    if not dpo:
        return None
    try:
        return load_preference_task(opts, tok, n_positions)
    except ValueError as e:   # DataError: the file and line
        raise type(e)(f"{', '.join(dpo)} train{'s' if len(dpo) == 1 else ''} on preference "
                      f"pairs: {e}") from None


def _write_report(out: Path, summary: dict) -> None:
    """report.json and report.md in `out`; the table on stdout."""
    write_json(out / "report.json", summary)
    (out / "report.md").write_text(compare_markdown(summary), encoding="utf-8")
    print(format_table(compare_rows(summary), max_width=44))
    print(f"\nreport: {out / 'report.md'}" + ("" if summary["plot"] else
          " (no loss_curves.png: install matplotlib, pip install minift[plot])"))


def _user_metric(data) -> str:
    """The metric compare ranks --data by: choice accuracy for choice records, else ROUGE-L."""
    return "accuracy" if data.kind == "choice" else "rouge_l"


def _child_flags(args, steps: int, eval_every: int, n_eval: int | None, paths: dict,
                 dpo_paths: dict, dpo_task: str) -> tuple[list, list]:
    """The finetune flags of the supervised rows, and of the DPO rows (their own files and
    task: run's dpo_paths and dpo_task)."""
    common = _common_flags(args, steps, eval_every, n_eval, paths, args.task)
    dpo = _common_flags(args, steps, eval_every, None, dpo_paths, dpo_task)
    return common, dpo + ["--objective", "dpo"]


def _common_flags(args, steps: int, eval_every: int, n_eval: int | None, paths: dict,
                  task: str) -> list:
    """The finetune flags every method shares: budget, evaluation, data, seed, threads."""
    common = ["--max-steps", steps, "--eval-every", eval_every, "--batch-size", args.batch_size,
              "--seed", args.seed, "--no-eval-before", "--task", task]
    common += ["--eval-samples", n_eval] if n_eval else []
    for o, v in {**paths, "threads": args.threads}.items():
        common += [f"--{o.replace('_', '-')}", v] if v else []
    return common


def _run_method(m: str, argv: list, folder: Path, env: dict, base: dict) -> dict:
    """One method's `minift finetune` process -> its report.json (+ "forgetting" against the
    base model), or {"method", "error"} when it failed."""
    folder.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    with open(folder / "log.txt", "w", encoding="utf-8") as log:
        code = subprocess.run(list(map(str, argv)), stdout=log, stderr=subprocess.STDOUT,
                              env=env).returncode
    if code in (130, 143, -signal.SIGINT, -signal.SIGTERM):
        raise KeyboardInterrupt
    if code != 0:
        lines = (folder / "log.txt").read_text(encoding="utf-8").splitlines()
        error = next((ln.split("error: ", 1)[1] for ln in reversed(lines)
                      if ln.startswith("minift: error:")), f"exit code {code}")
        say(f"    failed: {error} (log: {folder / 'log.txt'})")
        return {"method": m, "error": error}
    r = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    r["method"] = m
    if m in DPO_METHODS:
        r["objective"] = "dpo"
    if "reference_ppl" in base and "reference_ppl" in r["after"]:
        r["forgetting"] = forgetting_report(base["reference_ppl"], r["after"]["reference_ppl"])
    a = r["after"]
    say(f"    {time.perf_counter() - t0:.1f} s, " + (
        f"reward accuracy {a['reward_accuracy']:.3f}" if m in DPO_METHODS else
        f"validation loss {a['val_loss']:.4f}"))
    return r
