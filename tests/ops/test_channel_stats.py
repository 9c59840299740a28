"""channel_stats against float64 statistics written out per class, on every layout."""

import numpy as np
import pytest
import torch
from conftest import backend_of

import transfer_fast as tf
from transfer_fast import ops


def exact(x, labels=None, num_classes=1, channel_dim=1):
    """float64 per class (count, mean, m2): a masked loop, independent of the package."""
    x64 = x.detach().double().cpu().movedim(channel_dim, -1)
    c = x64.shape[-1]
    y = torch.zeros(x.shape[0], dtype=torch.long) if labels is None else labels.cpu()
    count = torch.zeros(num_classes, dtype=torch.float64)
    mean = torch.zeros(num_classes, c, dtype=torch.float64)
    m2 = torch.zeros(num_classes, c, dtype=torch.float64)
    for k in range(num_classes):
        rows = x64[y == k].reshape(-1, c)
        if len(rows):
            count[k], mean[k] = len(rows), rows.mean(0)
            m2[k] = ((rows - rows.mean(0)) ** 2).sum(0)
    return count, mean, m2


def assert_matches(got, want, rel=1e-10):
    for name, g, w in zip(("count", "mean", "m2"), got, want):
        g = g.cpu()
        scale = w.abs().max().clamp_min(1e-300)
        assert torch.allclose(g, w, rtol=rel, atol=rel * float(scale)), \
            f"{name}: worst error {(g - w).abs().max():.3g}"


LAYOUTS = {
    "nchw": lambda g: (torch.randn(6, 5, 7, 9, generator=g), 1),
    "nchw_channels_last": lambda g: (torch.randn(6, 5, 7, 9, generator=g)
                                     .to(memory_format=torch.channels_last), 1),
    "features": lambda g: (torch.randn(40, 33, generator=g), 1),
    "tokens": lambda g: (torch.randn(6, 11, 17, generator=g), 2),
    "ncdhw": lambda g: (torch.randn(3, 4, 2, 5, 6, generator=g), 1),
    "transposed_view": lambda g: (torch.randn(5, 7, 6, 8, generator=g).transpose(2, 3), 1),
    "empty_spatial_edge": lambda g: (torch.randn(9, 3, 1, 1, generator=g), 1),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("labelled", [False, True])
def test_layouts_match_float64(layout, labelled, device):
    g = torch.Generator().manual_seed(0)
    x, cdim = LAYOUTS[layout](g)
    x = x * 3 + 2
    labels = torch.randint(0, 4, (x.shape[0],), generator=g) if labelled else None
    k = 4 if labelled else 1
    got = ops.channel_stats(x.to(device), None if labels is None else labels.to(device), k,
                            backend=backend_of(device))
    assert_matches(got, exact(x, labels, k, cdim))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_accumulate_in_float64(dtype, device):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(16, 8, 13, 13, generator=g) + 1).to(dtype)
    labels = torch.randint(0, 3, (16,), generator=g)
    got = ops.channel_stats(x.to(device), labels.to(device), 3, backend=backend_of(device))
    assert_matches(got, exact(x, labels, 3))  # exact on the rounded values: no float32 sums


