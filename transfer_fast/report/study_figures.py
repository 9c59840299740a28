"""Figures of a study over many runs and tasks (the experiment's report, `rank`):
T per layer group and data amount, T against G and N, trajectories, and the
transferability scores against each other and against the measured T. Same style and
conventions as `figures`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ..errors import TransferFastError
from .figures import MAIN_COLOR, UNIT_LINE, label_axis, plain_log_axes, pyplot, styled


def _task_colors(tasks: Sequence[str]) -> dict:
    cmap = pyplot().get_cmap("tab10")
    return {t: cmap(i % 10) for i, t in enumerate(tasks)}


@styled
def layerwise_figure(groups: list[str], amounts: list[int],
                     curves: Mapping[str, Mapping[int, list[float]]]):
    """One panel per task: mean T per group (network order), one line per data amount.

    curves: {task: {N: [T per group]}}; amounts: every N, in increasing order (the shades).
    """
    plt = pyplot()
    shade = {n: plt.get_cmap("viridis")(i / max(1, len(amounts) - 1))
             for i, n in enumerate(amounts)}
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3.4), sharey=True,
                             squeeze=False)
    for ax, (task, lines) in zip(axes[0], curves.items()):
        for n, values in lines.items():
            ax.plot(range(len(groups)), values, marker="o", ms=3, color=shade[n], label=f"N={n}")
        ax.set_title(task)
        ax.set_xticks(range(len(groups)), groups, rotation=90, fontsize=6)
        ax.axhline(1.0, **UNIT_LINE)
    axes[0][0].set_ylabel("T (mean over seeds)")
    axes[0][-1].legend(fontsize=7)
    return fig


@styled
def gap_and_amount_figure(amounts: list[int],
                          points: Mapping[str, Sequence[tuple[float, float, int]]],
                          means: Mapping[str, Sequence[float]]):
    """T against the gap G (one point per run, sized by N) and against the data amount N.

    points: {task: [(G, T, N) per run]}; means: {task: [mean T at each of `amounts`]}.
    """
    fig, (ax_g, ax_n) = pyplot().subplots(1, 2, figsize=(10, 4))
    colors = _task_colors(list(points))
    for task, runs in points.items():
        ax_g.scatter([g for g, _, _ in runs], [t for _, t, _ in runs], color=colors[task],
                     s=[12 + 40 * amounts.index(n) / max(1, len(amounts) - 1) for *_, n in runs],
                     label=task, alpha=0.8)
        ax_n.plot(amounts, means[task], marker="o", color=colors[task], label=task)
    ax_g.set(xlabel="domain gap G (BN statistics)", ylabel="T", yscale="log",
             title="T against the domain gap (marker size: N)")
    ax_n.set(xlabel="data amount N", ylabel="T (mean over seeds)", xscale="log", yscale="log",
             title="T against the data amount")
    ax_g.legend(fontsize=7)
    plain_log_axes(ax_g, ax_n)
    return fig


@styled
def trajectories_figure(tasks: Sequence[str],
                        curves: Sequence[tuple[str, Sequence[int], Sequence[float]]]):
    """Overall T after every fine-tuning epoch: curves are (task, epochs, overall T)."""
    fig, ax = pyplot().subplots(figsize=(7, 4))
    colors = _task_colors(tasks)
    for task, epochs, overall in curves:
        ax.plot(epochs, overall, color=colors[task], lw=0.8, alpha=0.6)
    for task in tasks:
        ax.plot([], [], color=colors[task], label=task)
    ax.set(xlabel="fine-tuning epoch", ylabel="overall T", yscale="log",
           title="Transferability during fine-tuning (every run)")
    ax.legend(fontsize=7)
    plain_log_axes(ax)
    return fig


SCORE_NAMES = {"logme": "LogME", "hscore": "H-score", "regularized_hscore": "reg. H-score",
                "transrate": "TransRate", "nce": "NCE", "leep": "LEEP"}


def _score_panels(scores: Mapping[str, Sequence[float]], items: Sequence[str],
                  what: str) -> tuple[list[str], int, int]:
    """The scores with a finite value (one panel each), and the grid's rows and columns
    (at most 3 across)."""
    names = [k for k in scores if any(math.isfinite(float(v)) for v in scores[k])]
    if not items or not names:
        raise TransferFastError(f"nothing to plot: no {what} with a finite score")
    cols = min(3, len(names))
    return names, math.ceil(len(names) / cols), cols


@styled
def scores_figure(labels: Sequence[str], scores: Mapping[str, Sequence[float]],
                  title: str | None = None):
    """One panel per transferability score (keys of `scores`, one value per label), bars per
    model, the best of each panel highlighted; scores with no finite value are left out."""
    plt = pyplot()
    names, rows, cols = _score_panels(scores, labels, "model")
    height = min(max(2.5, 0.25 * len(labels) + 1.2), 12.0)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, height * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        values = [float(v) for v in scores[name]]
        best = max(v for v in values if math.isfinite(v))
        ax.barh(range(len(labels)), [v if math.isfinite(v) else 0.0 for v in values],
                color=["tab:orange" if v == best else MAIN_COLOR for v in values])
        label_axis(ax, "y", list(labels))
        ax.invert_yaxis()
        ax.set_title(f"{SCORE_NAMES.get(name, name)} (higher is better)")
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title or f"Transferability scores of {len(labels)} candidate models")
    return fig


@styled
def scores_vs_t_figure(tasks: Sequence[str], mean_t: Sequence[float],
                       scores: Mapping[str, Sequence[float]],
                       taus: Mapping[str, float] | None = None):
    """One panel per score: each task's score (x) against its mean measured T (y, log),
    the points named by task; `taus` (Kendall's tau per score) goes into the titles.
    Tasks whose score or T is not finite are left out of a panel."""
    plt = pyplot()
    names, rows, cols = _score_panels(scores, tasks, "task")
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.3 * rows), squeeze=False)
    colors = _task_colors(list(tasks))
    for ax, name in zip(axes.flat, names):
        for task, x, y in zip(tasks, scores[name], mean_t):
            if math.isfinite(float(x)) and math.isfinite(float(y)) and y > 0:
                ax.scatter([x], [y], color=colors[task], label=task)
                ax.annotate(task, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        tau = (taus or {}).get(name, math.nan)
        ax.set(xlabel=SCORE_NAMES.get(name, name), yscale="log",
               title=SCORE_NAMES.get(name, name)
               + (f" (Kendall's tau {tau:+.2f})" if math.isfinite(tau) else ""))
        ax.grid(alpha=0.3)
        plain_log_axes(ax)
    for ax in axes[:, 0]:
        ax.set_ylabel("mean T over the task's runs")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(f"Transferability scores against measured T ({len(tasks)} tasks)")
    return fig
