"""The paper's explanatory model across data sets: log T = b_G G + b_D D + b_N log N + c.

Least squares in float64 with the natural log and, by default, z-scored predictors (the paper's
intercepts match those: with z-scoring, c is the mean of log T).

Rows are rarely independent: in an experiment, G and D take one value per task, however many
runs the task has. Passing `groups` (the task of each row) gives cluster-robust (CR1) standard
errors with clusters - 1 degrees of freedom and a cluster bootstrap (tasks resampled with
replacement) for 95% confidence intervals, so that the effect of a per-task quantity is judged
on the number of tasks, not of runs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import TransferFastError

PREDICTORS = ("G", "D", "logN")
TERMS = ("intercept", *PREDICTORS)
MIN_ROWS = 5  # more rows than the 4 parameters, else no degrees of freedom for the errors
MIN_DF = 3  # fewer residual degrees of freedom than this: the fit supports no finding
MIN_BOOTSTRAP = 50  # fewer usable resamples than this: no bootstrap interval
MAX_COND = 1e12  # condition number above which a design counts as collinear
LEVEL = 0.95


@dataclass
class TransferabilityModel:
    """A fitted model. predictions / loo_predictions / measured: T (not log T), one per row;
    loo_predictions from fits without that row. r2, loo_r2: of log T. means / stds: the
    z-score of each predictor (0 and 1 without z-scoring); stds are population (ddof=0).

    stderr: classical OLS errors (rows independent), df_resid = rows - 4 degrees of freedom.
    cluster_stderr: CR1 cluster-robust errors, clustered by `groups` (each row its own
    cluster without groups: HC1); cluster_df = min(clusters - 1, rows - 4), the degrees of
    freedom that go with them, for every coefficient. ci: 95% percentile intervals from
    `bootstrap` cluster resamples, of which `bootstrap_used` were not degenerate (NaN when
    fewer than MIN_BOOTSTRAP were); draws: their coefficients (used, 4) in TERMS order.
    """

    coefficients: dict[str, float]
    intercept: float
    stderr: dict[str, float]
    r2: float
    loo_r2: float
    predictions: list[float]
    loo_predictions: list[float]
    measured: list[float]
    labels: list[str | None]
    zscore: bool
    means: dict[str, float]
    stds: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    df_resid: int = 0
    clusters: int = 0
    cluster_stderr: dict[str, float] = field(default_factory=dict)
    cluster_df: int = 0
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    bootstrap: int = 0
    bootstrap_used: int = 0
    draws: np.ndarray | None = field(default=None, repr=False, compare=False)

    def predict(self, rows: Sequence) -> list[float]:
        """Predicted T for rows with G, D, N (keys or attributes; T not needed)."""
        x = _predictors(rows, need_t=False)[0]
        return np.exp(self._design(x) @ self._beta()).tolist()

    @property
    def reliable(self) -> bool:
        """At least MIN_DF residual degrees of freedom (cluster_df) and a leave-one-out R²
        >= 0: below either, the coefficients support no finding."""
        return self.cluster_df >= MIN_DF and self.loo_r2 >= 0

    def sign_verdict(self, term: str, expected: int) -> str:
        """'supported' when the 95% interval of `term` lies on the side of zero that
        `expected` (-1 or +1) names, 'contradicted' when it lies on the other side,
        'not supported' when it includes zero, 'undetermined' without an interval."""
        return interval_verdict(self.ci.get(term, (math.nan, math.nan)), expected)

    def draw_interval(self, fn: Callable[[np.ndarray], np.ndarray]) -> tuple[float, float]:
        """95% percentile interval of fn(draws) (fn maps (k, 4) coefficients, TERMS
        order, to (k,) values); NaN without enough usable resamples."""
        if self.draws is None or len(self.draws) < MIN_BOOTSTRAP:
            return (math.nan, math.nan)
        return _percentiles(np.asarray(fn(self.draws), dtype=np.float64))

    def _beta(self) -> np.ndarray:
        return np.array([self.intercept] + [self.coefficients[k] for k in PREDICTORS])

    def _design(self, x: np.ndarray) -> np.ndarray:
        """(n, 4): a column of ones, then the (z-scored) predictors G, D, log N."""
        mean = np.array([self.means[k] for k in PREDICTORS])
        std = np.array([self.stds[k] for k in PREDICTORS])
        return np.column_stack([np.ones(len(x)), (x - mean) / std])

    def to_dict(self) -> dict:
        return {"coefficients": dict(self.coefficients), "intercept": self.intercept,
                "stderr": dict(self.stderr), "r2": self.r2, "loo_r2": self.loo_r2,
                "predictions": list(self.predictions),
                "loo_predictions": list(self.loo_predictions), "measured": list(self.measured),
                "labels": list(self.labels), "zscore": self.zscore, "means": dict(self.means),
                "stds": dict(self.stds), "warnings": list(self.warnings),
                "df_resid": self.df_resid, "clusters": self.clusters,
                "cluster_stderr": dict(self.cluster_stderr), "cluster_df": self.cluster_df,
                "ci": {k: list(v) for k, v in self.ci.items()}, "bootstrap": self.bootstrap,
                "bootstrap_used": self.bootstrap_used, "reliable": self.reliable}

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Predicted (in-sample and leave-one-out) vs measured T, log-log, identity line."""
        # The one allowed upward import (only inside `plot`): figures live in report/.
        from ..report.figures import model_fit_figure, save_figure
        return save_figure(model_fit_figure(self, title=title), path)


