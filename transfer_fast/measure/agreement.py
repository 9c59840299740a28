"""Rank agreement of two lists of scores: Kendall's tau-b and Vigna's weighted tau.

Used to ask whether a transferability score orders tasks (or models) the way a measured
quantity does. Pairs are compared directly, one row of the pair matrix at a time: O(n^2)
time and O(n) memory, so n is capped at MAX_N (5e7 pairs, about a second). The O(n log n)
merge-sort algorithms (Knight; Vigna) buy nothing at the few dozen items this is meant for.
Inputs must be finite; a constant input has no ranking, and gives NaN (as scipy does).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import TransferFastError

MAX_N = 10_000


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    """x, y as float64 vectors of one length (<= MAX_N), finite."""
    try:
        a = np.asarray(x, dtype=np.float64).ravel()
        b = np.asarray(y, dtype=np.float64).ravel()
    except (TypeError, ValueError) as exc:
        raise TransferFastError(f"rank agreement needs numbers ({exc})") from None
    if a.shape != b.shape:
        raise TransferFastError(f"rank agreement of {a.size} against {b.size} values: "
                                "expected one value of each per item")
    if a.size > MAX_N:
        raise TransferFastError(f"rank agreement of {a.size} items: at most MAX_N={MAX_N} "
                                "(the pairwise computation is O(n^2))")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise TransferFastError("rank agreement: the values must be finite (drop NaN/inf items)")
    return a, b


def _signs(v: np.ndarray, i: int) -> np.ndarray:
    """sign(v[j] - v[i]) for j > i, by comparison (exact, no overflow)."""
    rest = v[i + 1:]
    return (rest > v[i]).astype(np.int64) - (rest < v[i])


def kendall_tau(x, y) -> float:
    """Kendall's tau-b: (P - Q) / sqrt((n0 - n_x)(n0 - n_y)).

    P, Q: concordant and discordant pairs; n0 - n_x, n0 - n_y: the pairs not tied in x,
    not tied in y. Equals scipy.stats.kendalltau(x, y).statistic.

    Args:
        x, y: (n,) finite numbers, n <= MAX_N.
    Returns:
        tau-b in [-1, 1]; NaN when n < 2 or x or y is constant.
    """
    a, b = _pair(x, y)
    total = untied_x = untied_y = 0
    for i in range(a.size - 1):
        sx, sy = _signs(a, i), _signs(b, i)
        total += int(sx @ sy)
        untied_x += int(np.count_nonzero(sx))
        untied_y += int(np.count_nonzero(sy))
    if untied_x == 0 or untied_y == 0:
        return math.nan
    return total / math.sqrt(untied_x) / math.sqrt(untied_y)


def _weighted_ranked(a: np.ndarray, b: np.ndarray) -> float:
    """Vigna's tau_h with the decreasing lexicographic rank by (a, b): rank 0 for the
    largest a (ties broken by larger b, then by later position, as scipy's stable
    lexsort reversed), weight 1/(r + 1), a pair weighing the sum of its two weights."""
    n = a.size
    rank = np.empty(n, dtype=np.int64)
    rank[np.lexsort((b, a))[::-1]] = np.arange(n)
    weight = 1.0 / (rank + 1.0)
    inner = untied_a = untied_b = 0.0
    for i in range(n - 1):
        sa, sb = _signs(a, i), _signs(b, i)
        w = weight[i] + weight[i + 1:]
        inner += float(w @ (sa * sb))
        untied_a += float(w[sa != 0].sum())
        untied_b += float(w[sb != 0].sum())
    if untied_a == 0 or untied_b == 0:
        return math.nan
    return min(1.0, max(-1.0, inner / math.sqrt(untied_a) / math.sqrt(untied_b)))


def weighted_tau(x, y) -> float:
    """Weighted tau (Vigna 2015), additive hyperbolic weigher 1/(r + 1), averaged over the
    decreasing lexicographic rankings by (x, y) and by (y, x).

    Pairs among the top-ranked items weigh most, so agreement on which items are best counts
    more than agreement at the bottom. Equals scipy.stats.weightedtau(x, y).statistic (its
    defaults).

    Args:
        x, y: (n,) finite numbers, n <= MAX_N.
    Returns:
        The weighted tau in [-1, 1]; NaN when n < 2 or x or y is constant.
    """
    a, b = _pair(x, y)
    if a.size < 2:
        return math.nan
    return (_weighted_ranked(a, b) + _weighted_ranked(b, a)) / 2
