"""report.figures: functions return Figures without saving; save_figure writes by suffix."""

import math

import pytest
from matplotlib.figure import Figure

from transfer_fast import testing, transferability
from transfer_fast.errors import TransferFastError
from transfer_fast.report import figures
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
            figures.layerwise_figure(groups, [10, 20], {"u": {}, "t": {10: result.values}}),
            figures.gap_and_amount_figure([10, 20], {"t": [(1.0, 2.0, 10), (1.5, 3.0, 20)]},
                                          {"t": [2.0, 3.0]}),
            figures.trajectories_figure(["t"], [("t", [1, 2], [2.0, 1.5])])]
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