def interval_verdict(interval: tuple[float, float], expected: int) -> str:
    """'supported' / 'contradicted' / 'not supported' / 'undetermined' for an interval
    and the sign (-1 or +1) a claim expects of it (see TransferabilityModel.sign_verdict)."""
    low, high = (expected * v for v in interval)
    if not (math.isfinite(low) and math.isfinite(high)):
        return "undetermined"
    if min(low, high) > 0:
        return "supported"
    if max(low, high) < 0:
        return "contradicted"
    return "not supported"


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _loo_r2(y: np.ndarray, loo: np.ndarray) -> float:
    """R² of the leave-one-out predictions over the rows that have one (NaN if < 2)."""
    ok = np.isfinite(loo)
    if ok.sum() < 2:
        return math.nan
    total = ((y[ok] - y[ok].mean()) ** 2).sum()
    return float(1 - ((y[ok] - loo[ok]) ** 2).sum() / total)


def _field(row, i: int, key: str):
    """row[key] of a mapping, or row.key of any other object (a dataclass record)."""
    if isinstance(row, Mapping):
        if key not in row:
            raise TransferFastError(f"row {i}: missing key {key!r} (need T, G, D, N)")
        return row[key]
    if not hasattr(row, key):
        raise TransferFastError(f"row {i}: expected a mapping or an object with T, G, D, N; "
                                f"{type(row).__name__} has no {key!r}")
    return getattr(row, key)


def _value(row, i: int, key: str) -> float:
    raw = _field(row, i, key)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise TransferFastError(f"row {i}: {key} = {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise TransferFastError(f"row {i}: {key} = {value} is not finite")
    if key in ("T", "N") and value <= 0:
        raise TransferFastError(f"row {i}: {key} = {value:g} must be > 0 (its log is taken)")
    return value


def _label(row) -> str | None:
    """The row's 'label', 'name' or 'run' (key or attribute), for the plot."""
    for key in ("label", "name", "run"):
        value = row.get(key) if isinstance(row, Mapping) else getattr(row, key, None)
        if value is not None:
            return str(value)
    return None


def _predictors(rows: Sequence, need_t: bool) -> tuple[np.ndarray, np.ndarray]:
    """(x (n, 3) with columns G, D, log N; log T (n,), empty unless need_t)."""
    x = np.array([[_value(r, i, "G"), _value(r, i, "D"), math.log(_value(r, i, "N"))]
                  for i, r in enumerate(rows)], dtype=np.float64).reshape(-1, 3)
    y = np.array([math.log(_value(r, i, "T")) for i, r in enumerate(rows)] if need_t else [])
    return x, y


def _cluster_codes(groups: Sequence[Hashable] | None, n: int) -> tuple[np.ndarray, int]:
    """(cluster index per row, number of clusters); every row its own without groups."""
    if groups is None:
        return np.arange(n), n
    groups = list(groups)
    if len(groups) != n:
        raise TransferFastError(f"groups: {len(groups)} labels for {n} rows (need one per row)")
    index: dict = {}
    codes = np.array([index.setdefault(g, len(index)) for g in groups], dtype=np.int64)
    if len(index) < 2:
        raise TransferFastError("groups: one cluster; cluster-robust errors need at least two")
    return codes, len(index)


def _cr1(design: np.ndarray, resid: np.ndarray, xtx_inv: np.ndarray, codes: np.ndarray,
         clusters: int) -> np.ndarray:
    """CR1 covariance: c (X^T X)^-1 (sum_g X_g^T e_g e_g^T X_g) (X^T X)^-1,
    c = G / (G - 1) * (n - 1) / (n - p) (Stata's small-sample factor; HC1 when G = n)."""
    n, p = design.shape
    scores = np.zeros((clusters, p))
    np.add.at(scores, codes, design * resid[:, None])
    factor = clusters / (clusters - 1) * (n - 1) / (n - p)
    return factor * xtx_inv @ (scores.T @ scores) @ xtx_inv


def _bootstrap(design: np.ndarray, y: np.ndarray, codes: np.ndarray, clusters: int,
               count: int, seed: int) -> np.ndarray:
    """Coefficients (used, 4) of OLS refits on `count` resamples of whole clusters with
    replacement; resamples whose design is rank deficient or collinear are skipped. The
    predictors keep the full sample's z-scoring, so draws compare with the coefficients."""
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(codes == g) for g in range(clusters)]
    p = design.shape[1]
    draws = []
    for _ in range(count):
        rows = np.concatenate([members[g] for g in rng.integers(0, clusters, clusters)])
        beta, _, rank, sv = np.linalg.lstsq(design[rows], y[rows], rcond=None)
        if rank == p and sv[0] <= MAX_COND * sv[-1]:
            draws.append(beta)
    return np.array(draws, dtype=np.float64).reshape(-1, p)


