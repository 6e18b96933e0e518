"""How every listing prints: a table under a header line, or with `--json` the same rows as JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON array instead of a table")


def print_rows(args: argparse.Namespace, columns: Sequence[tuple[str, str]], rows: Sequence[dict[str, Any]]) -> None:
    """`columns`: (key in each row, header); with `args.json` the rows are printed whole, as JSON."""
    if getattr(args, "json", False):
        print(json.dumps(list(rows), indent=2, default=str))
        return
    shown = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    headers = [header for _, header in columns]
    widths = [max([len(h), *(len(r[i]) for r in shown)]) for i, h in enumerate(headers)]
    for line in [headers, *shown]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if hasattr(value, "strftime"):
        return value.strftime("%Y-%m-%d %H:%M")
    # Values may come from clients (names, descriptions): one line each, no control characters.
    return "".join(ch if ch.isprintable() else "?" for ch in str(value))
