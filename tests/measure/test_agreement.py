"""kendall_tau and weighted_tau against scipy (a test dependency only)."""

import math

import numpy as np
import pytest

from transfer_fast.errors import TransferFastError
from transfer_fast.measure.agreement import MAX_N, kendall_tau, weighted_tau

stats = pytest.importorskip("scipy.stats")


def cases():
    rng = np.random.default_rng(0)
    out = []
    for n in (2, 3, 5, 8, 20, 57):
        out.append((rng.standard_normal(n), rng.standard_normal(n)))  # no ties
        out.append((rng.integers(0, 3, n), rng.standard_normal(n)))  # ties in x
        out.append((rng.integers(0, 4, n), rng.integers(0, 4, n)))  # ties in both, joint ties
        x = rng.standard_normal(n)
        out.append((x, 2 * x + 1))  # perfect agreement
        out.append((x, -x))  # perfect disagreement
    out.append(([12, 2, 1, 12, 2], [1, 4, 7, 1, 0]))  # scipy's documented example
    out.append(([1.0, 1.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.5]))
    return out


@pytest.mark.parametrize(("x", "y"), cases())
def test_kendall_tau_b_matches_scipy(x, y):
    want = stats.kendalltau(x, y).statistic
    got = kendall_tau(x, y)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-14) or (math.isnan(got)
                                                                and math.isnan(want))


@pytest.mark.parametrize(("x", "y"), cases())
def test_weighted_tau_matches_scipy_defaults(x, y):
    want = stats.weightedtau(x, y).statistic
    got = weighted_tau(x, y)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-14) or (math.isnan(got)
                                                                and math.isnan(want))


def test_documented_example_and_symmetry():
    x, y = [12, 2, 1, 12, 2], [1, 4, 7, 1, 0]
    assert weighted_tau(x, y) == pytest.approx(-0.56694968153682723, rel=1e-12)
    assert kendall_tau(x, y) == pytest.approx(-0.47140452079103173, rel=1e-12)
    assert weighted_tau(y, x) == pytest.approx(weighted_tau(x, y), rel=1e-12)


def test_weighted_tau_weighs_the_top_more():
    """One swap at the top costs more than the same swap at the bottom."""
    base = np.arange(10.0)[::-1]  # item 0 best
    top, bottom = base.copy(), base.copy()
    top[[0, 1]] = top[[1, 0]]
    bottom[[8, 9]] = bottom[[9, 8]]
    assert kendall_tau(base, top) == pytest.approx(kendall_tau(base, bottom))
    assert weighted_tau(base, top) < weighted_tau(base, bottom) < 1


def test_degenerate_and_bad_inputs():
    assert math.isnan(kendall_tau([1.0], [2.0])) and math.isnan(weighted_tau([1.0], [2.0]))
    assert math.isnan(kendall_tau([], [])) and math.isnan(weighted_tau([], []))
    assert math.isnan(kendall_tau([3, 3, 3], [1, 2, 3]))
    assert math.isnan(weighted_tau([1, 2, 3], [5, 5, 5]))
    with pytest.raises(TransferFastError, match="3 against 2 values"):
        kendall_tau([1, 2, 3], [1, 2])
    with pytest.raises(TransferFastError, match="finite"):
        weighted_tau([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(TransferFastError, match="MAX_N"):
        kendall_tau(np.zeros(MAX_N + 1), np.zeros(MAX_N + 1))
    with pytest.raises(TransferFastError, match="numbers"):
        kendall_tau(["a", "b"], [1, 2])
