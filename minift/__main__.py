"""`python -m minift ...` runs the `minift` command (see minift/cli.py)."""
from .cli import main

raise SystemExit(main())
