"""frechet_distance against scipy's sqrtm formula (pytorch-fid's) and closed forms, in float64."""

import dataclasses
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from transfer_fast.errors import TransferFastError
from transfer_fast.measure.frechet import FrechetResult, frechet_distance


def sample_gaussian(d: int, n: int, seed: int, shift: float = 0.1):
    """Mean and covariance of n correlated samples in d dimensions (numpy float64)."""
    rng = np.random.default_rng(seed)
    mix = np.eye(d) + 0.4 * rng.standard_normal((d, d)) / np.sqrt(d)
    x = rng.standard_normal((n, d)) @ mix + shift * rng.standard_normal(d)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def scipy_terms(mu_a, s_a, mu_b, s_b):
    """(mean term, trace term) the pytorch-fid way: sqrtm of the product, real part."""
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    return ((mu_a - mu_b) ** 2).sum(), np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean)


def no_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("d", [64, 256])
def test_matches_scipy_sqrtm(d, device):
    a, b = sample_gaussian(d, 8 * d, seed=d), sample_gaussian(d, 8 * d, seed=d + 1)
    mean_term, trace_term = scipy_terms(*a, *b)
    as_tensors = [tuple(torch.from_numpy(t).to(device) for t in g) for g in (a, b)]
    result = no_warnings(frechet_distance, *as_tensors)
    assert result.mean_term == pytest.approx(mean_term, rel=1e-12)
    # The trace term is the hard part; it is also most of the distance here.
    assert trace_term > mean_term
    assert result.trace_term == pytest.approx(trace_term, rel=1e-8)
    assert result.distance == pytest.approx(mean_term + trace_term, rel=1e-8)
    assert (result.clamped, result.regularised_eps, result.warnings) == (0, 0.0, [])
    assert result.min_eigenvalue > 0


def test_diagonal_closed_form():
    """Commuting diagonal covariances: tr sqrt(S_a S_b) = sum sqrt(a_i b_i)."""
    rng = np.random.default_rng(0)
    va, vb = rng.uniform(0.1, 3.0, 100), rng.uniform(0.1, 3.0, 100)
    mu_a, mu_b = rng.standard_normal(100), rng.standard_normal(100)
    result = frechet_distance((mu_a, np.diag(va)), (mu_b, np.diag(vb)))
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum()
    assert float(result) == pytest.approx(expected, rel=1e-12)


def test_one_dimension():
    result = frechet_distance(([1.0], [[4.0]]), ([-2.0], [[9.0]]))
    assert result.distance == pytest.approx(9.0 + (2.0 - 3.0) ** 2, rel=1e-14)


def test_symmetric_and_zero_on_itself():
    a, b = sample_gaussian(50, 400, seed=1), sample_gaussian(50, 400, seed=2)
    assert frechet_distance(a, b).distance == pytest.approx(frechet_distance(b, a).distance,
                                                            rel=1e-10)
    same = frechet_distance(a, a)
    assert abs(same.distance) < 1e-10 * np.trace(a[1])


class Stats:
    """Duck-typed statistics object: only gaussian() is looked at."""

    def __init__(self, mean, cov):
        self.mean, self.cov = mean, cov

    def gaussian(self):
        return torch.from_numpy(self.mean), torch.from_numpy(self.cov)


def test_inputs_objects_arrays_and_float32_agree():
    a, b = sample_gaussian(32, 300, seed=3), sample_gaussian(32, 300, seed=4)
    expected = sum(scipy_terms(*a, *b))
    assert frechet_distance(Stats(*a), Stats(*b)).distance == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, Stats(*b)).distance == pytest.approx(expected, rel=1e-9)
    # float32 inputs are promoted, not computed in float32: compare with the rounded inputs.
    a32 = tuple(torch.from_numpy(t).float() for t in a)
    b32 = tuple(torch.from_numpy(t).float() for t in b)
    rounded = sum(scipy_terms(*(t.double().numpy() for t in a32 + b32)))
    assert frechet_distance(a32, b32).distance == pytest.approx(rounded, rel=1e-9)


