"""Fixed-width text tables of evaluation results (a list of dicts, a dict of dicts, or a
flat dict), for terminals: what the commands print and `print_table` shows in a notebook."""
from __future__ import annotations

import unicodedata


def _width(s: str) -> int:
    """Terminal columns: wide (CJK, most emoji) characters take 2, combining marks 0."""
    return sum(0 if unicodedata.combining(c) else
               2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in s)


def _cell(v, max_width: int) -> str:
    s = f"{v:.4f}" if isinstance(v, float) else str(v)
    s = s.replace("\n", "\\n")  # keep each row on one line
    if _width(s) > max_width:
        while _width(s) > max_width - 1:
            s = s[:-1]
        s += "…"
    return s


def format_table(rows, max_width: int = 40) -> str:
    """Fixed-width table of a list of dicts, a dict of dicts (key becomes the first column)
    or a flat dict (one "name | value" row per key). Floats get 4 decimals; cells longer
    than max_width columns are cut with "…"; numbers are right-aligned."""
    if isinstance(rows, dict):
        if all(isinstance(v, dict) for v in rows.values()):
            rows = [{"": k, **v} for k, v in rows.items()]
        else:
            rows = [{"name": k, "value": v} for k, v in rows.items()]
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError("format_table needs a non-empty list of dicts or a dict")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_cell(r.get(c, ""), max_width) for c in columns] for r in rows]
    numeric = [all(isinstance(r.get(c), (int, float)) for r in rows) for c in columns]
    widths = [max(_width(x) for x in [str(c), *col]) for c, col in zip(columns, zip(*cells))]

    def line(values):
        padded = [(" " * (w - _width(v)) + v) if num else (v + " " * (w - _width(v)))
                  for v, w, num in zip(values, widths, numeric)]
        return " | ".join(padded).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line([str(c) for c in columns]), rule, *map(line, cells)])


def print_table(rows, max_width: int = 40) -> None:
    """print(format_table(rows, max_width))."""
    print(format_table(rows, max_width))
