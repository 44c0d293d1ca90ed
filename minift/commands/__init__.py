"""The commands of `minift`, one module each; cli.py adds them to its parser in this order.

Each command module has `register(subparsers)`, which adds its subparser (flags, help,
epilog) with `set_defaults(func=run)`, and `run(args) -> exit code`. A new command is a
new module here and one name in cli.COMMANDS. Shared helpers live below the commands:

    common.py     progress output, the --model/--adapter/--run loader, threads, run folders
    taskdata.py   a task's data (train, validation, prompts, reference text) and its metrics
"""
