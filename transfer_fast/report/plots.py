"""Tables, JSON, CSV and plots of a TransferabilityResult."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from ..measure.transferability import TransferabilityResult


def json_safe(x):
    """Strict JSON has no inf/nan: they are written as the strings "inf", "-inf", "nan"."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return x


def format_table(result: TransferabilityResult) -> str:
    """Group | D(r,B) | D(A,B) | T, then the overall; the classifier row is marked."""
    width = max([len("group"), *map(len, result.groups)])
    lines = [f"{'group':<{width}}  {'D(r,B)':>12}  {'D(A,B)':>12}  {'T':>10}"]
    for g, dr, da, t in zip(result.groups, result.d_random, result.d_pretrained, result.values):
        mark = "  (classifier, not in overall)" if g == result.classifier else ""
        lines.append(f"{g:<{width}}  {dr:>12.6g}  {da:>12.6g}  {t:>10.4f}{mark}")
    lines.append(f"{'overall':<{width}}  {'':>12}  {'':>12}  {result.overall:>10.4f}")
    lines.append(f"metric {result.metric}, preset {result.preset}")
    for name, why in result.excluded.items():
        lines.append(f"excluded {name}: {why}")
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)


def write_json(result: TransferabilityResult, path: str | Path) -> None:
    Path(path).write_text(json.dumps(json_safe(result.to_dict()), indent=2) + "\n")


def write_csv(result: TransferabilityResult, path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "d_random", "d_pretrained", "T", "in_overall"])
        for g, dr, da, t in zip(result.groups, result.d_random, result.d_pretrained,
                                result.values):
            w.writerow([g, repr(dr), repr(da), repr(t), int(g != result.classifier)])
        w.writerow(["overall", "", "", repr(result.overall), ""])


