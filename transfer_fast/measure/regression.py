"""The paper's explanatory model across data sets: log T = b_G G + b_D D + b_N log N + c.

Least squares in float64 with the natural log and, by default, z-scored predictors (the paper's
intercepts match those: with z-scoring, c is the mean of log T).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import TransferFastError

PREDICTORS = ("G", "D", "logN")
MIN_ROWS = 5  # more rows than the 4 parameters, else no degrees of freedom for the errors


@dataclass
class TransferabilityModel:
    """A fitted model. predictions / loo_predictions / measured: T (not log T), one per row;
    loo_predictions from fits without that row. r2, loo_r2: of log T. means / stds: the
    z-score of each predictor (0 and 1 without z-scoring); stds are population (ddof=0)."""

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

    def predict(self, rows: Sequence[Mapping]) -> list[float]:
        """Predicted T for rows with keys G, D, N (T not needed)."""
        x = _predictors(rows, need_t=False)[0]
        return np.exp(self._design(x) @ self._beta()).tolist()

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
                "stds": dict(self.stds), "warnings": list(self.warnings)}

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Predicted (in-sample and leave-one-out) vs measured T, log-log, identity line."""
        # The one allowed upward import (only inside `plot`): figures live in report/.
        from ..report.figures import model_fit_figure, save_figure
        return save_figure(model_fit_figure(self, title=title), path)


def _loo_r2(y: np.ndarray, loo: np.ndarray) -> float:
    """R² of the leave-one-out predictions over the rows that have one (NaN if < 2)."""
    ok = np.isfinite(loo)
    if ok.sum() < 2:
        return math.nan
    total = ((y[ok] - y[ok].mean()) ** 2).sum()
    return float(1 - ((y[ok] - loo[ok]) ** 2).sum() / total)


def _value(row: Mapping, i: int, key: str) -> float:
    if not isinstance(row, Mapping):
        raise TransferFastError(f"row {i}: expected a mapping with keys T, G, D, N, "
                                f"got {type(row).__name__}")
    if key not in row:
        raise TransferFastError(f"row {i}: missing key {key!r} (need T, G, D, N)")
    try:
        value = float(row[key])
    except (TypeError, ValueError):
        raise TransferFastError(f"row {i}: {key} = {row[key]!r} is not a number") from None
    if not math.isfinite(value):
        raise TransferFastError(f"row {i}: {key} = {value} is not finite")
    if key in ("T", "N") and value <= 0:
        raise TransferFastError(f"row {i}: {key} = {value:g} must be > 0 (its log is taken)")
    return value


def _predictors(rows: Sequence[Mapping], need_t: bool) -> tuple[np.ndarray, np.ndarray]:
    """(x (n, 3) with columns G, D, log N; log T (n,), empty unless need_t)."""
    x = np.array([[_value(r, i, "G"), _value(r, i, "D"), math.log(_value(r, i, "N"))]
                  for i, r in enumerate(rows)], dtype=np.float64).reshape(-1, 3)
    y = np.array([math.log(_value(r, i, "T")) for i, r in enumerate(rows)] if need_t else [])
    return x, y


def fit_transferability_model(rows: Sequence[Mapping], *, zscore: bool = True
                              ) -> TransferabilityModel:
    """Ordinary least squares of log T on G, D, log N and an intercept, one row per data set.

    rows: mappings with keys T, G, D, N (a 'label' or 'name' key labels the plot; other keys
    are ignored). stderr: classical, sigma^2 (X^T X)^-1 with n - 4 degrees of freedom.
    """
    rows = list(rows)
    if len(rows) < MIN_ROWS:
        raise TransferFastError(f"{len(rows)} rows: need at least {MIN_ROWS}, more than the 4 "
                                "parameters (G, D, log N, intercept), to estimate standard errors")
    x, y = _predictors(rows, need_t=True)
    spread = x.std(axis=0)
    if zscore and np.any(spread == 0):
        flat = PREDICTORS[int(np.argmin(spread))]
        raise TransferFastError(f"predictor {flat} has zero variance (the same value in every "
                                "row): its z-score is undefined")
    mean, std = (x.mean(axis=0), spread) if zscore else (np.zeros(3), np.ones(3))
    design = np.column_stack([np.ones(len(x)), (x - mean) / std])
    q, upper = np.linalg.qr(design)
    if np.linalg.cond(upper) > 1e12:
        raise TransferFastError("the predictors G, D, log N (with the intercept) are collinear "
                                "or constant: the coefficients are not identifiable")
    beta = np.linalg.solve(upper, q.T @ y)
    fitted = design @ beta
    resid = y - fitted
    n, p = design.shape
    r_inv = np.linalg.inv(upper)
    cov = resid @ resid / (n - p) * (r_inv @ r_inv.T)  # sigma^2 (X^T X)^-1, X^T X = R^T R
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
    total = ((y - y.mean()) ** 2).sum()
    labels = [row.get("label", row.get("name")) for row in rows]
    labels = [None if label is None else str(label) for label in labels]
    return TransferabilityModel(
        coefficients=dict(zip(PREDICTORS, beta[1:].tolist())), intercept=float(beta[0]),
        stderr=dict(zip(("intercept",) + PREDICTORS, np.sqrt(np.diag(cov)).tolist())),
        r2=float(1 - resid @ resid / total),
        loo_r2=_loo_r2(y, loo),
        predictions=np.exp(fitted).tolist(), loo_predictions=np.exp(loo).tolist(),
        measured=[float(row["T"]) for row in rows], labels=labels,
        zscore=zscore, means=dict(zip(PREDICTORS, mean.tolist())),
        stds=dict(zip(PREDICTORS, std.tolist())), warnings=notes)
