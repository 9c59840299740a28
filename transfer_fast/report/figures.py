"""Figures of measured results: each function returns a matplotlib Figure, `save_figure`
writes one.

Nothing here measures or decides: the functions draw the numbers they are given, all in
one style (`STYLE`, the reference line at T = 1, the colours). `save_figure` is the only
way a figure reaches a file: through io.files.atomic_write, in the format the path's
suffix names (`FORMATS`; `figure_path` picks the suffix), and the figure is closed.

Figures stay readable for a few hundred checkpoints x a hundred groups: sizes grow with
the counts up to a cap, tick labels are thinned and shortened, titles wrapped to the
figure's width, and the constrained layout keeps every label inside the canvas.
"""

from __future__ import annotations

import functools
import math
import textwrap
from pathlib import Path

from ..errors import TransferFastError
from ..io.files import atomic_write

# rcParams every figure is drawn under (the caller's own rcParams are left as they were).
STYLE = {"figure.constrained_layout.use": True, "font.size": 9, "axes.titlesize": 10,
         "axes.labelsize": 9, "figure.titlesize": 11, "xtick.labelsize": 8,
         "ytick.labelsize": 8, "legend.fontsize": 8, "image.interpolation": "nearest",
         "savefig.dpi": 150}
FORMATS = ("png", "pdf", "svg")  # what --format offers; save_figure takes any matplotlib has
DPI = 150  # raster formats; pdf and svg are vector and ignore it
MAIN_COLOR, _MEAN = "tab:blue", "tab:red"  # the measured values; their mean or overall
UNIT_LINE = {"color": "0.3", "lw": 0.8, "ls": ":"}  # T = 1: where pre-training stops helping
_T = "T = D(r,B) / D(A,B)"
_MAX_TICKS = 40  # more labels than this on one axis overlap: every n-th is shown instead
_MAX_LABELLED = 15  # more point labels than this overlap into an unreadable plot
_MAX_LABEL_CHARS = 28  # longer tick labels keep their end ("…run_017/model")
_MAX_ANNOTATED = 8  # matrices up to this side get their values written in the cells
_MAX_SIDE = 16.0  # inches: figures grow with the counts up to this


def pyplot():
    """pyplot on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_path(folder: str | Path, name: str, fmt: str = "png") -> Path:
    """`folder/name.fmt` for one of FORMATS; TransferFastError for another format."""
    fmt = check_format(fmt)
    return Path(folder) / f"{name}.{fmt}"


def check_format(fmt: str) -> str:
    """`fmt` in lower case if it is one of FORMATS, else TransferFastError."""
    if not isinstance(fmt, str) or fmt.lower().lstrip(".") not in FORMATS:
        raise TransferFastError(f"figure format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return fmt.lower().lstrip(".")


def save_figure(fig, path: str | Path, *, dpi: int = DPI) -> Path:
    """Writes `fig` to `path` atomically, in the format of its suffix (png, pdf, svg...;
    png without one), and closes it. `dpi` applies to raster formats. Raises
    TransferFastError naming `path` for a format matplotlib lacks or a failed write."""
    path = Path(path)
    fmt = path.suffix[1:].lower() or "png"
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))
    finally:
        pyplot().close(fig)


def styled(draw):
    @functools.wraps(draw)
    def styled(*args, **kwargs):
        with pyplot().rc_context(STYLE):
            return draw(*args, **kwargs)
    return styled


def plain_log_axes(*axes) -> None:
    """Log axes labelled 5, 10, 20, 50 rather than 5x10^0, 10^1, 2x10^1, 5x10^1."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    for ax in axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(ScalarFormatter())
                axis.set_minor_formatter(NullFormatter())


def wrap_title(text: str, fig, *, share: float = 1.0, size: float = 10.0) -> str:
    """`text` broken into lines that fit `share` of the figure's width at `size` points
    (an average character is taken as 0.55 em), so a long title is never clipped."""
    chars = max(20, int(fig.get_figwidth() * share * 72 / (0.55 * size)))
    return "\n".join(textwrap.fill(line, chars) for line in text.splitlines())


