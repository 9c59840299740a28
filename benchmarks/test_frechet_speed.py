"""Speed of frechet_distance at d = 2048 against the two formulas in common use, same run.

  frechet_distance  ours: S_a = L L^T, S_b = R R^T, C = R^T L, eigvalsh(C^T C), with the
                    input checks; torch matmuls skipping the zero half-blocks
  scipy_sqrtm       pytorch-fid: scipy.linalg.sqrtm(S_a @ S_b), real part of its trace
  eigvals           torchmetrics' FID: torch.linalg.eigvals(S_a @ S_b), sqrt, real part
  alt_trmm          ours without checks, C and C^T C by scipy's BLAS trmm and syrk (half
                    the flops, but scipy's OpenBLAS threads compete with torch's)
  alt_svdvals       the singular values of C (no C^T C, no eigvalsh)

Every entry returns the distance; it is stored in extra_info["distance"] so the JSON shows
that all agree. The baselines take seconds to tens of seconds: pedantic, few rounds.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.linalg import blas

from transfer_fast.measure.frechet import frechet_distance

from .conftest import describe, preemption_counted

D, SAMPLES, LATENT = 2048, 4096, 256
# sqrtm takes about 20 s at d = 2048 on 2 cores, eigvals 4 s: the whole file about 2 minutes.
ROUNDS = {"frechet_distance": 5, "scipy_sqrtm": 1, "eigvals": 2, "alt_trmm": 3, "alt_svdvals": 2}


def features(seed: int, shift: float) -> torch.Tensor:
    """(SAMPLES, D) float64: LATENT correlated factors plus isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(LATENT, D, generator=g, dtype=torch.float64) / LATENT**0.5
    latent = torch.randn(SAMPLES, LATENT, generator=g, dtype=torch.float64)
    noise = torch.randn(SAMPLES, D, generator=g, dtype=torch.float64)
    return latent @ mixing + 0.5 * noise + shift


@pytest.fixture(scope="module")
def gaussians():
    """((mu_a, S_a), (mu_b, S_b)), float64 CPU tensors, covariances of 4096 samples."""
    out = []
    for seed, shift in ((0, 0.0), (1, 0.05)):
        x = features(seed, shift)
        mean = x.mean(dim=0)
        centred = x - mean
        out.append((mean, centred.T @ centred / (SAMPLES - 1)))
    return out


def from_trace_sqrt(a, b, tr_sqrt) -> float:
    (mu_a, s_a), (mu_b, s_b) = a, b
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * tr_sqrt)


def scipy_sqrtm(a, b) -> float:
    (mu_a, s_a), (mu_b, s_b) = [(m.numpy(), s.numpy()) for m, s in (a, b)]
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def eigvals(a, b) -> float:
    return from_trace_sqrt(a, b, torch.linalg.eigvals(a[1] @ b[1]).sqrt().real.sum())


def alt_trmm(a, b) -> float:
    l_a, l_b = torch.linalg.cholesky(a[1]), torch.linalg.cholesky(b[1])
    c = blas.dtrmm(1.0, l_b.numpy(), l_a.numpy(), side=0, lower=1, trans_a=1)  # R^T L
    m = torch.from_numpy(blas.dsyrk(1.0, c, trans=1, lower=1))  # lower triangle of C^T C
    return from_trace_sqrt(a, b, torch.linalg.eigvalsh(m).clamp(min=0).sqrt().sum())


def alt_svdvals(a, b) -> float:
    c = torch.linalg.cholesky(b[1]).mT @ torch.linalg.cholesky(a[1])
    return from_trace_sqrt(a, b, torch.linalg.svdvals(c).sum())


def ours(a, b) -> float:
    return frechet_distance(a, b).distance


ENTRIES = {"frechet_distance": ours, "scipy_sqrtm": scipy_sqrtm, "eigvals": eigvals,
           "alt_trmm": alt_trmm, "alt_svdvals": alt_svdvals}


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_frechet(benchmark, gaussians, entry):
    """extra_info as ratios.py expects; `bytes` is the size of the two covariances."""
    describe(benchmark, group=f"frechet-{D}", entry=entry, device="cpu", nbytes=2 * D * D * 8)
    with preemption_counted(benchmark):
        distance = benchmark.pedantic(ENTRIES[entry], args=tuple(gaussians),
                                      rounds=ROUNDS[entry], iterations=1)
    benchmark.extra_info["distance"] = distance
    assert np.isfinite(distance) and distance > 0
