"""The figure of `rank`: every transferability score per candidate model."""

from __future__ import annotations

import math
from pathlib import Path

from .plots import pyplot

_NAMES = {"logme": "LogME", "hscore": "H-score", "regularized_hscore": "reg. H-score",
          "transrate": "TransRate", "nce": "NCE", "leep": "LEEP"}


def save_scores_figure(records, path: str | Path) -> Path:
    """One panel per score (bars per model, best highlighted); failed models left out."""
    plt = pyplot()
    ok = [r for r in records if r.status == "ok"]
    names = [k for k in _NAMES if any(math.isfinite(r.scores.get(k, math.nan)) for r in ok)]
    cols = min(3, len(names)) or 1
    rows = math.ceil(len(names) / cols) or 1
    height = max(2.5, 0.28 * len(ok) + 1.2)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, height * rows), squeeze=False,
                             layout="constrained")
    labels = [r.label for r in ok]
    for ax, name in zip(axes.flat, names):
        values = [r.scores.get(name, math.nan) for r in ok]
        finite = [v for v in values if math.isfinite(v)]
        best = max(finite) if finite else math.nan
        colors = ["tab:orange" if v == best else "tab:blue" for v in values]
        ax.barh(range(len(ok)), [v if math.isfinite(v) else 0.0 for v in values], color=colors)
        ax.set_yticks(range(len(ok)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(_NAMES[name] + " (higher is better)", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(f"Transferability scores of {len(ok)} candidate models")
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return Path(path)