def short_label(label: str, limit: int = _MAX_LABEL_CHARS) -> str:
    """A tick label of at most `limit` characters: the end is kept, where paths differ."""
    label = str(label)
    return label if len(label) <= limit else "…" + label[-(limit - 1):]


def _side(count: int, per_item: float, base: float, cap: float = _MAX_SIDE) -> float:
    """Inches for `count` rows or columns: `base` plus `per_item` each, at most `cap`."""
    return min(base + per_item * count, cap)


def _thinned(count: int, max_ticks: int, lead: str = ", ") -> str:
    """The note an axis label gets when label_axis names only every n-th of `count` items."""
    step = math.ceil(count / max_ticks)
    return "" if step == 1 else f"{lead}1 in {step} named" + (")" if lead.endswith("(") else "")


def label_axis(ax, axis: str, labels: list[str], max_ticks: int = _MAX_TICKS) -> None:
    """Tick labels on 'x' (long ones rotated) or 'y', smaller, shortened and thinned out
    (every n-th) as they grow."""
    ticks = list(range(0, len(labels), math.ceil(len(labels) / max_ticks)))
    # Figures grow with the counts (up to a cap), so a label's room shrinks only slowly.
    size = 8 if len(ticks) <= 20 else 7 if len(ticks) <= 40 else 6
    names = [short_label(labels[i]) for i in ticks]
    if axis == "x" and max(map(len, names)) <= 4:  # short labels ('0', '12') stay upright
        ax.set_xticks(ticks, names, fontsize=size)
    elif axis == "x":
        ax.set_xticks(ticks, names, rotation=60, ha="right", rotation_mode="anchor",
                      fontsize=size)
    else:
        ax.set_yticks(ticks, names, fontsize=size)


def _finite(values) -> list[float]:
    """NaN/inf as NaN: a gap in a line rather than an axis stretched to infinity."""
    return [v if math.isfinite(v) else math.nan for v in values]


# ---- one result ------------------------------------------------------------------------

