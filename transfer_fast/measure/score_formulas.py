"""The scores as exact functions of streamed float64 sums (see `scores`): LogME,
H-score, regularized H-score, TransRate from moments; NCE and LEEP from tables.
Sums are kept about a shift; moving it is exact algebra (`shift_moments`)."""

from __future__ import annotations

import math

import torch

from ..errors import TransferFastError

LOGME_EPS = 1e-5  # added to ||m||^2 and the residual in the fixed point, as thuml's LogME
LOGME_TOL, LOGME_MAX_ITER = 1e-12, 10_000  # |t' - t| <= tol * t for every target
PINV_RTOL = 1e-10  # covariance directions below rtol * largest eigenvalue count as null
ROWS_AT_ONCE = 1 << 16  # LEEP rereads kept probabilities this many rows at a time


def shift_moments(s: dict, delta: torch.Tensor) -> dict:
    """Sums of x - shift - delta from sums of x - shift (all but class Grams); exact algebra."""
    count, cs, g, q3 = s["count"], s["class_sum"], s["gram"], s["q3"]
    n, tot = count.sum(), cs.sum(0)
    gd, dd, sd, q2 = g @ delta, delta @ delta, tot @ delta, g.trace()
    ds = torch.outer(delta, tot)
    return {"shift": s["shift"] + delta, "class_sum": cs - count[:, None] * delta,
            "gram": g - ds - ds.T + n * torch.outer(delta, delta),
            "q3": q3 - q2 * delta - 2 * gd + 2 * sd * delta + dd * tot - n * dd * delta,
            "q4": s["q4"] + 4 * (delta @ gd) + n * dd * dd - 4 * (delta @ q3) + 2 * dd * q2
            - 4 * dd * sd}


def shift_class_grams_(cg: torch.Tensor, cs: torch.Tensor, count: torch.Tensor,
                        delta: torch.Tensor) -> torch.Tensor:
    """In place: G_k - d S_k^T - S_k d^T + n_k d d^T (S_k: class sums about the old shift)."""
    k, d = cs.shape
    col, row = delta.view(1, d, 1).expand(k, d, 1), delta.view(1, 1, d).expand(k, 1, d)
    cg.baddbmm_(col, cs.unsqueeze(1), alpha=-1)
    return cg.baddbmm_((cs - count[:, None] * delta).unsqueeze(2), row, alpha=-1)


def logme_from_sums(gram: torch.Tensor, fty: torch.Tensor, yty: torch.Tensor, n) -> float:
    """Mean over targets k of max evidence_k / N, from F^T F (D, D), F^T y_k (D, K), ||y_k||^2."""
    d = gram.shape[0]
    sigma, v = torch.linalg.eigh(gram)  # all D eigenvalues: D - N zeros when N < D
    if float(sigma[-1]) <= 0:
        raise TransferFastError("LogME: the features are all zero")
    sigma = torch.where(sigma > sigma[-1] * d * torch.finfo(sigma.dtype).eps, sigma, 0)[:, None]
    x2 = torch.where(sigma > 0, (v.T @ fty) ** 2 / sigma.clamp_min(1e-300), 0)  # (u_i . y_k)^2
    res_x2 = (yty - x2.sum(0)).clamp_min(0)  # ||y_k||^2 outside the span of F
    n = float(n)
    t = torch.ones_like(yty)
    for _ in range(LOGME_MAX_ITER):
        w = 1 / (t + sigma)
        gamma = (sigma * w).sum(0)
        m2 = (sigma * x2 * w * w).sum(0)  # ||m||^2, m = beta A^-1 F^T y_k
        res2 = res_x2 + (x2 * (t * w) ** 2).sum(0)  # ||y_k - F m||^2
        alpha, beta = gamma / (m2 + LOGME_EPS), (n - gamma) / (res2 + LOGME_EPS)
        t_next = alpha / beta
        if bool(((t_next - t).abs() <= LOGME_TOL * t).all()):
            break
        t = t_next
    evidence = (d / 2 * alpha.log() + n / 2 * beta.log() - 0.5 * (alpha + beta * sigma).log().sum(0)
                - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * math.log(2 * math.pi))
    return float((evidence / n).mean())


def logme_from_state(s: dict) -> float:
    z = shift_moments(s, -s["shift"])  # uncentred F^T F and F^T y_k
    present = s["count"] > 0
    return logme_from_sums(z["gram"], z["class_sum"][present].T, s["count"][present],
                            s["count"].sum())