def test_large_mean_small_spread_streamed(device):
    """mean 1e3, std 1: merged partial results keep the variance to 1e-6 (float64 Chan)."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(64, 16, 14, 14, generator=g, dtype=torch.float64) + 1e3).float()
    whole = x.double().numpy().transpose(1, 0, 2, 3).reshape(16, -1)
    want = whole.var(axis=1)
    parts = [tf.channel_stats(chunk.to(device), backend=backend_of(device))
             for chunk in x.split(5)]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    rel = np.abs(merged.variance().cpu().numpy() - want) / want
    assert rel.max() < 1e-6, rel.max()
    # A first value far from the mean (shift 1e3 away) must not cost accuracy either.
    y = x.clone()
    y[0, :, 0, 0] = 0.0
    got = tf.channel_stats(y.to(device), backend=backend_of(device)).variance().cpu().numpy()
    want = y.double().numpy().transpose(1, 0, 2, 3).reshape(16, -1).var(axis=1)
    assert (np.abs(got - want) / want).max() < 1e-6


def test_thousand_classes_and_empty_classes(device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 12, 4, 4, generator=g)
    labels = torch.randint(0, 1000, (300,), generator=g)
    got = ops.channel_stats(x.to(device), labels.to(device), 1000, backend=backend_of(device))
    assert_matches(got, exact(x, labels, 1000))
    empty = torch.ones(1000, dtype=torch.bool)
    empty[labels] = False
    assert (got[0].cpu()[empty] == 0).all() and (got[1].cpu()[empty] == 0).all()


def test_results_do_not_depend_on_thread_count():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(32, 257, 9, 9, generator=g)
    labels = torch.randint(0, 7, (32,), generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.channel_stats(x, labels, 7, backend="cpu")
        torch.set_num_threads(2)
        two = ops.channel_stats(x, labels, 7, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_pure_torch_backend_agrees_and_totals_merge_classes():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20, 6, 5, 5, generator=g) * 2 - 1
    labels = torch.randint(0, 3, (20,), generator=g)
    assert_matches(ops.channel_stats(x, labels, 3, backend="torch"), exact(x, labels, 3))
    stats = tf.channel_stats(x, labels)
    total = exact(x)
    assert stats.num_classes == 3 and stats.count == total[0].item()
    assert torch.allclose(stats.mean, total[1][0], rtol=1e-12, atol=1e-12)
    assert torch.allclose(stats.m2, total[2][0], rtol=1e-12)
    assert torch.allclose(stats.variance(unbiased=True),
                          x.double().transpose(0, 1).reshape(6, -1).var(1), rtol=1e-12)



@pytest.mark.parametrize("labels, match", [
    (torch.tensor([0, 1, 5]), "outside"),
    (torch.tensor([0, -1, 1]), "outside"),
    (torch.tensor([0, 1]), "shape"),
    (torch.tensor([0.0, 1.0, 1.0]), "integer class indices"),
])
def test_bad_labels_are_refused(labels, match):
    with pytest.raises(tf.TransferFastError, match=match):
        tf.channel_stats(torch.randn(3, 4), labels, num_classes=3)


def test_bad_shapes_are_refused():
    with pytest.raises(tf.TransferFastError, match=r"\(5,\)"):
        tf.channel_stats(torch.randn(5))
    with pytest.raises(tf.TransferFastError, match="needs labels"):
        tf.channel_stats(torch.randn(5, 2), num_classes=3)
    if tf.backend_status()["cpu"] == "available":  # the kernel guards its own writes too
        with pytest.raises(RuntimeError, match="outside"):
            torch.ops.transfer_fast.channel_stats(
                torch.randn(2, 1, 3), torch.zeros(3, dtype=torch.float64), torch.tensor([0, 9]),
                2, True)


def test_covariance_streamed_in_batches_matches_numpy():
    g = torch.Generator().manual_seed(6)
    mix = torch.randn(24, 24, generator=g, dtype=torch.float64)
    x = (torch.randn(500, 24, generator=g, dtype=torch.float64) @ mix + 1e3).float()
    cov = tf.CovarianceStats.empty(24)
    for part in x.split([1, 0, 99, 150, 250]):
        cov.add_batch(part)
    want = np.cov(x.double().numpy(), rowvar=False)
    assert cov.count == 500
    np.testing.assert_allclose(cov.mean.numpy(), x.double().numpy().mean(0), rtol=1e-13)
    np.testing.assert_allclose(cov.covariance().numpy(), want, rtol=1e-9, atol=1e-9)
    halves = tf.CovarianceStats.empty(24).add_batch(x[:200]).merge(
        tf.CovarianceStats.empty(24).add_batch(x[200:]))
    np.testing.assert_allclose(halves.covariance().numpy(), want, rtol=1e-9, atol=1e-9)
    with pytest.raises(tf.TransferFastError, match=r"\(N, 24\)"):
        cov.add_batch(torch.randn(3, 5))


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (3, 4, 0, 2), (0, 5), (2, 0, 3)])
def test_empty_inputs_give_zero_counts(shape, device):
    x = torch.randn(shape, device=device)
    count, mean, m2 = ops.channel_stats(x, backend=backend_of(device))
    channels = shape[2] if len(shape) == 3 else shape[1]
    assert count.tolist() == [0.0] and mean.shape == (1, channels) and not m2.any()


def test_three_dimensional_input_channels_first(device):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 6, 11, generator=g)
    got = ops.channel_stats(x.to(device), channels_first=True, backend=backend_of(device))
    assert_matches(got, exact(x, channel_dim=1))
    got = ops.channel_stats(x.to(device), backend=backend_of(device))  # (N, L, C) tokens
    assert_matches(got, exact(x, channel_dim=2))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("labelled", [False, True])
def test_long_rows_are_cut_into_pieces_and_merged_in_a_fixed_order(device, channels_last,
                                                                   labelled):
    """Few (sample, channel) rows of many positions: the CUDA kernel cuts each row into
    pieces and merges them with several threads per class; results stay exact and
    bitwise reproducible."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 3, 64, 70, generator=g) * 2 + 5
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    labels = torch.tensor([1, 0, 1, 1, 0]) if labelled else None
    k = 2 if labelled else 1
    y = None if labels is None else labels.to(device)
    got = ops.channel_stats(x.to(device), y, k, backend=backend_of(device))
    assert_matches(got, exact(x, labels, k))
    again = ops.channel_stats(x.to(device), y, k, backend=backend_of(device))
    assert all(torch.equal(a, b) for a, b in zip(got, again))