def test_result_record():
    a, b = sample_gaussian(8, 100, seed=5), sample_gaussian(8, 100, seed=6)
    result = frechet_distance(a, b)
    assert isinstance(result, FrechetResult)
    assert float(result) == result.distance == result.mean_term + result.trace_term
    assert set(result.to_dict()) == {"distance", "mean_term", "trace_term", "clamped",
                                     "min_eigenvalue", "regularised_eps", "warnings"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.distance = 0.0


@pytest.mark.parametrize(("a", "b", "match"), [
    ((np.zeros(3), np.eye(4)), (np.zeros(3), np.eye(3)), r"\(3,\).*\(4, 4\)"),
    ((np.zeros((3, 1)), np.eye(3)), (np.zeros(3), np.eye(3)), r"\(3, 1\)"),
    ((np.zeros(3), np.eye(3)), (np.zeros(4), np.eye(4)), "dimension 3 and b 4"),
    ((np.zeros(0), np.eye(0)), (np.zeros(0), np.eye(0)), r"\(0,\)"),
    ((np.zeros(3), np.eye(3)), np.eye(3), "pair"),
])
def test_bad_shapes(a, b, match):
    with pytest.raises(TransferFastError, match=match):
        frechet_distance(a, b)


@pytest.mark.parametrize("where", ["mean", "covariance"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite(where, bad):
    mean, cov = np.zeros(3), np.eye(3)
    (mean if where == "mean" else cov)[1] = bad
    with pytest.raises(TransferFastError, match=f"b: the {where} holds NaN or Inf"):
        frechet_distance((np.zeros(3), np.eye(3)), (mean, cov))


def test_non_symmetric_covariance():
    cov = np.eye(4)
    cov[0, 1] = 1e-6
    with pytest.raises(TransferFastError, match="not symmetric"):
        frechet_distance((np.zeros(4), cov), (np.zeros(4), np.eye(4)))
    cov[0, 1] = 1e-12  # within the tolerance: symmetrised, no error
    assert frechet_distance((np.zeros(4), cov), (np.zeros(4), np.eye(4))).distance < 1e-20


@pytest.mark.parametrize("where", [(0, 299), (299, 0), (128, 127), (127, 128), (200, 250)])
def test_asymmetry_found_anywhere(where):
    """d = 300 straddles the 128-row blocks of the symmetry check."""
    cov = np.eye(300)
    cov[where] = 1e-6
    with pytest.raises(TransferFastError, match="b: covariance is not symmetric.*1e-06"):
        frechet_distance((np.zeros(300), np.eye(300)), (np.zeros(300), cov))


@pytest.mark.parametrize("eps", [-1.0, float("nan"), "1e-6"])
def test_bad_eps(eps):
    with pytest.raises(TransferFastError, match="eps"):
        frechet_distance((np.zeros(2), np.eye(2)), (np.zeros(2), np.eye(2)), eps=eps)


@pytest.mark.parametrize("side", ["a", "b"])
def test_rank_deficient_warns_and_regularises(side):
    """Fewer samples than dimensions: rank 39 of 64. Compared with scipy on the same eps*I."""
    few, many = sample_gaussian(64, 40, seed=7), sample_gaussian(64, 1000, seed=8)
    a, b = (few, many) if side == "a" else (many, few)
    with pytest.warns(UserWarning, match="ill-conditioned") as record:
        result = frechet_distance(a, b)
    assert len(record) == 1 and f"{side}'s covariance is not positive definite" in \
        str(record[0].message)
    eps = 1e-6 * (np.trace(a[1]) + np.trace(b[1])) / (2 * 64)
    assert result.regularised_eps == pytest.approx(eps, rel=1e-12)
    assert result.warnings == [str(record[0].message)]
    eye = np.eye(64)
    expected = sum(scipy_terms(a[0], a[1] + eps * eye, b[0], b[1] + eps * eye))
    assert result.distance == pytest.approx(expected, rel=1e-7)


def test_condition_number_above_limit_warns():
    """Full rank but condition 1e12: caught by the Cholesky pivots."""
    cov = np.diag(np.logspace(0, -12, 16))
    with pytest.warns(UserWarning, match="condition number at least 1.0e\\+12"):
        result = frechet_distance((np.zeros(16), cov), (np.zeros(16), np.eye(16)))
    assert result.regularised_eps > 0
    eps = result.regularised_eps
    expected = ((np.sqrt(np.diag(cov) + eps) - np.sqrt(1 + eps)) ** 2).sum()
    assert result.distance == pytest.approx(expected, rel=1e-10)


def test_explicit_eps_always_applied_and_zero_disables():
    a, b = sample_gaussian(16, 200, seed=9), sample_gaussian(16, 200, seed=10)
    result = no_warnings(frechet_distance, a, b, eps=0.5)
    eye = np.eye(16)
    expected = sum(scipy_terms(a[0], a[1] + 0.5 * eye, b[0], b[1] + 0.5 * eye))
    assert (result.regularised_eps, result.distance) == (0.5, pytest.approx(expected, rel=1e-9))
    few = sample_gaussian(16, 8, seed=11)
    with pytest.warns(UserWarning, match="ill-conditioned.*eps = 0"):
        unregularised = frechet_distance(few, b, eps=0)
    assert unregularised.regularised_eps == 0.0


@pytest.mark.parametrize("negative_side", ["a", "b"])
def test_indefinite_covariance_clamped(negative_side):
    """Shared eigenvectors: the product's eigenvalues are u_i max(w_i, 0)."""
    rng = np.random.default_rng(12)
    q, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    u = rng.uniform(0.5, 2.0, 20)
    w = np.concatenate([rng.uniform(0.5, 2.0, 17), [-1e-6, -3e-6, -2e-6]])
    s_u, s_w = (q * u) @ q.T, (q * w) @ q.T
    s_u, s_w = (s_u + s_u.T) / 2, (s_w + s_w.T) / 2
    a, b = (np.zeros(20), s_w), (np.zeros(20), s_u)
    if negative_side == "b":
        a, b = b, a
    with pytest.warns(UserWarning, match=f"{negative_side}'s covariance is not positive") as rec:
        result = frechet_distance(a, b, eps=0)
    assert f"{negative_side}'s covariance has 3 negative eigenvalues" in str(rec[0].message)
    expected = u.sum() + w.sum() - 2 * np.sqrt(u * np.clip(w, 0, None)).sum()
    # The three zero eigenvalues come out at rounding level, ~1e-16, and their square roots
    # at ~1e-8: the inherent limit of an unregularised singular product.
    assert result.distance == pytest.approx(expected, rel=1e-7)


def test_singular_unregularised_against_sample_svd():
    """eps=0 on rank-deficient sample covariances S = X^T X / (n - 1), X centred: the
    eigenvalues of S_a S_b are the squared singular values of X_a X_b^T / sqrt(...)."""
    rng = np.random.default_rng(13)
    x_a, x_b = rng.standard_normal((20, 64)), rng.standard_normal((30, 64)) + 0.1
    c_a, c_b = x_a - x_a.mean(axis=0), x_b - x_b.mean(axis=0)
    s_a, s_b = c_a.T @ c_a / 19, c_b.T @ c_b / 29
    with pytest.warns(UserWarning, match="ill-conditioned.*eps = 0"):
        result = frechet_distance((x_a.mean(axis=0), s_a), (x_b.mean(axis=0), s_b), eps=0)
    tr_sqrt = np.linalg.svd(c_a @ c_b.T, compute_uv=False).sum() / np.sqrt(19 * 29)
    expected = (((x_a.mean(axis=0) - x_b.mean(axis=0)) ** 2).sum() + np.trace(s_a)
                + np.trace(s_b) - 2 * tr_sqrt)
    scale = np.trace(s_a) + np.trace(s_b)
    assert result.distance == pytest.approx(expected, abs=1e-7 * scale)
    # 44 of the 64 eigenvalues of S_a S_b are zero: rounding puts some below zero.
    assert 1 <= result.clamped <= 44
    assert -1e-12 * scale < result.min_eigenvalue < 0
    assert any(f"{result.clamped} negative eigenvalues of S_a S_b clamped" in n
               for n in result.warnings)