def centred(s: dict):
    """N, cov F and cov G (N - 1; G_i the mean of i's class), centred Gram, sum ||x - mu||^4."""
    count = s["count"]
    n = count.sum()
    c = shift_moments(s, s["class_sum"].sum(0) / n)
    present = count > 0
    cs = c["class_sum"][present]
    return n, c["gram"] / (n - 1), (cs.T / count[present]) @ cs / (n - 1), c["gram"], c["q4"]


def trace_pinv(a: torch.Tensor, b: torch.Tensor) -> float:
    """tr(pinv(a) b) for symmetric a, b."""
    return float((torch.linalg.pinv(a, rtol=PINV_RTOL, hermitian=True) * b).sum())


def ledoit_wolf(gram: torch.Tensor, q4: torch.Tensor, n) -> tuple[torch.Tensor, float]:
    """sklearn's ledoit_wolf from the centred Gram (D, D) and q4 = sum_i ||x_i - mu||^4."""
    d = gram.shape[0]
    emp = gram / n  # empirical covariance, N in the denominator
    mu = emp.trace() / d
    if d == 1:
        return emp, 0.0
    delta_ = (emp * emp).sum()  # sum of (X^T X)^2 / N^2
    beta = float((q4 / n - delta_) / (d * n))  # q4 = sum of X2^T X2
    delta = float((delta_ - 2 * mu * emp.trace() + d * mu * mu) / d)
    beta = min(beta, delta)
    a = 0.0 if beta == 0 else beta / delta
    return (1 - a) * emp + a * mu * torch.eye(d, dtype=emp.dtype, device=emp.device), a


def hscore_from_state(s: dict) -> float:
    _, cov_f, cov_g, _, _ = centred(s)
    return trace_pinv(cov_f, cov_g)


def regularized_hscore_from_state(s: dict) -> float:
    n, _, cov_g, gram, q4 = centred(s)
    shrunk, a = ledoit_wolf(gram, q4, n)
    return trace_pinv(shrunk, (1 - a) * cov_g)


def coding_rate(gram: torch.Tensor, n: torch.Tensor, eps: float) -> torch.Tensor:
    """1/2 logdet(I + Z^T Z / (n eps)) for Grams (..., D, D), row counts n (...)."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    chol = torch.linalg.cholesky(eye + gram / (n * eps)[..., None, None])
    return chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def transrate_from_state(s: dict, eps: float) -> float:
    """R(Z) - mean over present classes of R(Z_k), Z = F minus its overall scalar mean."""
    count = s["count"]
    n, present = count.sum(), (count > 0).nonzero().squeeze(1)
    # Sums are kept about `shift`: move them to the one overall mean of every entry.
    scalar_mean = (s["shift"] + s["class_sum"].sum(0) / n).mean()
    delta = scalar_mean - s["shift"]
    total = coding_rate(shift_moments(s, delta)["gram"], n, eps)
    d = delta.shape[0]
    rates = []
    for idx in present.split(max(1, (64 * 2**20) // (8 * d * d))):  # 64 MiB of Grams at once
        cg = shift_class_grams_(s["class_gram"][idx], s["class_sum"][idx], count[idx], delta)
        rates.append(coding_rate(cg, count[idx], eps))
    return float(total - torch.cat(rates).mean())


def add_tables(hard, soft, pred, probs, labels: torch.Tensor) -> None:
    """In place (either may be None): hard[pred_i, y_i] += 1; soft[:, y_i] += probs_i."""
    if hard is not None:
        hard.index_put_((pred, labels), torch.ones_like(labels, dtype=hard.dtype),
                        accumulate=True)
    if soft is not None:
        soft.index_add_(1, labels, probs.T.to(soft.dtype))


def nce_from_table(table: torch.Tensor) -> float:
    """-H(Y | Z) (natural log) from counts (C_s, C) of source prediction z x target label y."""
    joint = table / table.sum()
    pz = joint.sum(1, keepdim=True)
    ratio = torch.where(joint > 0, joint / pz.clamp_min(torch.finfo(joint.dtype).tiny), 1)
    return float((joint * ratio.log()).sum())


def leep_from(soft: torch.Tensor, probs: list, labels: list) -> float:
    """Mean of log sum_z P(y_i | z) theta_z(x_i); P(y | z) = soft joint / its marginal over y."""
    mz = soft.sum(1, keepdim=True)
    cond = torch.where(mz > 0, soft / mz.clamp_min(torch.finfo(soft.dtype).tiny), 0)
    total, count = soft.new_zeros(()), 0
    for p, y in zip(probs, labels):
        for rows in torch.arange(len(y), device=y.device).split(ROWS_AT_ONCE):
            total += (p[rows].double() * cond[:, y[rows]].T).sum(1).log().sum()
        count += len(y)
    return float(total) / count
