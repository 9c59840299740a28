"""fit_transferability_model against numpy: lstsq, explicit OLS and CR1 errors, n leave-one-out
refits, and cluster bootstrap intervals that cover a known model."""

import json
import math

import numpy as np
import pytest

from transfer_fast.errors import TransferFastError
from transfer_fast.measure.regression import TransferabilityModel, fit_transferability_model

# PAPER.md section 2, ResNet-50: (data set, G, D, N, T).
PAPER_RESNET50 = [
    ("CIFAR-10", 2.27, 0.665, 50000, 7.79), ("CIFAR-100", 2.39, 0.075, 50000, 5.59),
    ("Caltech-101", 0.63, 0.087, 3060, 23.92), ("CUB-200", 1.62, 0.042, 5994, 21.96),
    ("Aircraft", 2.95, 0.064, 6667, 12.45), ("Flowers", 1.64, 0.449, 1088, 106.30),
    ("Land Use", 1.89, 0.364, 1680, 39.09), ("POCUS", 13.12, 1.200, 1692, 53.58),
    ("DTD", 0.74, 0.213, 1880, 24.15),
]


def paper_rows():
    return [{"label": name, "G": g, "D": d, "N": n, "T": t} for name, g, d, n, t in PAPER_RESNET50]


def synthetic_rows(n: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    g, d = rng.uniform(0.5, 5.0, n), rng.uniform(0.05, 1.0, n)
    size = np.exp(rng.uniform(7, 11, n)).round()
    log_t = -0.2 * g + 0.8 * d - 0.5 * np.log(size) + 6 + 0.1 * rng.standard_normal(n)
    return [{"G": a, "D": b, "N": c, "T": math.exp(y), "extra": "ignored"}
            for a, b, c, y in zip(g, d, size, log_t)]


def numpy_design(rows, zscore: bool, reference=None):
    """(X with a column of ones, log T); z-scored with reference's mean and std (ddof=0)."""
    raw = np.array([[r["G"], r["D"], np.log(r["N"])] for r in rows])
    ref = raw if reference is None else reference
    if zscore:
        raw = (raw - ref.mean(axis=0)) / ref.std(axis=0)
    return np.column_stack([np.ones(len(rows)), raw]), np.log([r["T"] for r in rows])


def as_vector(model: TransferabilityModel, values: dict) -> list[float]:
    return [values["intercept"] if "intercept" in values else model.intercept,
            values["G"], values["D"], values["logN"]]


@pytest.mark.parametrize("zscore", [True, False])
def test_matches_numpy_lstsq_and_explicit_errors(zscore):
    rows = synthetic_rows()
    x, y = numpy_design(rows, zscore)
    beta = np.linalg.lstsq(x, y, rcond=None)[0]
    model = fit_transferability_model(rows, zscore=zscore)
    np.testing.assert_allclose(as_vector(model, model.coefficients), beta, rtol=1e-10, atol=1e-12)
    resid = y - x @ beta
    sigma2 = resid @ resid / (len(rows) - 4)
    stderr = np.sqrt(np.diag(sigma2 * np.linalg.inv(x.T @ x)))
    np.testing.assert_allclose(as_vector(model, model.stderr), stderr, rtol=1e-9)
    r2 = 1 - resid @ resid / ((y - y.mean()) ** 2).sum()
    assert model.r2 == pytest.approx(r2, rel=1e-12)
    np.testing.assert_allclose(model.predictions, np.exp(x @ beta), rtol=1e-12)
    np.testing.assert_allclose(model.measured, [r["T"] for r in rows], rtol=0)


def test_leave_one_out_matches_n_refits():
    """Each row predicted by a numpy fit on the other rows, z-scored on those rows only."""
    rows = synthetic_rows(n=9, seed=1)
    model = fit_transferability_model(rows)
    expected = []
    for i in range(len(rows)):
        rest = rows[:i] + rows[i + 1:]
        raw_rest = np.array([[r["G"], r["D"], np.log(r["N"])] for r in rest])
        x, y = numpy_design(rest, zscore=True)
        beta = np.linalg.lstsq(x, y, rcond=None)[0]
        xi, _ = numpy_design([rows[i]], zscore=True, reference=raw_rest)
        expected.append(float(np.exp(xi @ beta)[0]))
    np.testing.assert_allclose(model.loo_predictions, expected, rtol=1e-9)
    y = np.log([r["T"] for r in rows])
    loo_r2 = 1 - ((y - np.log(expected)) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert model.loo_r2 == pytest.approx(loo_r2, rel=1e-9)


def test_predict_new_rows():
    rows = synthetic_rows(n=10, seed=2)
    model = fit_transferability_model(rows)
    x, y = numpy_design(rows, zscore=True)
    beta = np.linalg.lstsq(x, y, rcond=None)[0]
    new = [{"G": 1.0, "D": 0.3, "N": 5000}, {"G": 4.0, "D": 0.9, "N": 200}]
    raw = np.array([[r["G"], r["D"], np.log(r["N"])] for r in rows])
    x_new, _ = numpy_design([dict(r, T=1.0) for r in new], zscore=True, reference=raw)
    np.testing.assert_allclose(model.predict(new), np.exp(x_new @ beta), rtol=1e-12)
    assert model.means["G"] == pytest.approx(raw[:, 0].mean())
    assert model.stds["logN"] == pytest.approx(raw[:, 2].std())


def test_paper_resnet50_structure():
    """Facts that hold whatever the fit; the coefficients are printed, not asserted."""
    rows = paper_rows()
    model = fit_transferability_model(rows)
    raw = fit_transferability_model(rows, zscore=False)
    log_t = np.log([r["T"] for r in rows])
    print("ResNet-50, z-scored:", model.coefficients, "intercept", model.intercept,
          "R2", model.r2, "LOO R2", model.loo_r2)
    # z-scored predictors have mean zero: the intercept is the mean of log T.
    assert model.intercept == pytest.approx(log_t.mean(), rel=1e-12)
    # OLS with an intercept: residuals sum to zero in log space.
    assert np.log(model.predictions).sum() == pytest.approx(log_t.sum(), rel=1e-12)
    assert 0 <= model.r2 <= 1 and model.loo_r2 <= model.r2
    # z-scoring is an affine change of the predictors: same predictions, scaled slopes.
    np.testing.assert_allclose(model.predictions, raw.predictions, rtol=1e-10)
    np.testing.assert_allclose(model.loo_predictions, raw.loo_predictions, rtol=1e-9)
    for key in ("G", "D", "logN"):
        assert model.coefficients[key] == pytest.approx(
            raw.coefficients[key] * model.stds[key], rel=1e-10)
        assert model.stderr[key] / abs(model.coefficients[key]) == pytest.approx(
            raw.stderr[key] / abs(raw.coefficients[key]), rel=1e-9)
    assert model.labels == [name for name, *_ in PAPER_RESNET50]
    assert (raw.means, raw.stds) == ({"G": 0.0, "D": 0.0, "logN": 0.0},
                                     {"G": 1.0, "D": 1.0, "logN": 1.0})
    assert json.loads(json.dumps(model.to_dict()))["coefficients"] == model.coefficients


def test_leverage_one_row_has_no_loo_prediction():
    """D is non-zero in row 4 only: without row 4 it is constant, so that fit is undefined."""
    rows = [dict(r, D=1.0 if i == 4 else 0.0) for i, r in enumerate(synthetic_rows(n=8))]
    with pytest.warns(UserWarning, match=r"rows \[4\] have leverage 1"):
        model = fit_transferability_model(rows)
    assert math.isnan(model.loo_predictions[4])
    assert all(math.isfinite(v) for i, v in enumerate(model.loo_predictions) if i != 4)
    assert model.predictions[4] == pytest.approx(rows[4]["T"], rel=1e-9)  # fitted exactly
    y = np.log([r["T"] for i, r in enumerate(rows) if i != 4])  # R² over the rows with one
    loo = np.log([v for i, v in enumerate(model.loo_predictions) if i != 4])
    assert model.loo_r2 == pytest.approx(1 - ((y - loo) ** 2).sum() / ((y - y.mean()) ** 2).sum())


@pytest.mark.parametrize("labelled", [True, False])
def test_plot_writes_png(tmp_path, labelled):
    rows = paper_rows() if labelled else synthetic_rows()
    path = tmp_path / "model.png"
    fit_transferability_model(rows).plot(path, title="test" if labelled else None)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def edited(index: int, **changes):
    rows = synthetic_rows(n=6)
    rows[index] = {k: v for k, v in dict(rows[index], **changes).items() if v is not None}
    return rows


@pytest.mark.parametrize(("rows", "match"), [
    (edited(2, D=None), "row 2: missing key 'D'"),
    (edited(1, T=0.0), "row 1: T = 0 must be > 0"),
    (edited(4, N=-5), "row 4: N = -5 must be > 0"),
    (edited(3, G=float("nan")), "row 3: G = nan is not finite"),
    (edited(0, T=float("inf")), "row 0: T = inf is not finite"),
    (edited(5, G="x"), "row 5: G = 'x' is not a number"),
    (synthetic_rows(n=4), "4 rows: need at least 5"),
    ([dict(r, D=0.5) for r in synthetic_rows()], "predictor D has zero variance"),
    ([dict(r, D=r["G"] * 2) for r in synthetic_rows()], "collinear"),
    (synthetic_rows()[:5] + [3.0], "row 5: expected a mapping"),
])
def test_bad_input(rows, match):
    with pytest.raises(TransferFastError, match=match):
        fit_transferability_model(rows)


# ---- clustered rows: CR1 errors, cluster bootstrap, verdicts -----------------------------

def clustered_rows(clusters: int = 8, per: int = 5, seed: int = 0, effect: float = 0.3):
    """G, D per cluster; N per row; log T with a shared error per cluster (a task effect)."""
    rng = np.random.default_rng(seed)
    rows, groups = [], []
    for c in range(clusters):
        g, d, shared = rng.uniform(0.5, 5.0), rng.uniform(0.05, 1.0), effect * rng.standard_normal()
        for _ in range(per):
            n = float(np.exp(rng.uniform(4, 8)).round())
            log_t = -0.3 * g + 0.5 * d - 0.4 * np.log(n) + 2 + shared + 0.1 * rng.standard_normal()
            rows.append({"G": g, "D": d, "N": n, "T": math.exp(log_t)})
            groups.append(f"task{c}")
    return rows, groups


def numpy_cr1(x, y, groups):
    """The CR1 sandwich written out: a loop over clusters, Stata's small-sample factor."""
    n, k = x.shape
    beta = np.linalg.lstsq(x, y, rcond=None)[0]
    e = y - x @ beta
    bread = np.linalg.inv(x.T @ x)
    meat = np.zeros((k, k))
    labels = sorted(set(groups))
    for label in labels:
        idx = [i for i, g in enumerate(groups) if g == label]
        s = x[idx].T @ e[idx]
        meat += np.outer(s, s)
    g = len(labels)
    return np.sqrt(np.diag(g / (g - 1) * (n - 1) / (n - k) * bread @ meat @ bread))


@pytest.mark.parametrize("zscore", [True, False])
def test_cluster_robust_errors_match_the_sandwich(zscore):
    rows, groups = clustered_rows()
    x, y = numpy_design(rows, zscore)
    model = fit_transferability_model(rows, zscore=zscore, groups=groups, bootstrap=0)
    np.testing.assert_allclose(as_vector(model, model.cluster_stderr), numpy_cr1(x, y, groups),
                               rtol=1e-9)
    assert (model.clusters, model.cluster_df, model.df_resid) == (8, 7, 36)
    # Without groups every row is its own cluster: HC1, with n - 4 degrees of freedom.
    plain = fit_transferability_model(rows, zscore=zscore, bootstrap=0)
    np.testing.assert_allclose(as_vector(plain, plain.cluster_stderr),
                               numpy_cr1(x, y, list(range(len(rows)))), rtol=1e-9)
    assert (plain.clusters, plain.cluster_df) == (40, 36)
    assert all(math.isnan(v) for interval in plain.ci.values() for v in interval)


def test_rows_as_objects_equal_rows_as_mappings():
    from types import SimpleNamespace

    rows, groups = clustered_rows(clusters=5, per=3)
    records = [SimpleNamespace(run=f"r{i}", **r) for i, r in enumerate(rows)]
    a = fit_transferability_model(rows, groups=groups, bootstrap=100)
    b = fit_transferability_model(records, groups=groups, bootstrap=100)
    assert a.coefficients == b.coefficients and a.ci == b.ci
    assert b.labels == [f"r{i}" for i in range(len(rows))]
    np.testing.assert_allclose(b.predict(records), a.predictions, rtol=1e-12)


def test_cluster_bootstrap_intervals_cover_the_true_coefficients():
    """Many clusters, data from a known model: the 95% intervals cover the truth in most of
    30 data sets, and their width is that of the CR1 errors (not the classical ones)."""
    covered, ratio = {"G": 0, "D": 0, "logN": 0}, []
    for seed in range(30):
        rows, groups = clustered_rows(clusters=40, per=4, seed=seed)
        model = fit_transferability_model(rows, groups=groups, bootstrap=300, seed=seed)
        assert model.bootstrap_used == 300
        truth = {"G": -0.3 * model.stds["G"], "D": 0.5 * model.stds["D"],
                 "logN": -0.4 * model.stds["logN"]}  # on the z-scored scale
        for term, value in truth.items():
            low, high = model.ci[term]
            covered[term] += low <= value <= high
        low, high = model.ci["G"]
        ratio.append((high - low) / (2 * 1.96 * model.cluster_stderr["G"]))
        assert model.cluster_stderr["G"] > model.stderr["G"]  # the shared task error
    assert all(count >= 23 for count in covered.values()), covered  # ~95% expected
    assert 0.8 < float(np.median(ratio)) < 1.2


def test_degenerate_resamples_are_skipped_and_counted():
    """Three tasks: a resample with fewer than three distinct tasks cannot separate G, D
    and the intercept; those are skipped, the rest give the intervals."""
    rows, groups = clustered_rows(clusters=3, per=6, seed=3)
    model = fit_transferability_model(rows, groups=groups, bootstrap=400, seed=1)
    # P(all three tasks drawn) = 3!/3^3 = 2/9.
    assert 0.12 * 400 < model.bootstrap_used < 0.32 * 400
    assert model.draws.shape == (model.bootstrap_used, 4)
    assert model.cluster_df == 2 and not model.reliable
    few = fit_transferability_model(rows, groups=groups, bootstrap=40, seed=1)
    assert math.isnan(few.ci["G"][0]) and "bootstrap resamples could be fitted" in few.warnings[-1]
    again = fit_transferability_model(rows, groups=groups, bootstrap=400, seed=1)
    assert again.ci == model.ci  # the seed fixes the resamples


def test_verdicts_from_intervals():
    from transfer_fast.measure.regression import interval_verdict

    assert interval_verdict((-0.5, -0.1), -1) == "supported"
    assert interval_verdict((-0.5, 0.1), -1) == "not supported"
    assert interval_verdict((0.1, 0.5), -1) == "contradicted"
    assert interval_verdict((0.1, 0.5), +1) == "supported"
    assert interval_verdict((math.nan, math.nan), -1) == "undetermined"
    rows, groups = clustered_rows(clusters=30, per=4, effect=0.05)
    model = fit_transferability_model(rows, groups=groups, bootstrap=200)
    assert model.sign_verdict("G", -1) == "supported" and model.sign_verdict("D", -1) == \
        "contradicted"
    assert model.reliable
    low, high = model.draw_interval(lambda b: np.abs(b[:, 3]) - np.abs(b[:, 1]))
    assert low < high
    assert json.loads(json.dumps(model.to_dict()))["ci"]["G"] == list(model.ci["G"])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"groups": ["a"] * 8}, "one cluster"),
    ({"groups": ["a", "b"]}, "2 labels for 8 rows"),
    ({"bootstrap": -1}, "bootstrap=-1"),
])
def test_bad_groups(kwargs, match):
    with pytest.raises(TransferFastError, match=match):
        fit_transferability_model(synthetic_rows(n=8), **kwargs)
