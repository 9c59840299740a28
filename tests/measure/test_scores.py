"""transfer_fast.measure.scores against direct float64 numpy implementations written here
from the definitions (thuml's LogME fixed point via the SVD of F, np.cov/np.linalg.pinv,
sklearn's ledoit_wolf, slogdet, explicit loops), in memory and streamed."""

import math
import multiprocessing

import numpy as np
import pytest
import torch
from sklearn.covariance import ledoit_wolf
from sklearn.datasets import load_digits

from transfer_fast.errors import TransferFastError
from transfer_fast.measure import score_formulas
from transfer_fast.measure.scores import (
    ScoreStats,
    hscore,
    leep,
    logme,
    nce,
    regularized_hscore,
    transrate,
)

RTOL = 1e-9
PINV_RCOND = 1e-10  # the module's PINV_RTOL, restated


# ------------------------------------------------------------------ references

def ref_logme_parts(f, targets, pad=True, eps=1e-5, tol=1e-12):
    """thuml's fixed point (LogME._fit_fixed_point) from the thin SVD of F, run to
    convergence. pad: the log-determinant over all D eigenvalues of F^T F (sigma padded
    with zeros when N < D); without, over min(N, D) as that code does. (evidences / N, alphas)"""
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2
    sigma_d = np.concatenate([sigma, np.zeros(d - sigma.size)]) if pad else sigma
    evidences, alphas = [], []
    for y in targets.T:
        x2 = (u.T @ y) ** 2
        res_x2 = y @ y - x2.sum()
        alpha = beta = 1.0
        for _ in range(100_000):
            t = alpha / beta
            gamma = (sigma / (sigma + t)).sum()
            m2 = (sigma * x2 / (t + sigma) ** 2).sum()
            res2 = (x2 / (1 + sigma / t) ** 2).sum() + res_x2
            alpha, beta = gamma / (m2 + eps), (n - gamma) / (res2 + eps)
            if abs(alpha / beta - t) <= tol * t:
                break
        evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta)
                    - 0.5 * np.log(alpha + beta * sigma_d).sum() - beta / 2 * res2
                    - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi))
        evidences.append(evidence / n)
        alphas.append(alpha)
    return np.array(evidences), np.array(alphas)


def ref_logme(f, targets):
    return float(ref_logme_parts(f, targets)[0].mean())


def one_hot_present(y):
    return np.stack([(y == k).astype(np.float64) for k in np.unique(y)], 1)


def class_means(f, y):
    g = np.zeros_like(f)
    for k in np.unique(y):
        g[y == k] = f[y == k].mean(0)
    return g


def cov(a):
    return np.atleast_2d(np.cov(a, rowvar=False))


def ref_hscore(f, y):
    pinv = np.linalg.pinv(cov(f), rcond=PINV_RCOND, hermitian=True)
    return float(np.trace(pinv @ cov(class_means(f, y))))


def ref_regularized_hscore(f, y):
    f = f - f.mean(0)
    shrunk, a = ledoit_wolf(f)
    pinv = np.linalg.pinv(shrunk, rcond=PINV_RCOND, hermitian=True)
    return float(np.trace(pinv @ ((1 - a) * cov(class_means(f, y)))))


def coding_rate(z, eps):
    n, d = z.shape
    return 0.5 * np.linalg.slogdet(np.eye(d) + z.T @ z / (n * eps))[1]


def ref_transrate(f, y, eps=1e-4):
    z = f - f.mean()  # the definition (TLlib): the overall scalar mean
    classes = np.unique(y)
    return coding_rate(z, eps) - sum(coding_rate(z[y == k], eps) for k in classes) / len(classes)


def ref_nce(z, y):
    n = len(y)
    joint = {}
    for a, b in zip(z, y):
        joint[a, b] = joint.get((a, b), 0.0) + 1 / n
    pz = {}
    for (a, _), p in joint.items():
        pz[a] = pz.get(a, 0.0) + p
    return sum(p * math.log(p / pz[a]) for (a, _), p in joint.items())


def ref_leep(theta, y):
    n, cs = theta.shape
    c = y.max() + 1
    joint = np.zeros((cs, c))
    for i in range(n):
        joint[:, y[i]] += theta[i] / n
    marginal = joint.sum(1)
    total = 0.0
    for i in range(n):
        total += math.log(sum(joint[z, y[i]] / marginal[z] * theta[i, z]
                              for z in range(cs) if marginal[z] > 0))
    return total / n


