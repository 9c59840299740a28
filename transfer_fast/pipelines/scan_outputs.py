"""What a finished scan leaves in its run folder: tables, plots and the pairwise view.

Every file goes through io/files.atomic_write: a reader sees the old file or the new
one, and a failed write is an error naming the file.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from ..io.files import atomic_write
from ..measure.similarity import default_labels, similarity
from ..report import plots as figures
from .scan_journal import RunFolder, ScanRecord, ScanRow

# The pairwise view holds every member's update in memory: it is meant for a few dozen.
MAX_PAIRWISE = 64


def _figure(path: Path, draw: Callable[[io.BytesIO], None]) -> None:
    """draw(buffer) renders a PNG into memory (a file object has no suffix to guess a
    format from, so matplotlib writes PNG); then it is written atomically."""
    buf = io.BytesIO()
    draw(buf)
    atomic_write(path, lambda tmp: tmp.write_bytes(buf.getvalue()))


def write_outputs(folder: RunFolder, rows: list[ScanRow], user_columns: list[str],
                  records: dict[str, ScanRecord], *, pairwise: bool = False,
                  plots: bool = True, preset: str = "auto", backend: str = "auto") -> None:
    """results.csv, summary.csv and excluded.csv, then T_heatmap.png and T_curves.png of
    the measured checkpoints that share the most common grouping (unless `plots` is
    off), and pairwise.csv/.png if asked."""
    folder.write_tables(rows, user_columns, records)
    ok = [(r, records[r.resolved]) for r in rows
          if r.resolved in records and records[r.resolved].status == "ok"]
    if not ok or not plots:
        return
    groups = Counter(tuple(rec.groups) for _, rec in ok).most_common(1)[0][0]
    same = [(row, rec) for row, rec in ok if tuple(rec.groups) == groups]
    labels = default_labels([row.path for row, _ in same])
    values = [[float(v) for v in rec.T] for _, rec in same]
    _figure(folder.out / "T_heatmap.png", lambda buf: figures.plot_heatmap(
        labels, list(groups), values, buf, title=f"T per group, {len(same)} checkpoints"))
    _figure(folder.out / "T_curves.png",
            lambda buf: figures.plot_group_curves(labels, list(groups), values, buf))
    if pairwise and len(same) >= 2:
        reference = same[0][0].pretrained
        members = [row.path for row, _ in same if row.pretrained == reference][:MAX_PAIRWISE]
        sim = similarity(members, reference, preset=preset, backend=backend,
                         labels=default_labels(members))
        atomic_write(folder.out / "pairwise.csv", sim.write_csv)
        _figure(folder.out / "pairwise.png", sim.plot)
