"""Transferability estimators as exact functions of streamed float64 sums.

LogME, H-score, regularized H-score and TransRate need only: per-class counts, per-class
feature sums, the Gram matrix F^T F, per-class Grams F_k^T F_k (TransRate), and
sum ||x||^2 x, sum ||x||^4 (Ledoit-Wolf shrinkage). NCE and LEEP need (C_s, C) tables of
source predictions against target labels; LEEP also rereads every sample's source
probabilities once its table is final. Sums are taken about a shift (the first batch's
per-feature mean; in memory, the mean itself) so centred moments keep float64 accuracy
when features have a large offset; moving the shift is exact algebra (`_shift_moments`).
The in-memory functions are one `ScoreStats.update` followed by the same formulas.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from transfer_fast.errors import TransferFastError

MAX_CLASSES = 100_000  # label values (target and source) must lie in [0, MAX_CLASSES)
MAX_STATE_BYTES = 4 * 2**30  # refused before allocation: class Grams, tables, class sums
LOGME_EPS = 1e-5  # added to ||m||^2 and the residual in the fixed point, as thuml's LogME
LOGME_TOL, LOGME_MAX_ITER = 1e-12, 10_000  # |t' - t| <= tol * t for every target
PINV_RTOL = 1e-10  # covariance directions below rtol * largest eigenvalue count as null
PROB_SUM_TOL = 1e-3  # rows of source_probs must sum to 1 within this
_CLASS_DIM = {"count": 0, "class_sum": 0, "class_gram": 0, "hard": 1, "soft": 1}
_CHUNK = 1 << 16


def _tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        a = np.asarray(x)
        return torch.from_numpy(a if a.flags.writeable else a.copy())
    except (TypeError, ValueError, RuntimeError) as e:
        raise TransferFastError(f"{what}: not an array of numbers ({e})") from None


def _finite(t: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(t)
    if bad.any():
        row = int(bad.reshape(t.shape[0], -1).any(1).nonzero()[0])
        raise TransferFastError(f"{what} of shape {tuple(t.shape)} hold {int(bad.sum())} "
                                f"non-finite values (NaN or inf), the first in row {row}")


def _features(x, device, what: str = "features") -> torch.Tensor:
    """float64 (N, D) on `device` (None: where it is); finite."""
    t = _tensor(x, what)
    if t.dim() != 2 or t.shape[1] == 0:
        raise TransferFastError(f"{what} of shape {tuple(t.shape)}: expected 2-D (N, D), D >= 1")
    if t.is_complex() or t.dtype == torch.bool:
        raise TransferFastError(f"{what} must be real numbers, got {t.dtype}")
    t = t.to(device=device, dtype=torch.float64)
    _finite(t, what)
    return t


def _labels(y, n: int | None, limit: int, device, what: str = "labels") -> torch.Tensor:
    """int64 (N,) with values in [0, limit); n=None takes any length."""
    t = _tensor(y, what)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TransferFastError(f"{what} must be integers, got {t.dtype}")
    if t.dim() != 1 or (n is not None and t.shape[0] != n):
        raise TransferFastError(f"{what} of shape {tuple(t.shape)}: expected "
                                f"({n if n is not None else 'N'},)")
    t = t.to(device=device, dtype=torch.int64)
    if t.numel():
        low, high = (int(v) for v in torch.aminmax(t))
        if low < 0 or high >= limit:
            cap = f" (at most MAX_CLASSES={MAX_CLASSES} classes)" if limit == MAX_CLASSES else ""
            raise TransferFastError(f"{what}: value {low if low < 0 else high} is outside "
                                    f"[0, {limit}){cap}")
    return t


def _probs(p, n: int, num_source: int | None, device) -> torch.Tensor:
    """(N, C_s) probabilities, float64 if given so, else float32; rows sum to 1."""
    t = _tensor(p, "source_probs")
    want = f"({n}, {num_source or 'C_s'})"
    if (t.dim() != 2 or t.shape[0] != n or not 1 <= t.shape[1] <= MAX_CLASSES
            or (num_source and t.shape[1] != num_source)):
        raise TransferFastError(f"source_probs of shape {tuple(t.shape)}: expected {want}, "
                                f"C_s <= {MAX_CLASSES}")
    if not t.is_floating_point():
        raise TransferFastError(f"source_probs must be floating point, got {t.dtype}")
    t = t.to(device=device, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    _finite(t, "source_probs")
    if n and bool((t < 0).any()):
        raise TransferFastError(f"source_probs: negative value {float(t.min()):.4g}")
    err = (t.double().sum(1) - 1).abs()
    if n and float(err.max()) > PROB_SUM_TOL:
        row = int(err.argmax())
        raise TransferFastError(f"source_probs row {row} sums to {float(t[row].sum()):.6g}, "
                                "not 1: pass probabilities (softmax), not logits")
    return t


def _check_bytes(num_classes: int, dim: int, num_source: int, class_gram: bool) -> None:
    per_class = 1 + dim + (dim * dim if class_gram else 0) + 2 * num_source
    need = 8 * (num_classes * per_class + dim * dim)
    if need > MAX_STATE_BYTES:
        hint = (" (per_class_gram=False drops TransRate's C*D^2*8 bytes of class Grams)"
                if class_gram else "")
        raise TransferFastError(f"score statistics for {num_classes} classes x {dim} features, "
                                f"{num_source} source classes need {need / 2**30:.1f} GiB, over "
                                f"MAX_STATE_BYTES={MAX_STATE_BYTES / 2**30:.0f} GiB{hint}")


# ---------------------------------------------------------------- formulas from sums

def _shift_moments(s: dict, delta: torch.Tensor) -> dict:
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


def _shift_class_grams_(cg: torch.Tensor, cs: torch.Tensor, count: torch.Tensor,
                        delta: torch.Tensor) -> torch.Tensor:
    """In place: G_k - d S_k^T - S_k d^T + n_k d d^T (S_k: class sums about the old shift)."""
    k, d = cs.shape
    col, row = delta.view(1, d, 1).expand(k, d, 1), delta.view(1, 1, d).expand(k, 1, d)
    cg.baddbmm_(col, cs.unsqueeze(1), alpha=-1)
    return cg.baddbmm_((cs - count[:, None] * delta).unsqueeze(2), row, alpha=-1)


def _logme_from_sums(gram: torch.Tensor, fty: torch.Tensor, yty: torch.Tensor, n) -> float:
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


def _logme_from_state(s: dict) -> float:
    z = _shift_moments(s, -s["shift"])  # uncentred F^T F and F^T y_k
    present = s["count"] > 0
    return _logme_from_sums(z["gram"], z["class_sum"][present].T, s["count"][present],
                            s["count"].sum())


def _centred(s: dict):
    """N, cov F and cov G (N - 1; G_i the mean of i's class), centred Gram, sum ||x - mu||^4."""
    count = s["count"]
    n = count.sum()
    c = _shift_moments(s, s["class_sum"].sum(0) / n)
    present = count > 0
    cs = c["class_sum"][present]
    return n, c["gram"] / (n - 1), (cs.T / count[present]) @ cs / (n - 1), c["gram"], c["q4"]


def _trace_pinv(a: torch.Tensor, b: torch.Tensor) -> float:
    """tr(pinv(a) b) for symmetric a, b."""
    return float((torch.linalg.pinv(a, rtol=PINV_RTOL, hermitian=True) * b).sum())


def _ledoit_wolf(gram: torch.Tensor, q4: torch.Tensor, n) -> tuple[torch.Tensor, float]:
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


def _hscore_from_state(s: dict) -> float:
    _, cov_f, cov_g, _, _ = _centred(s)
    return _trace_pinv(cov_f, cov_g)


def _regularized_hscore_from_state(s: dict) -> float:
    n, _, cov_g, gram, q4 = _centred(s)
    shrunk, a = _ledoit_wolf(gram, q4, n)
    return _trace_pinv(shrunk, (1 - a) * cov_g)


def _coding_rate(gram: torch.Tensor, n: torch.Tensor, eps: float) -> torch.Tensor:
    """1/2 logdet(I + Z^T Z / (n eps)) for Grams (..., D, D), row counts n (...)."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    chol = torch.linalg.cholesky(eye + gram / (n * eps)[..., None, None])
    return chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def _transrate_from_state(s: dict, eps: float) -> float:
    """R(Z) - mean over present classes of R(Z_k), Z = F minus its overall scalar mean."""
    count = s["count"]
    n, present = count.sum(), (count > 0).nonzero().squeeze(1)
    # Sums are kept about `shift`: move them to the one overall mean of every entry.
    scalar_mean = (s["shift"] + s["class_sum"].sum(0) / n).mean()
    delta = scalar_mean - s["shift"]
    total = _coding_rate(_shift_moments(s, delta)["gram"], n, eps)
    d = delta.shape[0]
    rates = []
    for idx in present.split(max(1, (64 * 2**20) // (8 * d * d))):  # 64 MiB of Grams at once
        cg = _shift_class_grams_(s["class_gram"][idx], s["class_sum"][idx], count[idx], delta)
        rates.append(_coding_rate(cg, count[idx], eps))
    return float(total - torch.cat(rates).mean())


def _add_tables(hard, soft, pred, probs, labels: torch.Tensor) -> None:
    """In place (either may be None): hard[pred_i, y_i] += 1; soft[:, y_i] += probs_i."""
    if hard is not None:
        hard.index_put_((pred, labels), torch.ones_like(labels, dtype=hard.dtype),
                        accumulate=True)
    if soft is not None:
        soft.index_add_(1, labels, probs.T.to(soft.dtype))


def _nce_from_table(table: torch.Tensor) -> float:
    """-H(Y | Z) (natural log) from counts (C_s, C) of source prediction z x target label y."""
    joint = table / table.sum()
    pz = joint.sum(1, keepdim=True)
    ratio = torch.where(joint > 0, joint / pz.clamp_min(torch.finfo(joint.dtype).tiny), 1)
    return float((joint * ratio.log()).sum())


def _leep_from(soft: torch.Tensor, probs: list, labels: list) -> float:
    """Mean of log sum_z P(y_i | z) theta_z(x_i); P(y | z) = soft joint / its marginal over y."""
    mz = soft.sum(1, keepdim=True)
    cond = torch.where(mz > 0, soft / mz.clamp_min(torch.finfo(soft.dtype).tiny), 0)
    total, count = soft.new_zeros(()), 0
    for p, y in zip(probs, labels):
        for rows in torch.arange(len(y), device=y.device).split(_CHUNK):
            total += (p[rows].double() * cond[:, y[rows]].T).sum(1).log().sum()
        count += len(y)
    return float(total) / count


# ---------------------------------------------------------------- streaming accumulator

class ScoreStats:
    """Streamed float64 sums from which `compute()` gives every score of this module exactly.

    Memory (float64, on the device of the first batch or `device`): C*(D+1) + D^2 + 2D; with
    per_class_gram (TransRate) C*D^2*8 bytes more; with source_probs two (C_s, C) tables; with
    keep_source_probs (LEEP) every sample's source probabilities, N*C_s*4 bytes (float32; 8 if
    given as float64) and its label (N*8 bytes). LEEP needs them because P(y | z) is known only
    after the last batch. Statistics beyond MAX_STATE_BYTES (without kept probabilities) are
    refused. Classes grow with the labels seen unless `num_classes` fixes them.

    Args:
        num_features: D, checked against every batch (None: the first batch's).
        num_classes: C, labels must lie in [0, C) (None: grows to max label + 1).
        device: where the sums live (None: the first batch's device).
        keep_source_probs: keep per-sample source probabilities, so that compute() has LEEP.
        per_class_gram: keep per-class Grams (C, D, D), so that compute() has TransRate.
        transrate_eps: TransRate's distortion eps.
    """

    def __init__(self, num_features: int | None = None, num_classes: int | None = None, *,
                 device=None, keep_source_probs: bool = True, per_class_gram: bool = True,
                 transrate_eps: float = 1e-4):
        if num_features is not None and num_features < 1:
            raise TransferFastError(f"num_features={num_features}: expected >= 1")
        if num_classes is not None and not 1 <= num_classes <= MAX_CLASSES:
            raise TransferFastError(f"num_classes={num_classes}: expected 1..{MAX_CLASSES}")
        if not transrate_eps > 0:
            raise TransferFastError(f"transrate_eps={transrate_eps}: expected > 0")
        self._dim, self._fixed_classes = num_features, num_classes
        self.device = None if device is None else torch.device(device)
        self.keep_source_probs, self.per_class_gram = keep_source_probs, per_class_gram
        self.transrate_eps = transrate_eps
        self.reset()

    def reset(self) -> None:
        """Forget every sample (the constructor's arguments stay)."""
        self._s: dict[str, torch.Tensor] = {}  # empty until the first sample
        self._classes = self._fixed_classes or 0
        self._source: int | None = None  # C_s; 0: batches without source_probs; None: unknown
        self._probs: list[torch.Tensor] = []
        self._prob_labels: list[torch.Tensor] = []

    @property
    def num_features(self) -> int | None:
        return self._s["shift"].shape[0] if self._s else self._dim

    @property
    def num_classes(self) -> int:
        return self._classes

    @property
    def count(self) -> int:
        return int(self._s["count"].sum()) if self._s else 0

    def update(self, features, labels, source_probs=None) -> None:
        """Add a batch. The statistics change only if every check passes.

        Args:
            features: (B, D) real, finite; any device (moved to the statistics' device).
            labels: integer (B,) in [0, num_classes) (or [0, MAX_CLASSES)).
            source_probs: optional (B, C_s) source-model probabilities (rows sum to 1), for
                NCE (argmax) and LEEP; give them for every batch or for none.

        Raises:
            TransferFastError: a shape, dtype or value that does not fit.
        """
        dev = self.device or (self._s["shift"].device if self._s else None)
        x = _features(features, dev)
        b, d = x.shape
        if self.num_features is not None and d != self.num_features:
            raise TransferFastError(f"features of shape {tuple(x.shape)}: expected "
                                    f"(B, {self.num_features}) as before")
        y = _labels(labels, b, self._fixed_classes or MAX_CLASSES, x.device)
        p = None if source_probs is None else _probs(source_probs, b, self._source, x.device)
        if self._source is not None and bool(self._source) != (p is not None):
            raise TransferFastError("source_probs must be given for every batch or for none: "
                                    f"this batch {'has' if p is not None else 'lacks'} them")
        if b == 0:
            return
        cs = 0 if p is None else p.shape[1]
        c = max(self._classes, int(y.max()) + 1)
        _check_bytes(c, d, cs, self.per_class_gram)
        if not self._s:
            self._allocate(x.mean(0), cs)
        self._grow(c)
        self._add(x - self._s["shift"], y, p)

    def _allocate(self, shift: torch.Tensor, num_source: int) -> None:
        d = shift.shape[0]

        def zeros(*shape):
            return torch.zeros(shape, dtype=torch.float64, device=shift.device)

        self._s = {"shift": shift, "count": zeros(0), "class_sum": zeros(0, d),
                   "gram": zeros(d, d), "q3": zeros(d), "q4": zeros()}
        if self.per_class_gram:
            self._s["class_gram"] = zeros(0, d, d)
        if num_source:
            self._s["hard"], self._s["soft"] = zeros(num_source, 0), zeros(num_source, 0)
        self._source = num_source

    def _resize(self, capacity: int) -> None:
        """Class capacity exactly `capacity` (>= num_classes) for every per-class tensor."""
        for key, dim in _CLASS_DIM.items():
            if key in self._s:
                t = self._s[key].narrow(dim, 0, min(capacity, self._s[key].shape[dim]))
                shape = list(t.shape)
                shape[dim] = capacity - shape[dim]
                self._s[key] = torch.cat([t, t.new_zeros(shape)], dim)

    def _grow(self, c: int) -> None:
        cap = self._s["count"].shape[0]
        if c > cap:  # doubling: log2(C) copies when labels arrive in increasing order
            d, cs = self._s["shift"].shape[0], self._source or 0
            per_class = 8 * (1 + d + (d * d if self.per_class_gram else 0) + 2 * cs)
            fits = (MAX_STATE_BYTES - 8 * d * d) // per_class
            self._resize(max(c, min(2 * cap, fits, self._fixed_classes or MAX_CLASSES)))
        self._classes = max(self._classes, c)

    def _add(self, xs: torch.Tensor, y: torch.Tensor, p: torch.Tensor | None) -> None:
        s = self._s
        s["count"] += torch.bincount(y, minlength=s["count"].shape[0]).to(torch.float64)
        s["class_sum"].index_add_(0, y, xs)
        s["gram"].addmm_(xs.T, xs)
        sq = (xs * xs).sum(1)
        s["q3"] += sq @ xs
        s["q4"] += sq @ sq
        if "class_gram" in s:
            for k in torch.unique(y).tolist():
                xk = xs[y == k]
                s["class_gram"][k].addmm_(xk.T, xk)
        if p is not None:
            _add_tables(s["hard"], s["soft"], p.argmax(1), p, y)
            if self.keep_source_probs:  # copies: the caller may reuse its buffers
                self._probs.append(p.clone())
                self._prob_labels.append(y.clone())

    def _live(self) -> dict:
        """The sums, class tensors cut to num_classes; needs N >= 2."""
        if self.count < 2:
            raise TransferFastError(f"scores need at least 2 samples, got {self.count}")
        c = self._classes
        return {k: (t.narrow(_CLASS_DIM[k], 0, c) if k in _CLASS_DIM else t)
                for k, t in self._s.items()}

    def compute(self) -> dict[str, float]:
        """Scores of every sample so far, equal to the in-memory functions up to rounding.

        Returns:
            {"logme", "hscore", "regularized_hscore"} plus "transrate" with per_class_gram,
            "nce" with source_probs, and "leep" with source_probs and keep_source_probs.

        Raises:
            TransferFastError: fewer than 2 samples.
        """
        s = self._live()
        out = {"logme": _logme_from_state(s), "hscore": _hscore_from_state(s),
               "regularized_hscore": _regularized_hscore_from_state(s)}
        if "class_gram" in s:
            out["transrate"] = _transrate_from_state(s, self.transrate_eps)
        if "hard" in s:
            out["nce"] = _nce_from_table(s["hard"])
            if self.keep_source_probs:
                out["leep"] = _leep_from(s["soft"], self._probs, self._prob_labels)
        return out

    def state_dict(self) -> dict:
        """Settings, sizes and tensors (class dimensions cut to num_classes; views, not copies)."""
        c = self._classes
        sums = {k: (t.narrow(_CLASS_DIM[k], 0, c) if k in _CLASS_DIM else t)
                for k, t in self._s.items()}
        return {"num_classes": c, "source_classes": self._source, "sums": sums,
                "keep_source_probs": self.keep_source_probs, "probs": list(self._probs),
                "prob_labels": list(self._prob_labels)}

    def _check_state(self, state: dict, with_ours: bool) -> None:
        """TransferFastError unless `state` can join these settings (and, with_ours, our sums)."""
        sums, cs = state["sums"], state["source_classes"]
        if not sums:
            return
        d, theirs = sums["shift"].shape[0], f"{sums['shift'].shape[0]} features, {cs} source"
        if with_ours and self._s and (d != self.num_features or cs != self._source):
            raise TransferFastError(f"cannot merge statistics of {theirs} classes into "
                                    f"{self.num_features} features, {self._source} source classes")
        limit = self._fixed_classes or MAX_CLASSES
        if self._dim not in (None, d) or state["num_classes"] > limit:
            raise TransferFastError(f"statistics of {theirs} classes and {state['num_classes']} "
                                    f"classes do not fit num_features={self._dim}, "
                                    f"num_classes={self._fixed_classes}")
        if self.per_class_gram and "class_gram" not in sums:
            raise TransferFastError("statistics without class Grams cannot join "
                                    "per_class_gram=True")
        if self.keep_source_probs and cs and not state["keep_source_probs"]:
            raise TransferFastError("statistics without source probabilities cannot join "
                                    "keep_source_probs=True (LEEP would miss their samples)")

    def load_state_dict(self, state: dict) -> None:
        """Replace the statistics by copies of `state` (from state_dict) on this one's device
        (kept source probabilities are shared: they are never changed in place).

        Raises:
            TransferFastError: state that does not fit these settings.
        """
        self._check_state(state, with_ours=False)
        self.reset()
        self._s = {k: t.to(self.device or t.device, copy=True) for k, t in state["sums"].items()
                   if k != "class_gram" or self.per_class_gram}
        self._classes = max(self._classes, state["num_classes"])
        self._source = state["source_classes"]
        if self._s:
            self._resize(self._classes)
        if self.keep_source_probs:
            dev = self._s["shift"].device if self._s else None
            self._probs = [t.to(dev) for t in state["probs"]]
            self._prob_labels = [t.to(dev) for t in state["prob_labels"]]

    def merge(self, other: ScoreStats) -> ScoreStats:
        """A new ScoreStats of both sample sets, with self's settings; neither input changes.

        Raises:
            TransferFastError: other has a different D or C_s, or lacks what self's settings
                need (class Grams, kept source probabilities).
        """
        out = ScoreStats(self._dim, self._fixed_classes, device=self.device,
                         keep_source_probs=self.keep_source_probs,
                         per_class_gram=self.per_class_gram, transrate_eps=self.transrate_eps)
        out.load_state_dict(self.state_dict())
        out._absorb(other.state_dict())
        return out

    def _reshift_(self, delta: torch.Tensor) -> None:
        """In place: the sums about shift + delta."""
        s = self._s
        if "class_gram" in s:
            _shift_class_grams_(s["class_gram"], s["class_sum"], s["count"], delta)
        s.update(_shift_moments(s, delta))

    def all_reduce(self, group=None) -> ScoreStats:
        """In place on every rank: the statistics of all ranks' samples (torch.distributed).

        Ranks agree on num_classes (the largest), move their sums to one common shift and sum
        them with all_reduce (float64, on the statistics' device: CUDA under NCCL); kept source
        probabilities are all-gathered in rank order. Every rank must call it; a no-op when
        torch.distributed is not initialised.

        Raises:
            TransferFastError: ranks with different D, C_s, per_class_gram or keep_source_probs.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        nccl = dist.get_backend(group) == "nccl"
        dev = self._s["shift"].device if self._s else self.device or (
            torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu"))
        world = dist.get_world_size(group)
        meta = torch.tensor([self.num_features or 0, self._classes,
                             -1 if self._source is None else self._source, self.per_class_gram,
                             self.keep_source_probs,
                             max((t.element_size() for t in self._probs), default=0)], device=dev)
        metas = [torch.empty_like(meta) for _ in range(world)]
        dist.all_gather(metas, meta, group=group)
        metas = torch.stack(metas).tolist()
        dims, sources = {m[0] for m in metas if m[0]}, {m[2] for m in metas if m[2] >= 0}
        if len(dims) > 1 or len(sources) > 1 or len({tuple(m[3:5]) for m in metas}) > 1:
            raise TransferFastError("ranks disagree on (features, classes, source classes, "
                                    f"per_class_gram, keep_source_probs): {[m[:5] for m in metas]}")
        if not sources:
            return self
        d, c, cs = dims.pop(), max(m[1] for m in metas), sources.pop()
        _check_bytes(c, d, cs, self.per_class_gram)
        if not self._s:
            self._allocate(torch.zeros(d, dtype=torch.float64, device=dev), cs)
        self._classes = c
        self._resize(c)
        n = self._s["count"].sum()
        weighted = torch.cat([n * self._s["shift"], n.view(1)])
        dist.all_reduce(weighted, group=group)
        self._reshift_(weighted[:-1] / weighted[-1] - self._s["shift"])
        for key in sorted(self._s):
            if key != "shift":
                dist.all_reduce(self._s[key], group=group)
        if self.keep_source_probs and cs:
            dtype = torch.float64 if max(m[5] for m in metas) == 8 else torch.float32
            p = [t.to(dtype) for t in self._probs] or [torch.zeros(0, cs, dtype=dtype, device=dev)]
            y = self._prob_labels or [torch.zeros(0, dtype=torch.int64, device=dev)]
            self._probs = [_gather_rows(torch.cat(p), group, world)]
            self._prob_labels = [_gather_rows(torch.cat(y), group, world)]
        return self

    def _absorb(self, o: dict) -> None:
        """In place: add the sums of state `o` after moving them to our shift."""
        self._check_state(o, with_ours=True)
        if not o["sums"]:
            return
        if not self._s:
            self.load_state_dict(o)
            return
        dev, c = self._s["shift"].device, o["num_classes"]
        _check_bytes(max(c, self._classes), self.num_features, self._source,
                     self.per_class_gram)
        self._grow(c)
        probs, labels = o["probs"], o["prob_labels"]
        o = {k: t.to(dev) for k, t in o["sums"].items()}
        delta = self._s["shift"] - o["shift"]
        moved = _shift_moments(o, delta)
        for key, t in self._s.items():
            if key == "class_gram":
                src = _shift_class_grams_(o[key].clone(), o["class_sum"], o["count"], delta)
            elif key != "shift":
                src = moved.get(key, o[key])
            else:
                continue
            (t.narrow(_CLASS_DIM[key], 0, c) if key in _CLASS_DIM else t).add_(src)
        if self.keep_source_probs:
            self._probs += [t.to(dev) for t in probs]
            self._prob_labels += [t.to(dev) for t in labels]


def _gather_rows(t: torch.Tensor, group, world: int) -> torch.Tensor:
    """Every rank's rows of t (lengths may differ), concatenated in rank order."""
    import torch.distributed as dist

    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(k) for k in sizes]
    padded = torch.cat([t, t.new_zeros((max(sizes) - t.shape[0], *t.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:k] for part, k in zip(parts, sizes)])


# ---------------------------------------------------------------- in-memory scores

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
        return _logme_from_state(_one_pass(features, labels))
    x = _features(features, None)
    n = x.shape[0]
    y = _tensor(labels, "labels")
    y = y.unsqueeze(1) if y.dim() == 1 else y
    if y.dim() != 2 or y.shape[0] != n or y.shape[1] == 0 or y.is_complex() \
            or y.dtype == torch.bool:
        raise TransferFastError(f"regression labels of shape {tuple(y.shape)}, {y.dtype}: "
                                f"expected real ({n},) or ({n}, K)")
    y = y.to(device=x.device, dtype=torch.float64)
    _finite(y, "labels")
    _need_two(n)
    return _logme_from_sums(x.T @ x, x.T @ y, (y * y).sum(0), n)


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
    return _hscore_from_state(_one_pass(features, labels))


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
    return _regularized_hscore_from_state(_one_pass(features, labels))


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
    return _transrate_from_state(_one_pass(features, labels, per_class_gram=True), eps)


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
    z = _labels(source_labels, None, MAX_CLASSES, None, "source_labels")
    y = _labels(labels, z.shape[0], MAX_CLASSES, z.device)
    _need_two(z.shape[0])
    cs, c = int(z.max()) + 1, int(y.max()) + 1
    _check_bytes(c, 0, cs, False)
    table = torch.zeros(cs, c, dtype=torch.float64, device=z.device)
    _add_tables(table, None, z, None, y)
    return _nce_from_table(table)


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
    y = _labels(labels, None, MAX_CLASSES, None)
    p = _probs(source_probs, y.shape[0], None, None)
    y = y.to(p.device)
    _need_two(y.shape[0])
    c = int(y.max()) + 1
    _check_bytes(c, 0, p.shape[1], False)
    soft = torch.zeros(p.shape[1], c, dtype=torch.float64, device=p.device)
    _add_tables(None, soft, None, p, y)
    return _leep_from(soft, [p], [y])