def test_more_classes_than_one_grid_dimension(device):
    """70,000 classes (past CUDA's 65,535 blocks in y), few of them present."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(40, 6, 3, 3, generator=g)
    labels = torch.randint(0, 70_000, (40,), generator=g)
    labels[:3] = torch.tensor([69_999, 65_535, 0])
    count, mean, m2 = ops.channel_stats(x.to(device), labels.to(device), 70_000,
                                        backend=backend_of(device))
    present = labels.unique()
    want = exact(x, torch.searchsorted(present, labels), len(present))
    assert_matches((count.cpu()[present], mean.cpu()[present], m2.cpu()[present]), want)
    absent = torch.ones(70_000, dtype=torch.bool)
    absent[present] = False
    assert not count.cpu()[absent].any() and not mean.cpu()[absent].any()


def test_no_shift_means_each_channels_first_element(device):
    """shift=None inside the op equals passing the first sample's values explicitly."""
    g = torch.Generator().manual_seed(10)
    x = (torch.randn(7, 4, 9, generator=g) + 1e3).to(device)
    first = x[0, :, 0].double().contiguous()
    op = torch.ops.transfer_fast.channel_stats
    if not tf.backend_status()[backend_of(device)] == "available":
        pytest.skip("compiled kernels not built")
    for cl in (False, True):
        want = op(x, first if not cl else x[0, 0, :].double().contiguous(), None, 1, cl)
        got = op(x, None, None, 1, cl)
        assert all(torch.equal(a, b) for a, b in zip(got, want))



@pytest.mark.parametrize("labelled", [False, True])
def test_pure_torch_fallback_matches_float64_on_every_layout(labelled):
    g = torch.Generator().manual_seed(11)
    for make in LAYOUTS.values():
        x, cdim = make(g)
        x = x * 3 + 1e3
        labels = torch.randint(0, 4, (x.shape[0],), generator=g) if labelled else None
        k = 4 if labelled else 1
        assert_matches(ops.channel_stats(x, labels, k, backend="torch"),
                       exact(x, labels, k, cdim))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_aligned_and_unaligned_rows_give_the_same_statistics(device, dtype):
    """Rows of whole 16-byte vectors take 16-byte loads on CUDA; the same values one
    element into their storage (unaligned) take element loads: both match float64."""
    g = torch.Generator().manual_seed(12)
    n, c, s = 9, 6, 8 * 40
    base = (torch.randn(1 + n * c * s, generator=g) * 3 + 2).to(device, dtype)
    labels = torch.randint(0, 3, (n,), generator=g)
    for x in (base[:-1].view(n, c, s), base[1:].view(n, c, s)):  # the views stay on device
        got = ops.channel_stats(x, labels.to(device), 3, channels_first=True,
                                backend=backend_of(device))
        assert_matches(got, exact(x, labels, 3))