def plot(result: TransferabilityResult, path: str | Path, title: str | None = None) -> None:
    """T per group in network order, the overall as a dashed line (PNG)."""
    plt = pyplot()

    n = len(result.groups)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * n + 2), 4.0), layout="constrained")
    colors = ["0.6" if g == result.classifier else "tab:blue" for g in result.groups]
    finite = [v if math.isfinite(v) else 0.0 for v in result.values]
    ax.bar(range(n), finite, color=colors)
    ax.plot(range(n), finite, color="tab:blue", marker="o", lw=1)
    ax.axhline(result.overall, color="tab:red", ls="--", label=f"overall {result.overall:.3g}")
    ax.axhline(1.0, color="0.3", lw=0.8, ls=":", label="T = 1 (no benefit)")
    ax.set_xticks(range(n), result.groups, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(f"T = D(r,B) / D(A,B)   [{result.metric}]")
    ax.set_title(title or f"Layer-wise transferability ({result.preset} preset)")
    ax.legend(loc="best", fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Plots of many checkpoints at once (scan): shared helpers, then one function per figure.

_MAX_TICKS = 40  # more labels than this on one axis overlap: every n-th is shown instead


def pyplot():
    """pyplot on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plain_log_axes(*axes) -> None:
    """Log axes labelled 5, 10, 20, 50 rather than 5x10^0, 10^1, 2x10^1, 5x10^1."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    for ax in axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(ScalarFormatter())
                axis.set_minor_formatter(NullFormatter())


def label_axis(ax, axis: str, labels: list[str], max_ticks: int = _MAX_TICKS) -> None:
    """Tick labels on 'x' (long ones rotated) or 'y', smaller and thinned out as they grow."""
    ticks = list(range(0, len(labels), math.ceil(len(labels) / max_ticks)))
    # Figures grow with the counts (up to a cap), so a label's room shrinks only slowly.
    size = 8 if len(ticks) <= 20 else 7 if len(ticks) <= 40 else 6
    names = [labels[i] for i in ticks]
    if axis == "x" and max(map(len, names)) <= 4:  # short labels ('0', '12') stay upright
        ax.set_xticks(ticks, names, fontsize=size)
    elif axis == "x":
        ax.set_xticks(ticks, names, rotation=60, ha="right", rotation_mode="anchor",
                      fontsize=size)
    else:
        ax.set_yticks(ticks, names, fontsize=size)


def _check_table(labels: list[str], groups: list[str], values: list[list[float]]) -> None:
    if not labels or not groups:
        raise ValueError("nothing to plot: no checkpoints or no groups")
    if len(values) != len(labels) or any(len(row) != len(groups) for row in values):
        raise ValueError(f"values must be {len(labels)} rows (checkpoints) of {len(groups)} "
                         "values (groups)")


def plot_heatmap(labels: list[str], groups: list[str], values: list[list[float]],
                 path: str | Path, title: str | None = None) -> None:
    """Checkpoints x groups heatmap of T (values: one row per label, one column per group)."""
    import numpy as np

    plt = pyplot()
    _check_table(labels, groups, values)
    data = np.ma.masked_invalid(np.asarray(values, dtype=np.float64))  # NaN/inf -> grey
    rows, cols = data.shape
    fig, ax = plt.subplots(figsize=(min(3.5 + 0.28 * cols, 20.0), min(2.0 + 0.22 * rows, 16.0)),
                           layout="constrained")
    image = ax.imshow(data, aspect="auto", interpolation="nearest",
                      cmap=plt.get_cmap("viridis").with_extremes(bad="0.75"))
    label_axis(ax, "x", groups)
    label_axis(ax, "y", labels)
    ax.set_xlabel("layer group (network order)")
    ax.set_ylabel("checkpoint")
    note = "\n(grey: NaN or inf)" if data.mask.any() else ""
    bar = fig.colorbar(image, ax=ax, shrink=0.9)
    bar.set_label(f"T = D(r,B) / D(A,B){note}")
    low, high = image.get_clim()
    if low < 1.0 < high:  # T = 1 is where pre-training stops helping
        bar.ax.axhline(1.0, color="white", lw=1.5)
    ax.set_title(title or f"Transferability T of {rows} checkpoints")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_group_curves(labels: list[str], groups: list[str], values: list[list[float]],
                      path: str | Path, max_curves: int = 12, title: str | None = None) -> None:
    """T per group in network order, one line for each of the first `max_curves` checkpoints."""
    plt = pyplot()
    _check_table(labels, groups, values)
    shown = min(len(labels), max_curves)
    colors = plt.get_cmap("tab10" if shown <= 10 else "tab20").colors
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.3 * len(groups) + 3.0), 20.0), 4.5),
                           layout="constrained")
    gaps = False
    for k in range(shown):
        # NaN/inf leave a gap in the line rather than stretching the axis to infinity.
        row = [v if math.isfinite(v) else math.nan for v in values[k]]
        gaps = gaps or any(math.isnan(v) for v in row)
        ax.plot(range(len(groups)), row, marker="o", ms=3, lw=1.2, color=colors[k % len(colors)],
                label=labels[k])
    ax.axhline(1.0, color="0.3", lw=0.8, ls=":", label="T = 1 (no benefit)")
    label_axis(ax, "x", groups)
    ax.set_ylabel("T = D(r,B) / D(A,B)" + ("   (gaps: NaN or inf)" if gaps else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    more = f" (first {shown} of {len(labels)})" if shown < len(labels) else ""
    ax.set_title(title or f"Transferability per layer group{more}")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _annotate(ax, image, data, fmt: str) -> None:
    """Each cell's value (for small matrices), in black or white against the cell's colour."""
    import numpy as np

    for (i, j), v in np.ndenumerate(data.filled(np.nan)):  # NaN: "nan" on the grey cell
        r, g, b, _ = image.cmap(image.norm(v))
        ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7,
                color="black" if 0.3 * r + 0.6 * g + 0.1 * b > 0.5 else "white")


def plot_similarity(labels: list[str], cosine: list[list[float]], l2: list[list[float]],
                    path: str | Path, title: str | None = None) -> None:
    """K x K cosine similarity and L2 distance of fine-tuning updates, side by side."""
    import numpy as np
    from matplotlib.colors import Normalize

    plt = pyplot()
    k = len(labels)
    side = min(max(3.0, 0.2 * k + 1.5), 10.0)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 2.5, side + 1.0), layout="constrained")
    cos = np.ma.masked_invalid(np.asarray(cosine, dtype=np.float64))
    dist = np.ma.masked_invalid(np.asarray(l2, dtype=np.float64))
    # The diagonal is always 1: scale the colours to the off-diagonal cosines so that
    # they are told apart, symmetric about 0 (same direction red, opposite blue).
    off = np.abs(cos[~np.eye(k, dtype=bool)]).compressed()
    vlim = float(off.max()) if off.size and off.max() > 0 else 1.0
    panels = ((axes[0], cos, "RdBu_r", Normalize(-vlim, vlim), "cosine similarity", ".2f"),
              (axes[1], dist, "viridis", Normalize(0.0, None), "L2 distance", ".3g"))
    for ax, data, cmap, norm, name, fmt in panels:
        image = ax.imshow(data, cmap=plt.get_cmap(cmap).with_extremes(bad="0.75"), norm=norm,
                          interpolation="nearest")
        extend = "max" if data is cos and vlim < 1.0 else "neither"
        bar = fig.colorbar(image, ax=ax, shrink=0.8, extend=extend)
        if extend == "max":
            bar.set_label("diagonal = 1, beyond the scale")
        label_axis(ax, "x", labels, max_ticks=60)
        label_axis(ax, "y", labels, max_ticks=60)
        ax.set_title(name)
        if k <= 8:
            _annotate(ax, image, data, fmt)
    grey = "  (grey: undefined, a zero update)" if cos.mask.any() else ""
    fig.suptitle((title or f"Fine-tuning updates of {k} checkpoints") + grey)
    fig.savefig(path, dpi=120)
    plt.close(fig)