@styled
def transferability_figure(result, title: str | None = None):
    """A TransferabilityResult: T per group in network order, the overall dashed."""
    n = len(result.groups)
    fig, ax = pyplot().subplots(figsize=(max(6.0, 0.35 * n + 2), 4.0))
    colors = ["0.6" if g == result.classifier else MAIN_COLOR for g in result.groups]
    finite = [v if math.isfinite(v) else 0.0 for v in result.values]
    ax.bar(range(n), finite, color=colors)
    ax.plot(range(n), finite, color=MAIN_COLOR, marker="o", lw=1)
    ax.axhline(result.overall, color=_MEAN, ls="--", label=f"overall {result.overall:.3g}")
    ax.axhline(1.0, **UNIT_LINE, label="T = 1 (no benefit)")
    ax.set_xticks(range(n), result.groups, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(f"{_T}   [{result.metric}]")
    ax.set_title(title or f"Layer-wise transferability ({result.preset} preset)")
    ax.legend(loc="best")
    return fig


@styled
def bn_gap_figure(result, title: str | None = None):
    """A BNGapResult: the gap per BN layer in network order, the mean dashed."""
    fig, ax = pyplot().subplots(figsize=(max(6.0, 0.22 * len(result.layers) + 2), 3.6))
    ax.bar(range(len(result.values)), result.values, color=MAIN_COLOR)
    ax.axhline(result.mean, ls="--", color=_MEAN, label=f"mean {result.mean:.3g}")
    label_axis(ax, "x", result.layers)
    ax.set_ylabel(f"BN-statistics gap ({result.metric})")
    ax.set_title(title or f"Domain gap per BatchNorm layer ({result.samples} samples)")
    ax.legend()
    return fig


@styled
def model_fit_figure(model, title: str | None = None):
    """A TransferabilityModel: predicted (in-sample and leave-one-out) against measured T,
    log-log, with the identity line."""
    fig, ax = pyplot().subplots(figsize=(5.5, 5.0))
    ax.scatter(model.measured, model.predictions, marker="o", color=MAIN_COLOR,
               label=f"in-sample, R² = {model.r2:.2f}")
    ax.scatter(model.measured, model.loo_predictions, marker="x", color=_MEAN,
               label=f"leave-one-out, R² = {model.loo_r2:.2f}")
    for label, x, y in zip(model.labels, model.measured, model.predictions):
        if label and len(model.labels) <= _MAX_LABELLED:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    values = [v for v in model.measured + model.predictions + model.loo_predictions
              if math.isfinite(v)]
    low, high = min(values) / 1.5, max(values) * 1.5
    ax.plot([low, high], [low, high], color="0.4", lw=0.8, ls="--", label="predicted = measured")
    ax.set(xscale="log", yscale="log", xlim=(low, high), ylim=(low, high),
           xlabel="measured T", ylabel="predicted T")
    plain_log_axes(ax)
    terms = " ".join(f"{model.coefficients[k]:+.2f} {k}" for k in model.coefficients)
    ax.set_title(title or f"log T = {terms} {model.intercept:+.2f}"
                 + (" (z-scored)" if model.zscore else ""), fontsize=9)
    ax.legend(loc="best")
    return fig


@styled
def trajectory_figure(trajectory, title: str | None = None):
    """A Trajectory: T per group against the epoch, coloured by depth; the overall thick."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    groups = trajectory.plan.groups
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    cmap = plt.get_cmap("viridis")
    for g, name in enumerate(groups):
        ax.plot(trajectory.epochs, _finite(row[g] for row in trajectory.values),
                color=cmap(g / max(1, len(groups) - 1)), lw=1,
                label=name if len(groups) <= 12 else None)
    ax.plot(trajectory.epochs, trajectory.overall, color="black", lw=2.5, label="overall")
    ax.axhline(1.0, **UNIT_LINE)
    if len(groups) > 12:  # a legend that long hides the plot: a depth colour bar instead
        bar = fig.colorbar(plt.cm.ScalarMappable(cmap=cmap), ax=ax, ticks=[0, 1])
        bar.ax.set_yticklabels([groups[0], groups[-1]])
        bar.set_label("group, by depth")
    ax.legend(loc="best", fontsize=7, ncol=2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel(f"{_T}   [{trajectory.metric}]")
    ax.set_title(title or "Transferability during fine-tuning")
    return fig


# ---- many checkpoints (scan, similarity) -----------------------------------------------

def _check_table(labels: list[str], groups: list[str], values: list[list[float]]) -> None:
    if not labels or not groups:
        raise TransferFastError("nothing to plot: no checkpoints or no groups")
    if len(values) != len(labels) or any(len(row) != len(groups) for row in values):
        raise TransferFastError(f"values must be {len(labels)} rows (checkpoints) of "
                                f"{len(groups)} values (groups)")


@styled
def heatmap_figure(labels: list[str], groups: list[str], values: list[list[float]],
                   title: str | None = None):
    """Checkpoints x groups heatmap of T (values: one row per label, one column per group)."""
    import numpy as np

    plt = pyplot()
    _check_table(labels, groups, values)
    data = np.ma.masked_invalid(np.asarray(values, dtype=np.float64))  # NaN/inf -> grey
    rows, cols = data.shape
    fig, ax = plt.subplots(figsize=(_side(cols, 0.2, 5.0), _side(rows, 0.16, 3.0)))
    image = ax.imshow(data, aspect="auto", cmap=plt.get_cmap("viridis").with_extremes(bad="0.75"))
    label_axis(ax, "x", groups)
    label_axis(ax, "y", labels)
    ax.set_xlabel("layer group (network order" + _thinned(cols, _MAX_TICKS) + ")")
    ax.set_ylabel("checkpoint" + _thinned(rows, _MAX_TICKS, " ("))
    bar = fig.colorbar(image, ax=ax, shrink=0.9, fraction=0.05, pad=0.02)
    bar.set_label(_T)
    low, high = image.get_clim()
    if low < 1.0 < high:
        bar.ax.axhline(1.0, color="white", lw=1.5)
    note = "  (grey: NaN or inf)" if data.mask.any() else ""
    ax.set_title(wrap_title((title or f"Transferability T of {rows} checkpoints x {cols} groups")
                            + note, fig, share=0.8))
    return fig


@styled
def group_curves_figure(labels: list[str], groups: list[str], values: list[list[float]],
                        max_curves: int = 12, title: str | None = None):
    """T per group in network order, one line for each of the first `max_curves` checkpoints."""
    plt = pyplot()
    _check_table(labels, groups, values)
    shown = min(len(labels), max_curves)
    colors = plt.get_cmap("tab10" if shown <= 10 else "tab20").colors
    fig, ax = plt.subplots(figsize=(_side(len(groups), 0.2, 6.0), 4.5))
    gaps = False
    for k in range(shown):
        row = _finite(values[k])
        gaps = gaps or any(math.isnan(v) for v in row)
        ax.plot(range(len(groups)), row, marker="o", ms=3, lw=1.2, color=colors[k % len(colors)],
                label=short_label(labels[k]))
    ax.axhline(1.0, **UNIT_LINE, label="T = 1 (no benefit)")
    label_axis(ax, "x", groups)
    ax.set_ylabel(_T + ("   (gaps: NaN or inf)" if gaps else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    more = f" (first {shown} of {len(labels)})" if shown < len(labels) else ""
    ax.set_title(wrap_title(title or f"Transferability per layer group{more}", fig, share=0.7))
    return fig


def _annotate(ax, image, data, fmt: str) -> None:
    """Each cell's value (for small matrices), in black or white against the cell's colour."""
    import numpy as np

    for (i, j), v in np.ndenumerate(data.filled(np.nan)):  # NaN: "nan" on the grey cell
        r, g, b, _ = image.cmap(image.norm(v))
        ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7,
                color="black" if 0.3 * r + 0.6 * g + 0.1 * b > 0.5 else "white")


@styled
def similarity_figure(labels: list[str], cosine: list[list[float]], l2: list[list[float]],
                      title: str | None = None):
    """K x K cosine similarity and L2 distance of fine-tuning updates, side by side."""
    import numpy as np
    from matplotlib.colors import Normalize

    plt = pyplot()
    k = len(labels)
    side = max(3.5, _side(k, 0.12, 2.5, cap=8.0))
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 2.5, side + 1.2))
    cos = np.ma.masked_invalid(np.asarray(cosine, dtype=np.float64))
    dist = np.ma.masked_invalid(np.asarray(l2, dtype=np.float64))
    # The diagonal is always 1: scale the colours to the off-diagonal cosines so that
    # they are told apart, symmetric about 0 (same direction red, opposite blue).
    off = np.abs(cos[~np.eye(k, dtype=bool)]).compressed()
    vlim = float(off.max()) if off.size and off.max() > 0 else 1.0
    panels = ((axes[0], cos, "RdBu_r", Normalize(-vlim, vlim), "cosine similarity", ".2f"),
              (axes[1], dist, "viridis", Normalize(0.0, None), "L2 distance", ".3g"))
    for ax, data, cmap, norm, name, fmt in panels:
        image = ax.imshow(data, cmap=plt.get_cmap(cmap).with_extremes(bad="0.75"), norm=norm)
        extend = "max" if data is cos and vlim < 1.0 else "neither"
        bar = fig.colorbar(image, ax=ax, shrink=0.8, extend=extend)
        if extend == "max":
            bar.set_label("diagonal = 1, beyond the scale")
        label_axis(ax, "x", labels, max_ticks=30)
        label_axis(ax, "y", labels, max_ticks=30)
        ax.set_title(name)
        if k <= _MAX_ANNOTATED:
            _annotate(ax, image, data, fmt)
    grey = "  (grey: undefined, a zero update)" if cos.mask.any() else ""
    fig.suptitle(wrap_title((title or f"Fine-tuning updates of {k} checkpoints") + grey
                            + _thinned(k, 30, " ("), fig, size=11))
    return fig


# ---- an experiment (report.md): numbers already aggregated by report.experiment --------
