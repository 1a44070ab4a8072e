"""Helpers shared by the command-line entry points."""
from __future__ import annotations

import logging
import sys
from typing import Callable

from .config import ConfigError
from .data import DataError


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main``; a bad config or missing data is one line on stderr and exit status 2."""
    try:
        return main(argv)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = ["" if row.get(c) is None else row[c] for c in columns]
        lines.append("| " + " | ".join(f"{c:.2%}" if isinstance(c, float) and c <= 1 else str(c) for c in cells) + " |")
    return "\n".join(lines)
