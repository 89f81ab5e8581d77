"""Shared start-up of the thin scripts: logging, and user errors printed without a traceback."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from oof.errors import DiskFullError, FoldstackError


def main_guard(fn: Callable[[], int | None], *, hard_exit_on_disk_full: bool = False) -> int:
    """Run a script's body; a FoldstackError becomes one clear message and exit status 2.

    ``hard_exit_on_disk_full`` is for a script's own process only: once HDF5 has failed a write
    (Keras' ModelCheckpoint and BackupAndRestore write ``.weights.h5`` themselves), closing that
    file, even in the interpreter's final clean-up, crashes the process with SIGSEGV. After a
    full disk the message is printed, the streams flushed and the process ends at once with
    status 2, skipping those finalizers; every artifact was written atomically, so nothing is
    lost and the rerun resumes.
    """
    logging.basicConfig(level=logging.INFO, datefmt="%H:%M:%S",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return fn() or 0
    except FoldstackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if hard_exit_on_disk_full and isinstance(exc, DiskFullError):
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2


def format_table(rows: list[dict], columns: list[str], floats: str = "{:.4f}") -> str:
    """A plain fixed-width table for the terminal (and Markdown-compatible)."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return floats.format(v)
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), sep, *(line(r) for r in cells)])
