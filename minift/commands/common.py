"""Helpers every command uses: output on rank 0 only, flag builders, the model a command
works on (--model, --adapter, or a finetune --run folder), CPU threads, run folders (reading
one; finetune's checks, --overwrite and config.json)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import typing
from pathlib import Path

import torch

from .. import __version__
from ..checkpoint import check_tokenizer_fits
from ..io import write_json
from ..model import GPT
from ..options import UsageError, read_config_file
from ..peft import PeftModel
from ..rundir import RUN_FILES
from ..tokenizer import Tokenizer

SMALL_MODEL = 10_000_000  # parameters: below this, one CPU thread by default (set_threads)
RANK = int(os.environ.get("RANK", "0"))          # torchrun's process rank; only 0 talks


def say(*lines) -> None:
    """Progress for a human, on stderr (stdout carries the results); rank 0 only."""
    if RANK == 0:
        print(*lines, sep="\n", file=sys.stderr, flush=True)


def show(*lines) -> None:
    """Results, on stdout; rank 0 only."""
    if RANK == 0:
        print(*lines, sep="\n", flush=True)


# ----------------------------------------------------------------------------- flags
def add_command(subparsers, name: str, help: str, epilog: str, run) -> argparse.ArgumentParser:
    """A subcommand `name` whose parser calls `run(args)`."""
    p = subparsers.add_parser(name, help=help, description=help, epilog=epilog,
                              allow_abbrev=False,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=run)
    return p


def number(parser, flag: str, kind, default, help: str, minimum=None) -> None:
    """An int or float option; its default (when not None) is shown in the help. A value
    under `minimum` is argparse's one-line error naming the flag, as finetune's options'."""
    shown = "" if default is None or "default:" in help else f" (default: {default:g})"

    def parse(text: str):
        value = kind(text)
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value!r}")
        return value

    parse.__name__ = kind.__name__   # argparse's "invalid int value: 'x'"
    parser.add_argument(flag, type=parse, default=default, metavar="N" if kind is int else "X",
                        help=help + shown)


def add_model_flags(p) -> None:
    """--model, --adapter, --run: what load_for_inference loads."""
    p.add_argument("--model", metavar="PATH", help="base model: folder, cached hub id or "
                   "minift-tiny (default: minift-tiny)")
    p.add_argument("--adapter", metavar="DIR", help="adapter folder (PEFT format)")
    p.add_argument("--run", metavar="RUN_DIR", help="a finetune run: its model and adapter")


# ----------------------------------------------------------------------------- models, runs
# what finetune writes besides train()'s RUN_FILES
RUN_OUTPUTS = ("config.json", "adapter", "model", "report.md", "report.json", "loss.png")


def read_run_config(run: Path) -> dict:
    if not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run}: no config.json, so not a minift finetune run folder")
    return read_config_file(run / "config.json")


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder holding a run unless resuming or overwriting. Deletes nothing: an
    overwritten run goes in clear_run_dir, once the new one is certain to start."""
    if resume and overwrite:
        raise UsageError("--resume continues a run and --overwrite replaces it; pick one")
    existing = [f for f in (*RUN_FILES, *RUN_OUTPUTS) if (out / f).exists()]
    if existing and not (resume or overwrite):
        raise ValueError(f"{out} already holds a run ({', '.join(existing[:3])}); pass "
                         "--overwrite to replace it or --resume to continue it")


def clear_run_dir(out: Path) -> None:
    """--overwrite: delete the old run, ours and train()'s files (rank 0).

    run() calls it only after every file and option is checked, the data is loaded, the
    base model evaluated and the method applied: a mistake found by then leaves the old run
    whole. What can still fail (a nan loss, memory, a signal) fails in the new run, whose
    config.json and checkpoints resume it. Moving the old run aside and restoring it on
    failure would undo that new run instead, and leave two runs to reconcile after a crash."""
    for f in (*RUN_OUTPUTS, *RUN_FILES):
        path = out / f
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def write_run_config(out: Path, opts: dict) -> None:
    """config.json: every option of the run (rank 0)."""
    if RANK == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {"minift_version": __version__,
                                         **{k: v for k, v in opts.items() if k != "output_dir"}})


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
            model, tok = GPT.from_pretrained(run / "model"), Tokenizer.from_pretrained(run / "model")
            check_tokenizer_fits(tok, model.config.vocab_size, run / "model")
            return Loaded(model.eval(), tok, str(run / "model"), base, None)
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
    check_tokenizer_fits(tok, model.config.vocab_size, base,
                         tokenizer_from=adapter if has_tokenizer else None)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return Loaded(model.eval(), tok, base, base, adapter)  # eval(): new modules start training


def set_threads(threads: int | None, n_parameters: int) -> None:
    """--threads; or, for None, one thread for a model under SMALL_MODEL parameters unless
    OMP_NUM_THREADS says otherwise, and torch's default (a thread per core) for larger ones.
    On 2 cores shared with other jobs, minift-tiny's tiny matmuls wait at every thread
    barrier for a descheduled thread, so one thread is much faster there; with a core to
    spare, two threads make a step faster (scripts/ benchmarks measure it)."""
    if threads is None and n_parameters < SMALL_MODEL and "OMP_NUM_THREADS" not in os.environ:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)


def jsonl_records(path: Path) -> list[dict]:
    """The lines of a JSONL file that load_dataset has already checked, one per example
    (a .txt file has none)."""
    if path.suffix.lower() != ".jsonl":
        return []
    text = path.read_text(encoding="utf-8-sig")
    return [json.loads(line) for line in text.split("\n") if line.strip()]