def ref_all(f, y, probs=None):
    out = {"logme": ref_logme(f, one_hot_present(y)), "hscore": ref_hscore(f, y),
           "regularized_hscore": ref_regularized_hscore(f, y), "transrate": ref_transrate(f, y)}
    if probs is not None:
        out |= {"nce": ref_nce(probs.argmax(1), y), "leep": ref_leep(probs, y)}
    return out


# ------------------------------------------------------------------ data

def clustered(n, d, class_probs, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    y = rng.choice(len(class_probs), n, p=class_probs)
    centres = spread * rng.normal(size=(len(class_probs), d))
    return rng.normal(size=(n, d)) + centres[y] + 0.5, y


def softmax_probs(f, cs, seed=1):
    w = np.random.default_rng(seed).normal(size=(f.shape[1], cs)) / math.sqrt(f.shape[1])
    logits = f @ w
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


CASES = {  # name: (N, D, class probabilities)
    "tall_unbalanced": (240, 12, [0.55, 0.25, 0.12, 0.06, 0.02]),
    "wide": (36, 50, [0.4, 0.35, 0.25]),
    "absent_class": (120, 8, [0.5, 0.3, 0.0, 0.2]),
    "one_feature": (60, 1, [0.6, 0.4]),
}


def digits(n=500, project=None, seed=0):
    x, y = load_digits(return_X_y=True)
    x, y = x[:n] / 16.0, y[:n]
    if project:
        x = x @ np.random.default_rng(seed).normal(size=(64, project)) / 8.0
    return x, y


def close(a, b, rtol=RTOL):
    assert a == pytest.approx(b, rel=rtol, abs=rtol), (a, b)


# ------------------------------------------------------------------ in memory

@pytest.mark.parametrize("case", list(CASES))
def test_in_memory_scores_match_references(case):
    f, y = clustered(*CASES[case])
    ref = ref_all(f, y)
    close(logme(f, y), ref["logme"])
    close(hscore(f, y), ref["hscore"])
    close(regularized_hscore(f, y), ref["regularized_hscore"])
    close(transrate(f, y), ref["transrate"])


@pytest.mark.parametrize("project", [None, 24])
def test_digits_scores_match_references(project):
    f, y = digits(project=project)  # 64 pixels: some always 0, so cov F is singular
    ref = ref_all(f, y)
    got = {"logme": logme(f, y), "hscore": hscore(f, y),
           "regularized_hscore": regularized_hscore(f, y), "transrate": transrate(f, y)}
    for key in ref:
        close(got[key], ref[key])


def test_torch_inputs_and_low_precision_dtypes():
    f, y = clustered(*CASES["tall_unbalanced"])
    f32 = f.astype(np.float32)
    f64 = f32.astype(np.float64)
    close(hscore(torch.from_numpy(f32), torch.from_numpy(y).int()), ref_hscore(f64, y))
    close(logme(f32, y.astype(np.uint8)), ref_logme(f64, one_hot_present(y)))


def test_logme_wide_counts_all_d_eigenvalues():
    """N < D: the module's D x D route (eigenvalues of F^T F, D - N of them zero) equals the
    reference's N x N route (SVD of F) with sigma padded to D; thuml's _fit_fixed_point sums
    over min(N, D) only, which leaves out (D - N) / 2 log(alpha_k) per target."""
    f, y = clustered(20, 45, [0.5, 0.3, 0.2], seed=3)
    n, d = f.shape
    padded, alphas = ref_logme_parts(f, one_hot_present(y))
    unpadded, _ = ref_logme_parts(f, one_hot_present(y), pad=False)
    close(logme(f, y), padded.mean())
    np.testing.assert_allclose(unpadded - padded, (d - n) / 2 * np.log(alphas) / n, rtol=1e-9)


@pytest.mark.parametrize("columns", [1, 3])
def test_logme_regression_matches_reference(columns):
    rng = np.random.default_rng(5)
    f = rng.normal(size=(150, 10))
    t = f @ rng.normal(size=(10, columns)) + rng.normal(size=(150, columns))
    target = t[:, 0] if columns == 1 else t
    close(logme(f, target, regression=True), ref_logme(f, t))


def test_ledoit_wolf_formula_matches_sklearn():
    for f in (clustered(200, 7, [0.5, 0.5])[0], clustered(30, 40, [1.0])[0], digits(300)[0]):
        x = torch.from_numpy(f - f.mean(0))
        q4 = ((x * x).sum(1) ** 2).sum()
        shrunk, a = score_formulas.ledoit_wolf(x.T @ x, q4, x.shape[0])
        want, want_a = ledoit_wolf(f)
        close(a, want_a)
        np.testing.assert_allclose(shrunk.numpy(), want, rtol=1e-10, atol=1e-14)


def test_nce_and_leep_match_loops():
    rng = np.random.default_rng(2)
    n, cs = 300, 6
    y = rng.choice(5, n, p=[0.4, 0.3, 0.0, 0.2, 0.1])  # target class 2 absent
    probs = softmax_probs(rng.normal(size=(n, 8)) + y[:, None], cs)
    probs[:, 4] = 0.0  # source class 4 never has mass
    probs /= probs.sum(1, keepdims=True)
    probs[:10] = np.eye(cs)[rng.integers(0, 4, 10)]  # some one-hot rows
    close(nce(probs.argmax(1), y), ref_nce(probs.argmax(1), y))
    close(leep(probs, y), ref_leep(probs, y))
    z = rng.integers(0, 3, n)
    close(nce(z, y), ref_nce(z, y))
    assert nce(y, y) == 0.0


# ------------------------------------------------------------------ streaming

def stream(f, y, probs=None, sizes=(1, 7, 30, 2, 64), stats=None, **kwargs):
    stats = stats or ScoreStats(**kwargs)
    start, i = 0, 0
    while start < len(y):
        stop = start + sizes[i % len(sizes)]
        stats.update(f[start:stop], y[start:stop],
                     None if probs is None else probs[start:stop])
        start, i = stop, i + 1
    return stats


def assert_scores(got, want, rtol=RTOL):
    assert set(got) == set(want)
    for key in want:
        close(got[key], want[key], rtol)


@pytest.mark.parametrize("case", ["tall_unbalanced", "absent_class"])
def test_streaming_equals_in_memory_and_references(case):
    f, y = clustered(*CASES[case])
    probs = softmax_probs(f, 7)
    want = ref_all(f, y, probs)
    order = np.argsort(y, kind="stable")  # classes arrive in increasing order: capacity grows
    stats = stream(f[order], y[order], probs[order])
    assert stats.num_classes == y.max() + 1 and stats.count == len(y)
    assert_scores(stats.compute(), want)
    in_memory = {"logme": logme(f, y), "hscore": hscore(f, y),
                 "regularized_hscore": regularized_hscore(f, y), "transrate": transrate(f, y),
                 "nce": nce(probs.argmax(1), y), "leep": leep(probs, y)}
    assert_scores(stats.compute(), in_memory, 1e-10)


def test_streaming_digits_with_fixed_classes_and_float32_probs():
    f, y = digits(400, project=20)
    probs = softmax_probs(f, 10).astype(np.float32)
    stats = stream(torch.from_numpy(f), torch.from_numpy(y), torch.from_numpy(probs),
                   sizes=(33, 5, 100), num_features=20, num_classes=13)  # 3 classes never seen
    want = ref_all(f, y) | {"nce": nce(probs.argmax(1), y), "leep": leep(probs, y)}
    assert_scores(stats.compute(), want)


def test_large_offset_keeps_centred_scores():
    """Shift-invariant scores of features offset by 1e4 stay exact when streamed: the sums are
    taken about the first batch's mean, not about 0."""
    f, y = clustered(*CASES["tall_unbalanced"])
    got = stream(f + 1e4, y, per_class_gram=True).compute()
    for key, ref in (("hscore", ref_hscore), ("regularized_hscore", ref_regularized_hscore),
                     ("transrate", ref_transrate)):
        close(got[key], ref(f, y), 1e-8)


def test_merge_of_two_halves_equals_whole():
    f, y = clustered(*CASES["tall_unbalanced"])
    probs = softmax_probs(f, 5)
    lo, hi = y < 2, y >= 2  # different classes seen and different shifts on each side
    a = stream(f[hi], y[hi], probs[hi])
    b = stream(f[lo] * 3.0 - 7.0, y[lo], probs[lo], sizes=(50,))
    before = a.compute()
    merged = a.merge(b)
    assert_scores(a.compute(), before, 0)  # inputs unchanged
    f2 = np.concatenate([f[hi], f[lo] * 3.0 - 7.0])
    y2, p2 = np.concatenate([y[hi], y[lo]]), np.concatenate([probs[hi], probs[lo]])
    assert_scores(merged.compute(), ref_all(f2, y2, p2))
    assert_scores(b.merge(a).compute(), merged.compute(), 1e-10)
    assert_scores(a.merge(ScoreStats()).compute(), before, 0)
    assert_scores(ScoreStats().merge(a).compute(), before, 0)


def test_state_dict_round_trip_and_reset():
    f, y = clustered(*CASES["absent_class"])
    probs = softmax_probs(f, 4)
    stats = stream(f, y, probs)
    copy = ScoreStats()
    copy.load_state_dict(stats.state_dict())
    assert_scores(copy.compute(), stats.compute(), 0)
    stats.reset()
    assert stats.count == 0 and stats.num_features is None
    stats.update(f, y)  # without source_probs after a reset: allowed
    assert set(stats.compute()) == {"logme", "hscore", "regularized_hscore", "transrate"}


def test_kept_probabilities_survive_a_reused_buffer():
    f, y = clustered(*CASES["absent_class"])
    probs = softmax_probs(f, 4)
    stats = ScoreStats()
    buf_f, buf_p, buf_y = np.empty((40, 8)), np.empty((40, 4)), np.empty(40, int)
    for i in range(0, len(y), 40):
        buf_f[:], buf_p[:], buf_y[:] = f[i:i + 40], probs[i:i + 40], y[i:i + 40]
        stats.update(buf_f, buf_y, buf_p)  # numpy buffers are shared by torch.from_numpy
    assert_scores(stats.compute(), ref_all(f, y, probs))


def test_optional_outputs():
    f, y = clustered(*CASES["tall_unbalanced"])
    probs = softmax_probs(f, 3)
    got = stream(f, y, probs, per_class_gram=False, keep_source_probs=False).compute()
    assert set(got) == {"logme", "hscore", "regularized_hscore", "nce"}
    close(got["nce"], ref_nce(probs.argmax(1), y))


def test_all_reduce_without_distributed_is_a_no_op():
    f, y = clustered(*CASES["wide"])
    stats = stream(f, y)
    before = stats.compute()
    assert stats.all_reduce() is stats
    assert_scores(stats.compute(), before, 0)


def _rank(rank, store, data, out):
    """One of two gloo ranks (forked): rank 0 streams classes >= 2 in batches, rank 1 gets
    classes 0 and 1, offset by -5, in one batch (fewer classes, another shift)."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=2)
    f, y, p = data
    stats = ScoreStats()
    if rank == 1:
        keep = y < 2
        stats.update(f[keep] - 5.0, y[keep], p[keep])
    else:
        keep = np.flatnonzero(y >= 2)
        for i in range(0, keep.size, 17):
            rows = keep[i:i + 17]
            stats.update(f[rows], y[rows], p[rows])
    np.save(out / f"{rank}.npy", np.array(list(stats.all_reduce().compute().values())))
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available()
                    or "fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs torch.distributed and fork")
def test_all_reduce_two_gloo_ranks(tmp_path):
    f, y = clustered(*CASES["tall_unbalanced"])
    p = softmax_probs(f, 4)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(r, tmp_path / "store", (f, y, p), tmp_path))
             for r in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    f2 = np.where((y < 2)[:, None], f - 5.0, f)
    want = ref_all(f2, y, p)
    for r in (0, 1):
        assert_scores(dict(zip(want, np.load(tmp_path / f"{r}.npy").tolist())), want)


# ------------------------------------------------------------------ bad input

F, Y = clustered(*CASES["tall_unbalanced"])


@pytest.mark.parametrize("call, match", [
    (lambda: hscore(F[:, 0], Y), r"shape \(240,\): expected 2-D"),
    (lambda: hscore(F[None], Y), r"shape \(1, 240, 12\)"),
    (lambda: hscore(F[:, :0], Y), r"shape \(240, 0\)"),
    (lambda: hscore(np.where(np.arange(240)[:, None] == 7, np.nan, F), Y), "non-finite.*row 7"),
    (lambda: logme(np.full((3, 2), np.inf), [0, 1, 0]), "non-finite"),
    (lambda: transrate(F, Y.astype(float)), "must be integer class indices, got torch.float64"),
    (lambda: regularized_hscore(F, Y[:-1]), r"shape \(239,\): expected \(240,\)"),
    (lambda: hscore(F, np.where(Y == 1, -3, Y)), "value -3 is outside"),
    (lambda: logme(F, np.where(Y == 1, 10**9, Y)), "value 1000000000 is outside.*100000"),
    (lambda: hscore(F[:1], Y[:1]), "at least 2 samples, got 1"),
    (lambda: logme(F[:1], Y[:1].astype(float), regression=True), "at least 2 samples, got 1"),
    (lambda: logme(F, Y[:, None].repeat(2, 1)[:5].astype(float), regression=True),
     r"shape \(5, 2\)"),
    (lambda: logme(np.zeros((4, 3)), [0, 1, 0, 1]), "all zero"),
    (lambda: transrate(F, Y, eps=0), "eps=0"),
    (lambda: nce([0, 1, 2], [0, 1]), r"shape \(2,\): expected \(3,\)"),
    (lambda: nce([0, 200_000], [0, 1]), "source_labels: value 200000"),
    (lambda: leep(np.full((4, 3), 1.0), [0, 1, 0, 1]), "row 0 sums to 3.*not logits"),
    (lambda: leep(np.full((4, 2), 0.5), [0, 1, 0]), r"source_probs of shape \(4, 2\)"),
    (lambda: leep(np.array([[1.5, -0.5], [0.5, 0.5]]), [0, 1]), "negative value -0.5"),
    (lambda: ScoreStats(num_classes=0), "num_classes=0"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(TransferFastError, match=match):
        call()


def test_streaming_refusals_leave_statistics_unchanged():
    probs = softmax_probs(F, 3)
    stats = ScoreStats(num_classes=5)
    stats.update(F[:100], Y[:100], probs[:100])
    before = stats.compute()
    for bad, match in [
        ((F[:5, :4], Y[:5], probs[:5]), r"shape \(5, 4\): expected \(B, 12\)"),
        ((F[:5], Y[:5] + 5, probs[:5]), r"value \d+ is outside \[0, num_classes=5\)"),
        ((F[:5], Y[:5]), "every batch or for none"),
        ((F[:5], Y[:5], probs[:5, :2] / probs[:5, :2].sum(1, keepdims=True)),
         r"shape \(5, 2\): expected \(5, 3\)"),
        ((np.where(np.arange(5)[:, None] == 2, np.inf, F[:5]), Y[:5], probs[:5]), "row 2"),
    ]:
        with pytest.raises(TransferFastError, match=match):
            stats.update(*bad)
    assert_scores(stats.compute(), before, 0)
    with pytest.raises(TransferFastError, match="at least 2 samples, got 1"):
        stream(F[:1], Y[:1]).compute()


def test_memory_bound_refused_before_allocation():
    stats = ScoreStats()
    with pytest.raises(TransferFastError, match=r"1000 classes x 1000 features.*per_class_gram"):
        stats.update(np.zeros((2, 1000)), [0, 999])
    assert stats.count == 0 and stats.num_features is None
    stats = ScoreStats(per_class_gram=False)
    stats.update(np.zeros((2, 1000)), [0, 999])  # 8 MB without class Grams
    assert stats.count == 2


def test_streaming_on_device_matches_references(device):
    f, y = clustered(*CASES["tall_unbalanced"])
    probs = softmax_probs(f, 5)
    stats = stream(torch.from_numpy(f).to(device), torch.from_numpy(y).to(device),
                   torch.from_numpy(probs).to(device))
    assert stats._s["gram"].device.type == device
    assert_scores(stats.compute(), ref_all(f, y, probs))
    moved = ScoreStats(device="cpu").merge(stats)  # merge copies onto self's device
    assert_scores(moved.compute(), ref_all(f, y, probs))


def test_merge_refusals():
    a = stream(F, Y)
    with pytest.raises(TransferFastError, match="without class Grams"):
        a.merge(stream(F, Y, per_class_gram=False))
    with pytest.raises(TransferFastError, match="without source probabilities"):
        stream(F, Y, softmax_probs(F, 3)).merge(
            stream(F, Y, softmax_probs(F, 3), keep_source_probs=False))
    with pytest.raises(TransferFastError, match="num_classes=3"):
        ScoreStats(num_classes=3).merge(a)
    with pytest.raises(TransferFastError, match="cannot merge statistics of 5 features"):
        a.merge(stream(F[:, :5], Y))
    with pytest.raises(TransferFastError, match="source classes"):
        a.merge(stream(F, Y, softmax_probs(F, 3)))
