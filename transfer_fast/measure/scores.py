"""Transferability estimators as exact functions of streamed float64 sums.

LogME, H-score, regularized H-score and TransRate need only: per-class counts, per-class
feature sums, the Gram matrix F^T F, per-class Grams F_k^T F_k (TransRate), and
sum ||x||^2 x, sum ||x||^4 (Ledoit-Wolf shrinkage). NCE and LEEP need (C_s, C) tables of
source predictions against target labels; LEEP also rereads every sample's source
probabilities once its table is final. Sums are taken about a shift (the first batch's
per-feature mean; in memory, the mean itself) so centred moments keep float64 accuracy
when features have a large offset; moving the shift is exact algebra
(`score_formulas.shift_moments`). The in-memory functions here are one
`ScoreStats.update` (score_stats.py) followed by the same formulas (score_formulas.py);
score_inputs.py checks what they are given.
"""

from __future__ import annotations

import torch

from ..errors import TransferFastError
from .score_formulas import (
    add_tables,
    hscore_from_state,
    leep_from,
    logme_from_state,
    logme_from_sums,
    nce_from_table,
    regularized_hscore_from_state,
    transrate_from_state,
)
from .score_inputs import (
    as_tensor,
    check_finite,
    check_state_bytes,
    features_of,
    labels_of,
    probs_of,
)
from .score_stats import ScoreStats

__all__ = ["ScoreStats", "hscore", "leep", "logme", "nce", "regularized_hscore", "transrate"]


def _one_pass(features, labels, per_class_gram: bool = False) -> dict:
    stats = ScoreStats(per_class_gram=per_class_gram, keep_source_probs=False)
    stats.update(features, labels)
    return stats._live()


def _need_two(n: int) -> None:
    if n < 2:
        raise TransferFastError(f"scores need at least 2 samples, got {n}")


def logme(features, labels, *, regression: bool = False) -> float:
    """LogME (You et al. 2021): mean over targets of the maximum evidence of Bayesian linear
    regression from the features, divided by N.

    Targets: one per class present (one-hot), or with regression=True each column of float
    labels. The fixed point on alpha, beta runs to convergence (LOGME_TOL, at most
    LOGME_MAX_ITER steps) with thuml's LOGME_EPS; the log-determinant runs over all D
    eigenvalues of F^T F (zeros when N < D, which thuml's _fit_fixed_point leaves out).
    Unlike thuml's code, classes absent from labels are no targets.

    Args:
        features: (N, D) real, finite.
        labels: integer (N,) in [0, MAX_CLASSES); with regression, float (N,) or (N, K).
        regression: targets are the columns of labels.

    Returns:
        The score (float; larger means more transferable).

    Raises:
        TransferFastError: shapes, dtypes or values that do not fit, N < 2, all-zero features.
    """
    if not regression:
        return logme_from_state(_one_pass(features, labels))
    x = features_of(features, None)
    n = x.shape[0]
    y = as_tensor(labels, "labels")
    y = y.unsqueeze(1) if y.dim() == 1 else y
    if y.dim() != 2 or y.shape[0] != n or y.shape[1] == 0 or y.is_complex() \
            or y.dtype == torch.bool:
        raise TransferFastError(f"regression labels of shape {tuple(y.shape)}, {y.dtype}: "
                                f"expected real ({n},) or ({n}, K)")
    y = y.to(device=x.device, dtype=torch.float64)
    check_finite(y, "labels")
    _need_two(n)
    return logme_from_sums(x.T @ x, x.T @ y, (y * y).sum(0), n)


def hscore(features, labels) -> float:
    """H-score (Bao et al. 2019): tr(pinv(cov F) cov G), G_i the mean feature of i's class.

    Covariances with N - 1; pinv drops directions below PINV_RTOL of the largest.

    Args:
        features: (N, D) real, finite.
        labels: integer (N,) in [0, MAX_CLASSES).

    Returns:
        The score (float).

    Raises:
        TransferFastError: shapes, dtypes or values that do not fit, N < 2.
    """
    return hscore_from_state(_one_pass(features, labels))


def regularized_hscore(features, labels) -> float:
    """Shrinkage H-score (Ibrahim et al. 2023): tr(pinv(cov_LW) (1 - a) cov G), cov_LW the
    Ledoit-Wolf estimate (1 - a) S + a tr(S)/D I of the centred features (S over N).

    Args:
        features: (N, D) real, finite.
        labels: integer (N,) in [0, MAX_CLASSES).

    Returns:
        The score (float).

    Raises:
        TransferFastError: shapes, dtypes or values that do not fit, N < 2.
    """
    return regularized_hscore_from_state(_one_pass(features, labels))


def transrate(features, labels, eps: float = 1e-4) -> float:
    """TransRate (Huang et al. 2022): R(Z) - (1/K) sum_k R(Z_k), R(Z) = 1/2 logdet(I + Z^T Z /
    (n eps)), Z the features minus their overall scalar mean (as thuml's TLlib), Z_k its rows
    of class k, K the number of classes present. Needs C*D^2*8 bytes of class Grams.

    Args:
        features: (N, D) real, finite.
        labels: integer (N,) in [0, MAX_CLASSES).
        eps: distortion, > 0.

    Returns:
        The score (float).

    Raises:
        TransferFastError: shapes, dtypes or values that do not fit, N < 2, eps <= 0, class
            Grams beyond MAX_STATE_BYTES.
    """
    if not eps > 0:
        raise TransferFastError(f"eps={eps}: expected > 0")
    return transrate_from_state(_one_pass(features, labels, per_class_gram=True), eps)


def nce(source_labels, labels) -> float:
    """NCE (Tran et al. 2019): -H(Y | Z), natural log, of target labels Y given the source
    model's hard predictions Z.

    Args:
        source_labels: integer (N,) in [0, MAX_CLASSES).
        labels: integer (N,) in [0, MAX_CLASSES).

    Returns:
        The score (float, <= 0).

    Raises:
        TransferFastError: shapes, dtypes or values that do not fit, N < 2.
    """
    z = labels_of(source_labels, None, None, None, "source_labels")
    y = labels_of(labels, z.shape[0], None, z.device)
    _need_two(z.shape[0])
    cs, c = int(z.max()) + 1, int(y.max()) + 1
    check_state_bytes(c, 0, cs, False)
    table = torch.zeros(cs, c, dtype=torch.float64, device=z.device)
    add_tables(table, None, z, None, y)
    return nce_from_table(table)


def leep(source_probs, labels) -> float:
    """LEEP (Nguyen et al. 2020): mean of log sum_z P(y_i | z) theta_z(x_i), P(y | z) from the
    empirical joint (1/N) sum_i theta(x_i) onehot(y_i)^T.

    Args:
        source_probs: (N, C_s) source-model probabilities theta(x_i), rows summing to 1.
        labels: integer (N,) in [0, MAX_CLASSES).

    Returns:
        The score (float, <= 0).

    Raises:
        TransferFastError: shapes, dtypes or values that do not fit, N < 2.
    """
    y = labels_of(labels, None, None, None)
    p = probs_of(source_probs, y.shape[0], None, None)
    y = y.to(p.device)
    _need_two(y.shape[0])
    c = int(y.max()) + 1
    check_state_bytes(c, 0, p.shape[1], False)
    soft = torch.zeros(p.shape[1], c, dtype=torch.float64, device=p.device)
    add_tables(None, soft, None, p, y)
    return leep_from(soft, [p], [y])
