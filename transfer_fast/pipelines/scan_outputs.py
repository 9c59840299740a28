"""What a finished scan leaves in its run folder: tables, plots and the pairwise view.

Every file goes through io/files (tables) or report.figures.save_figure (figures): a
reader sees the old file or the new one, and a failed write is an error naming the file.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import Counter
from collections.abc import Iterator, Sequence

from ..measure.similarity import default_labels, similarity
from ..report.figures import (
    check_format,
    figure_path,
    group_curves_figure,
    heatmap_figure,
    save_figure,
)
from .scan_journal import RunFolder, ScanRecord, ScanRow

# The pairwise view holds every member's update in memory: it is meant for a few dozen.
MAX_PAIRWISE = 64
# User columns that name a row in the figures, in order of preference.
LABEL_COLUMNS = ("label", "run")
# The figure format when write_outputs is not given one: `transfer-fast scan --format`
# sets it around its scan() call (scan() has no format argument of its own yet).
_FORMAT: contextvars.ContextVar[str] = contextvars.ContextVar("scan_figure_format",
                                                              default="png")


@contextlib.contextmanager
def figure_format(fmt: str) -> Iterator[None]:
    """Scans run inside this block save their figures as `fmt` (png, pdf or svg)."""
    token = _FORMAT.set(check_format(fmt))
    try:
        yield
    finally:
        _FORMAT.reset(token)


def row_labels(rows: Sequence[ScanRow]) -> list[str]:
    """Short unique names of manifest rows for figures: the `label` column, else the
    `run` column, else the shortest unique suffix of the path (default_labels). An
    empty cell takes the path's name; a name given twice gets `#<position>`."""
    paths = default_labels([row.path for row in rows])
    for column in LABEL_COLUMNS:
        if any(row.columns.get(column, "").strip() for row in rows):
            names = [row.columns.get(column, "").strip() or p for row, p in zip(rows, paths)]
            count = Counter(names)
            return [f"{x}#{i}" if count[x] > 1 else x for i, x in enumerate(names)]
    return paths


def write_outputs(folder: RunFolder, rows: list[ScanRow], user_columns: list[str],
                  records: dict[str, ScanRecord], *, pairwise: bool = False,
                  plots: bool = True, preset: str = "auto", backend: str = "auto",
                  fmt: str | None = None, selection: dict | None = None) -> None:
    """results.csv, summary.csv and excluded.csv, then T_heatmap and T_curves of the
    measured checkpoints that share the most common grouping (unless `plots` is off),
    and pairwise.csv (and, with `plots`, the pairwise figure) if asked. Figures are saved as `fmt`
    (png, pdf or svg; default: the enclosing `figure_format`, else png); `selection`
    (groups, classifier, key, strict) is the scan's, for the pairwise view."""
    folder.write_tables(rows, user_columns, records)
    ok = [(r, records[r.resolved]) for r in rows
          if r.resolved in records and records[r.resolved].status == "ok"]
    if not ok:
        return
    fmt = check_format(fmt or _FORMAT.get())
    groups = Counter(tuple(rec.groups) for _, rec in ok).most_common(1)[0][0]
    same = [(row, rec) for row, rec in ok if tuple(rec.groups) == groups]
    labels = row_labels([row for row, _ in same])
    if plots:
        values = [[float(v) for v in rec.T] for _, rec in same]
        save_figure(heatmap_figure(labels, list(groups), values,
                                   title=f"T per group, {len(same)} checkpoints"),
                    figure_path(folder.out, "T_heatmap", fmt))
        save_figure(group_curves_figure(labels, list(groups), values),
                    figure_path(folder.out, "T_curves", fmt))
    if pairwise and len(same) >= 2:  # a table: written with or without the figures
        reference = same[0][0].pretrained
        members = [(row, label) for (row, _), label in zip(same, labels)
                   if row.pretrained == reference][:MAX_PAIRWISE]
        sim = similarity([row.path for row, _ in members], reference, preset=preset,
                         backend=backend, labels=[label for _, label in members],
                         **(selection or {}))
        sim.write_csv(folder.out / "pairwise.csv")
        if plots:
            sim.plot(figure_path(folder.out, "pairwise", fmt))
