"""`minift tasks`: the built-in tasks, their sizes and metrics (minift.tasks)."""
from __future__ import annotations

import json

from ..tables import format_table
from ..tasks import DEFAULT_TASK, task_rows
from .common import add_command

TASKS_EPILOG = f"""examples:
  minift tasks
  minift finetune --task call          train on another built-in task (default: {DEFAULT_TASK})
  minift tasks --json"""


def register(subparsers) -> None:
    p = add_command(subparsers, "tasks", "list the built-in tasks", TASKS_EPILOG, run)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    rows = task_rows()
    print(json.dumps(rows, indent=2) if args.json else format_table(rows, max_width=60))
    return 0
