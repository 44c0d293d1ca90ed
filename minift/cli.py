"""The `minift` command: fine-tune, generate, evaluate, merge and compare from a shell.

    minift finetune                        # LoRA on the built-in task with minift-tiny
    minift finetune --method full --max-steps 200 --output-dir runs/full
    minift generate --run runs/full --prompt 'def f(x):'
    minift eval --run runs/full --json
    minift merge --run runs/lora --out merged
    minift compare --quick                 # every method, one table

This module is the parser and the exit codes; each command is a module of minift/commands/
with `register(subparsers)` (its flags) and `run(args)`. A new command is a module there
and a name in COMMANDS.

Exit codes: 0 success; 2 usage errors (argparse's convention; also unknown keys and bad
values in a config file); 1 other errors a user can cause (files, data, models); 130 / 143
when SIGINT / SIGTERM stopped training after a checkpoint. Errors are one line on stderr;
MINIFT_DEBUG=1 shows the traceback instead. Under torchrun only rank 0 prints or writes.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys

from . import __version__
from .commands import compare, evaluate, finetune, generate, merge, plan, tasks
from .commands.common import RANK
from .options import UsageError
from .step import NonFiniteError
from .train import TrainingInterrupted

COMMANDS = (finetune, generate, evaluate, merge, compare, tasks, plan)   # --help's order


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


TOP_EPILOG = """examples:
  minift finetune                           LoRA on the built-in params task (300 steps)
  minift finetune --task choice             another built-in task (minift tasks lists them)
  minift finetune --method adapter --max-steps 500 --output-dir runs/adapter
  minift generate --run runs/adapter --prompt $'def shutil.copyfile(src, dst):\\n# parameters:'
  minift eval --run runs/adapter --forgetting --bias
  minift merge --run runs/lora-20250101-120000 --out merged
  minift compare --quick                    every method on the same budget, one table
  minift plan --model gpt2 --batch-size 8 --max-length 512   memory and time of each method

'minift COMMAND --help' shows each command's options. Exit codes: 0 ok, 1 error,
2 usage error, 130/143 training stopped by SIGINT/SIGTERM (after a checkpoint)."""


def build_parser() -> argparse.ArgumentParser:
    top = _Parser(prog="minift", description="Fine-tune GPT-2-style language models.",
                  epilog=TOP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                  allow_abbrev=False)
    top.add_argument("--version", action="version", version=f"minift {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    top.commands = sub.choices
    for command in COMMANDS:
        command.register(sub)
    return top


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
    except (ValueError, OSError, ImportError, NonFiniteError) as e:  # DataError, PeftError,
        # TOML errors, a missing extra (trackers.py) too
        if debug:
            raise
        _error(e)
        return 1
