"""What a finished scan leaves in its run folder: tables, plots and the pairwise view.

Every file goes through io/files (tables) or report.figures.save_figure (figures): a
reader sees the old file or the new one, and a failed write is an error naming the file.
"""

from __future__ import annotations

from collections import Counter

from ..measure.similarity import default_labels, similarity
from ..report.figures import group_curves_figure, heatmap_figure, save_figure
from .scan_journal import RunFolder, ScanRecord, ScanRow

# The pairwise view holds every member's update in memory: it is meant for a few dozen.
MAX_PAIRWISE = 64


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
    save_figure(heatmap_figure(labels, list(groups), values,
                               title=f"T per group, {len(same)} checkpoints"),
                folder.out / "T_heatmap.png")
    save_figure(group_curves_figure(labels, list(groups), values), folder.out / "T_curves.png")
    if pairwise and len(same) >= 2:
        reference = same[0][0].pretrained
        members = [row.path for row, _ in same if row.pretrained == reference][:MAX_PAIRWISE]
        sim = similarity(members, reference, preset=preset, backend=backend,
                         labels=default_labels(members))
        sim.write_csv(folder.out / "pairwise.csv")
        sim.plot(folder.out / "pairwise.png")
