"""Helpers shared by the command-line entry points."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from .config import ConfigError
from .data import DataError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad argument reported as one line (``error: ...``, exit 2), as every
    other bad input of the command-line tools is; ``--help`` still shows the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def worker_range(text: str) -> tuple[int, int]:
    """``--workers``: N, or MIN-MAX for an elastic group; returned as (min, max)."""
    low, dash, high = text.partition("-")
    try:
        workers = int(low), int(high if dash else low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers takes N or MIN-MAX, not {text!r}") from None
    if workers[0] < 0 or workers[0] > workers[1] or (dash and workers[0] < 1):
        raise argparse.ArgumentTypeError(f"--workers {text}: need 0 <= N, or 1 <= MIN <= MAX")
    return workers


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main``; a bad config or missing data is one line on stderr and exit status 2, a
    run stopped by a non-finite loss or weight one line and exit status 3."""
    from .core.checkpoint import CheckpointError
    from .core.engine import NonFiniteError

    try:
        return main(argv)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3


def check_launch(cfg, workers: int) -> None:
    """Before any work (and before Ray starts): every worker (at most ``workers``) gets rows of
    each minibatch, and the data exist."""
    from .data.sources import check_available

    if cfg.data.batch_size < workers:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is fewer rows than --workers {workers} "
                          "(the workers split every global minibatch by rows)")
    check_available(cfg.dataset, cfg.data.dir, cfg.data.ffcv_dir)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = ["" if row.get(c) is None else row[c] for c in columns]
        lines.append("| " + " | ".join(f"{c:.2%}" if isinstance(c, float) and c <= 1 else str(c) for c in cells) + " |")
    return "\n".join(lines)
