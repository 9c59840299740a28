"""report.figures: functions return Figures without saving; save_figure writes by suffix."""

import math

import pytest
from matplotlib.figure import Figure

from transfer_fast import testing, transferability
from transfer_fast.errors import TransferFastError
from transfer_fast.report import figures, study_figures
from transfer_fast.report.figures import pyplot, save_figure

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF", "svg": b"<?xml"}
SHAPES = {k: v for k, v in testing.resnet_shapes(18).items()
          if k.startswith(("conv1.", "bn1.", "layer1.", "fc."))}


@pytest.fixture(scope="module")
def result():
    return transferability(*testing.triple(SHAPES), backend="torch")


def test_figure_functions_return_figures_and_save_nothing(result, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = dict(pyplot().rcParams)
    labels, groups = ["a", "b"], result.groups
    made = [figures.transferability_figure(result),
            figures.heatmap_figure(labels, groups, [result.values, result.values]),
            figures.group_curves_figure(labels, groups, [result.values, [math.nan] * len(groups)]),
            figures.similarity_figure(labels, [[1.0, 0.5], [0.5, 1.0]], [[0.0, 2.0], [2.0, 0.0]]),
            study_figures.layerwise_figure(groups, [10, 20], {"u": {}, "t": {10: result.values}}),
            study_figures.gap_and_amount_figure([10, 20],
                                                {"t": [(1.0, 2.0, 10), (1.5, 3.0, 20)]},
                                                {"t": [2.0, 3.0]}),
            study_figures.trajectories_figure(["t"], [("t", [1, 2], [2.0, 1.5])])]
    try:
        assert all(isinstance(f, Figure) for f in made)
        assert all(f.get_layout_engine() is not None for f in made)  # the shared style
        assert list(tmp_path.iterdir()) == []
        assert dict(pyplot().rcParams) == before  # the style does not leak to the caller
    finally:
        for f in made:
            pyplot().close(f)


@pytest.mark.parametrize("fmt", ["png", "pdf", "svg"])
def test_save_figure_writes_the_suffix_format_and_closes(result, tmp_path, fmt):
    fig = figures.transferability_figure(result, title="T")
    path = save_figure(fig, tmp_path / f"t.{fmt.upper() if fmt == 'pdf' else fmt}")
    assert path.read_bytes().startswith(MAGIC[fmt])
    assert not pyplot().fignum_exists(fig.number)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


def test_save_figure_names_the_path_of_an_unknown_format(result, tmp_path):
    fig = figures.transferability_figure(result)
    with pytest.raises(TransferFastError, match=r"t\.xyz: cannot write \(Format 'xyz'"):
        save_figure(fig, tmp_path / "t.xyz")
    assert list(tmp_path.iterdir()) == [] and not pyplot().fignum_exists(fig.number)


def _save_and_find_clipped(fig, path) -> list[str]:
    """Saves `fig` with save_figure and lists the drawn, non-empty text artists whose
    window extent leaves the canvas, measured by the renderer that wrote the file (at
    the saved dpi, after the constrained layout ran)."""
    from matplotlib.text import Text

    found: list[list[str]] = []

    def measure(event):
        box, outside = event.canvas.figure.bbox, []
        for text in fig.findobj(Text):
            if not text.get_visible() or not text.get_text().strip() or not _drawn(text):
                continue
            ext = text.get_window_extent(event.renderer)
            if (ext.x0 < box.x0 - 1 or ext.y0 < box.y0 - 1 or ext.x1 > box.x1 + 1
                    or ext.y1 > box.y1 + 1):
                outside.append(f"{text.get_text()!r} at {ext.bounds} in {box.bounds}")
        found.append(outside)

    fig.canvas.mpl_connect("draw_event", measure)
    assert save_figure(fig, path).stat().st_size > 1000
    assert found, "the figure was never drawn"
    return found[-1]


def _drawn(text) -> bool:
    """Tick labels of ticks beyond the view limits exist but are never drawn."""
    ax = text.axes
    if ax is None:
        return True
    for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        for tick in axis.get_major_ticks():
            if text in (tick.label1, tick.label2):
                low, high = sorted(lim)
                return low - 1e-9 <= tick.get_loc() <= high + 1e-9
    return True


def _large_labels(k: int) -> list[str]:
    return [f"/data/experiments/sweep_lr_0.{i % 7}/run_{i:03d}/model.safetensors"
            for i in range(k)]


@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_large_heatmap_keeps_every_text_inside_the_saved_figure(tmp_path, fmt):
    """200 checkpoints x 100 groups with long labels and a long title: nothing clipped."""
    from transfer_fast.measure.similarity import default_labels

    rows, cols = 200, 100
    labels = default_labels(_large_labels(rows))
    assert labels[0] == "run_000/model" and len(set(labels)) == rows
    groups = [f"features.denseblock4.denselayer{g}.conv2" for g in range(cols)]
    values = [[0.5 + ((r * 7 + c) % 13) / 6 for c in range(cols)] for r in range(rows)]
    values[3][4] = math.nan
    title = "Transferability of a very long named sweep " * 6
    fig = figures.heatmap_figure(labels, groups, values, title=title)
    assert _save_and_find_clipped(fig, tmp_path / f"heat.{fmt}") == []
    w, h = fig.get_size_inches()
    assert w <= 16.0 and h <= 16.0
    ax = fig.axes[0]
    assert len(ax.get_yticks()) <= 40 and len(ax.get_xticks()) <= 40
    assert all(len(t.get_text()) <= 28 for t in ax.get_xticklabels() + ax.get_yticklabels())
    assert "\n" in ax.get_title()  # wrapped, not clipped


@pytest.mark.parametrize("k", [2, 64])
def test_pairwise_and_curves_keep_every_text_inside(tmp_path, k):
    from transfer_fast.measure.similarity import default_labels

    labels = default_labels(_large_labels(k))
    cosine = [[1.0 if i == j else ((i + j) % 5 - 2) / 4 for j in range(k)] for i in range(k)]
    l2 = [[abs(i - j) / k for j in range(k)] for i in range(k)]
    fig = figures.similarity_figure(labels, cosine, l2)
    assert _save_and_find_clipped(fig, tmp_path / "pairwise.png") == []
    cells = [t for t in fig.axes[0].texts]
    assert (len(cells) == k * k) if k <= 8 else cells == []  # values only in small matrices
    groups = [f"layer{g}" for g in range(30)]
    fig = figures.group_curves_figure(labels, groups, [[1.0 + g / 30] * 30 for g in range(k)])
    assert _save_and_find_clipped(fig, tmp_path / "curves.png") == []


def test_figure_path_and_formats(tmp_path):
    assert figures.figure_path(tmp_path, "T_heatmap", "PDF") == tmp_path / "T_heatmap.pdf"
    with pytest.raises(TransferFastError, match="figure format 'jpg'"):
        figures.figure_path(tmp_path, "x", "jpg")