def fit_transferability_model(rows: Sequence, *, zscore: bool = True,
                              groups: Sequence[Hashable] | None = None, bootstrap: int = 1000,
                              seed: int = 0) -> TransferabilityModel:
    """Ordinary least squares of log T on G, D, log N and an intercept.

    Args:
        rows: mappings with keys T, G, D, N, or objects with those attributes (a 'label',
            'name' or 'run' labels the plot; anything else is ignored).
        zscore: z-score the predictors (population std).
        groups: one cluster label per row (e.g. the task): rows of a cluster share their
            errors. None: every row is its own cluster.
        bootstrap: cluster resamples for the 95% percentile intervals (0: none).
        seed: of the resampling.
    Returns:
        TransferabilityModel. stderr: classical, sigma^2 (X^T X)^-1 with n - 4 degrees of
        freedom; cluster_stderr: CR1 with min(clusters - 1, n - 4); ci: cluster bootstrap.
    Raises:
        TransferFastError: fewer than MIN_ROWS rows, a bad value, a constant or collinear
            predictor, groups of the wrong length or with one cluster.
    """
    rows = list(rows)
    if len(rows) < MIN_ROWS:
        raise TransferFastError(f"{len(rows)} rows: need at least {MIN_ROWS}, more than the 4 "
                                "parameters (G, D, log N, intercept), to estimate standard errors")
    if bootstrap < 0:
        raise TransferFastError(f"bootstrap={bootstrap}: expected >= 0 resamples")
    x, y = _predictors(rows, need_t=True)
    codes, clusters = _cluster_codes(groups, len(rows))
    spread = x.std(axis=0)
    if zscore and np.any(spread == 0):
        flat = PREDICTORS[int(np.argmin(spread))]
        raise TransferFastError(f"predictor {flat} has zero variance (the same value in every "
                                "row): its z-score is undefined")
    mean, std = (x.mean(axis=0), spread) if zscore else (np.zeros(3), np.ones(3))
    design = np.column_stack([np.ones(len(x)), (x - mean) / std])
    q, upper = np.linalg.qr(design)
    if np.linalg.cond(upper) > MAX_COND:
        raise TransferFastError("the predictors G, D, log N (with the intercept) are collinear "
                                "or constant: the coefficients are not identifiable")
    beta = np.linalg.solve(upper, q.T @ y)
    fitted = design @ beta
    resid = y - fitted
    n, p = design.shape
    r_inv = np.linalg.inv(upper)
    xtx_inv = r_inv @ r_inv.T  # X^T X = R^T R
    cov = resid @ resid / (n - p) * xtx_inv  # sigma^2 (X^T X)^-1
    robust = _cr1(design, resid, xtx_inv, codes, clusters)
    # Leave-one-out residuals e_i / (1 - h_ii), h_ii = |Q_i|^2. Exact even though the refit
    # would z-score without row i: an affine change of the predictors, absorbed by the
    # intercept, leaves every prediction unchanged.
    leverage = (q**2).sum(axis=1)
    notes = []
    with np.errstate(divide="ignore", invalid="ignore"):
        loo = np.where(leverage < 1 - 1e-10, y - resid / (1 - leverage), np.nan)
    if np.isnan(loo).any():
        undefined = np.flatnonzero(np.isnan(loo)).tolist()
        notes.append(f"rows {undefined} have leverage 1 (the fit without one of them has a "
                     "constant or collinear predictor): leave-one-out prediction is NaN")
        warnings.warn(notes[-1], stacklevel=2)
    draws = _bootstrap(design, y, codes, clusters, bootstrap, seed)
    if bootstrap and len(draws) < MIN_BOOTSTRAP:
        notes.append(f"only {len(draws)} of {bootstrap} bootstrap resamples could be fitted "
                     f"(at least {MIN_BOOTSTRAP} needed): no confidence intervals")
    ci = {term: (_percentiles(draws[:, j]) if len(draws) >= MIN_BOOTSTRAP
                 else (math.nan, math.nan)) for j, term in enumerate(TERMS)}
    total = ((y - y.mean()) ** 2).sum()
    return TransferabilityModel(
        coefficients=dict(zip(PREDICTORS, beta[1:].tolist())), intercept=float(beta[0]),
        stderr=dict(zip(TERMS, np.sqrt(np.diag(cov)).tolist())),
        r2=float(1 - resid @ resid / total),
        loo_r2=_loo_r2(y, loo),
        predictions=np.exp(fitted).tolist(), loo_predictions=np.exp(loo).tolist(),
        measured=[_value(row, i, "T") for i, row in enumerate(rows)],
        labels=[_label(row) for row in rows],
        zscore=zscore, means=dict(zip(PREDICTORS, mean.tolist())),
        stds=dict(zip(PREDICTORS, std.tolist())), warnings=notes,
        df_resid=n - p, clusters=clusters,
        cluster_stderr=dict(zip(TERMS, np.sqrt(np.diag(robust)).tolist())),
        cluster_df=min(clusters - 1, n - p), ci=ci, bootstrap=bootstrap,
        bootstrap_used=len(draws), draws=draws)
