"""User columns of a manifest must not take the names of the columns a run writes.

A manifest's own columns (`dataset`, `lr`, `seed`...) are carried into the output
tables beside the measured ones; a user column named `T` or `status` would give a CSV
with two headers of that name, and a reader would take one for the other. Such a
manifest is refused before anything runs, with the column named.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..errors import TransferFastError
from .scan_journal import EXCLUDED_COLUMNS, RESULT_COLUMNS, SUMMARY_COLUMNS

# The columns `scan` writes: `path` first, then after the user's those of results.csv,
# summary.csv and excluded.csv. (`label` and `run` are the user's: they name the rows.)
SCAN_RESERVED = ("path", *RESULT_COLUMNS, *SUMMARY_COLUMNS, *EXCLUDED_COLUMNS)
# The columns `rank` writes after the user's (scores.csv; rank.py imports this module,
# so they are listed here rather than imported from it).
RANK_RESERVED = ("path", "label", "arch", "N", "params", "logme", "hscore",
                 "regularized_hscore", "transrate", "nce", "leep", "status", "error", "seconds")


def check_user_columns(columns: Iterable[str], reserved: Iterable[str],
                       path: str | Path) -> None:
    """Raises TransferFastError naming the manifest `path` and every user column whose
    name (less surrounding spaces) is one of `reserved`.

    columns: the manifest's user columns (without the ones the command itself reads,
    such as `random`/`pretrained` for a scan or `arch`/`label` for rank).
    """
    names = set(reserved)
    clash = [c for c in columns if c is not None and c.strip() in names]
    if clash:
        shown = ", ".join(repr(c) for c in clash)
        raise TransferFastError(f"{path}: manifest column(s) {shown} would collide with the "
                                f"output column(s) of the same name; rename them (e.g. "
                                f"'user_{clash[0].strip()}')")
