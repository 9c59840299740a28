"""ops/fallback.py, the pure-torch route: as accurate as the kernels against float64 math
(its error at most about twice the compiled kernel's), on any shapes, dtypes and devices."""

import pytest
import torch
from conftest import DEVICES

from transfer_fast import TransferFastError, ops
from transfer_fast.ops import SUM_NAMES, fallback, packed
from transfer_fast.ops import _library as _ext

BLOCK = fallback.BLOCK
EDGE_SIZES = [0, 1, 3, 8, 31, 1023, 1024, 1025, 3 * BLOCK + 5, 70_000, 300_007]


def make_sets(sizes, n_sets, dtype=torch.float32, device="cpu", seed=0, near=None):
    """n_sets lists of tensors; with `near`, each a small step from that set."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n_sets):
        noise = [torch.randn(n, generator=g) for n in sizes]
        base = near if near is not None else [0.1 * k + 0 * x for x in noise]
        scale = 0.01 if near is not None else 1.0
        out.append([(b.float().cpu() + scale * x).to(device, dtype) for b, x in zip(base, noise)])
    return out


def exact_sums(a_sets, b_sets, magnitude=False):
    """float64 per tensor: the oracle; magnitude=True sums |term| (the scale of a rounding
    error of a float32 sum: sum a*b can cancel to ~0, its terms do not)."""
    out = torch.empty(len(a_sets), len(b_sets), len(a_sets[0]), 5, dtype=torch.float64)
    for i, aset in enumerate(a_sets):
        for k, bset in enumerate(b_sets):
            for t, (a, b) in enumerate(zip(aset, bset)):
                a64, b64 = a.double().cpu().flatten(), b.double().cpu().flatten()
                d, dot = a64 - b64, a64 * b64
                out[i, k, t] = torch.stack([d.abs().sum(), (d * d).sum(),
                                            (dot.abs() if magnitude else dot).sum(),
                                            (a64 * a64).sum(), (b64 * b64).sum()])
    return out


def relative_error(got, a_sets, b_sets):
    """|got - exact| / magnitude of the terms, per sum."""
    exact = exact_sums(a_sets, b_sets)
    return (got.cpu() - exact).abs() / (exact_sums(a_sets, b_sets, magnitude=True) + 1e-30)


@pytest.mark.parametrize("device", DEVICES)
def test_edge_sizes_and_several_targets_match_float64(device):
    anchors = make_sets(EDGE_SIZES, 2, device=device)
    targets = make_sets(EDGE_SIZES, 3, device=device, seed=1)
    got = ops.multi_tensor_distance(anchors, targets, backend="torch")
    assert got.shape == (2, 3, len(EDGE_SIZES), 5) and got.dtype == torch.float64
    assert got.device.type == device
    assert (relative_error(got, anchors, targets) < 1e-6).all()
    assert (got[:, :, 0] == 0).all()


@pytest.mark.parametrize("sums", [None, ("abs_diff",), ("abs_diff", "sq_diff")])
def test_error_at_most_about_twice_the_kernels(sums):
    """θr, θA far apart and θB near θA, like a transferability call; summed over tensors.
    The difference sums alone take the in-place route for the large tensors."""
    if not _ext.has_kernel("CPU"):
        pytest.skip("compiled kernels not built")
    sizes = [9408, 64, 64, 36864, 147456, 16384, 2_359_296, 2048, 1000, 5000]
    r, a = make_sets(sizes, 2, seed=2)
    b = make_sets(sizes, 1, seed=3, near=a)[0]
    got = ops.multi_tensor_distance([r, a], [b], backend="torch", sums=sums)
    ours = relative_error(got, [r, a], [b])
    kernel = relative_error(ops.multi_tensor_distance([r, a], [b], backend="cpu"), [r, a], [b])
    for column in columns(sums):
        o, k = ours[..., column].mean(), kernel[..., column].mean()
        assert o <= 2 * k + 1e-9, (column, float(o), float(k))


def columns(sums):
    return [SUM_NAMES.index(name) for name in sums] if sums else list(range(5))


# In-place route: at the threshold, over several slices with a partial last block,
# next to small (staged) tensors.
IN_PLACE_SIZES = [fallback.IN_PLACE_NUMEL, fallback.SLICE + 7, 300_007, 5, 1025, 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sums", [("abs_diff",), ("sq_diff",), ("sq_diff", "abs_diff")])
def test_difference_sums_alone_match_float64_and_leave_the_rest_nan(device, sums):
    anchors = make_sets(IN_PLACE_SIZES, 2, device=device)
    targets = make_sets(IN_PLACE_SIZES, 2, device=device, seed=1)
    anchors[1][0] = anchors[1][0].reshape(256, -1).t()  # a view: read through a copy
    targets[1][2] = targets[1][2].half()  # another dtype: staged (widened exactly)
    got = ops.multi_tensor_distance(anchors, targets, backend="torch", sums=sums)
    assert got.shape == (2, 2, len(IN_PLACE_SIZES), 5) and got.device.type == device
    asked, others = columns(sums), [c for c in range(5) if c not in columns(sums)]
    assert (relative_error(got, anchors, targets)[..., asked] < 1e-6).all()
    assert got[..., others].isnan().all()
    assert (got[:, :, -1, asked] == 0).all()  # the empty tensor


def test_difference_sums_refuse_unequal_sizes_naming_the_tensor():
    anchors = make_sets([fallback.IN_PLACE_NUMEL, 7], 1)
    with pytest.raises(TransferFastError, match="tensor 0: .* target set 0 has"):
        ops.multi_tensor_distance(anchors, [[torch.zeros(5), torch.zeros(7)]],
                                  backend="torch", sums=("abs_diff",))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_sums_not_asked_for_are_nan_on_every_backend(backend):
    if backend == "cpu" and not _ext.has_kernel("CPU"):
        pytest.skip("compiled kernels not built")
    anchors, targets = make_sets([100, 3], 1), make_sets([100, 3], 1, seed=4)
    got = ops.multi_tensor_distance(anchors, targets, backend=backend, sums=["dot", "target_sq"])
    exact = exact_sums(anchors, targets)
    torch.testing.assert_close(got[..., [2, 4]], exact[..., [2, 4]], rtol=1e-6, atol=1e-6)
    assert got[..., [0, 1, 3]].isnan().all()
    for bad in (["l1"], [], 3, [["dot"]], ["dot", 1]):
        with pytest.raises(TransferFastError, match="sums must name some of"):
            ops.multi_tensor_distance(anchors, targets, backend=backend, sums=bad)
    assert ops.multi_tensor_distance(anchors, targets, backend=backend,
                                     sums="dot")[..., 0].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_plain_torch_error(dtype):
    sizes = [70_077, 4099, 10]
    anchors, targets = make_sets(sizes, 1, dtype), make_sets(sizes, 1, dtype, seed=5)
    got = ops.multi_tensor_distance(anchors, targets, backend="torch")
    exact = exact_sums(anchors, targets)
    for t, (a, b) in enumerate(zip(anchors[0], targets[0])):
        d = a - b
        plain = torch.stack([d.abs().sum(), (d * d).sum(), (a * b).sum(), (a * a).sum(),
                             (b * b).sum()]).double()
        err_plain, err_ours = (plain - exact[0, 0, t]).abs(), (got[0, 0, t] - exact[0, 0, t]).abs()
        assert (err_ours <= 2 * err_plain + 1e-6 * exact[0, 0, t].abs()).all()


def test_float64_inputs_are_reduced_in_float64():
    anchors, targets = make_sets([70_003, 17], 1, torch.float64), make_sets([70_003, 17], 1,
                                                                              torch.float64, seed=2)
    got = ops.multi_tensor_distance(anchors, targets, backend="torch")
    torch.testing.assert_close(got, exact_sums(anchors, targets), rtol=1e-12, atol=1e-12)


def test_views_shapes_and_mixed_dtypes():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(64, 48, generator=g)
    anchors = [[base.t(), torch.randn(100, generator=g), torch.randn(3, 4, generator=g)]]
    targets = [[torch.randn(48, 64, generator=g), torch.randn(100, generator=g).half(),
                torch.randn(12, generator=g)]]  # same numel, another shape
    got = ops.multi_tensor_distance(anchors, targets, backend="torch")
    assert (relative_error(got, anchors, targets) < 1e-6).all()
    with pytest.raises(TransferFastError, match="tensor 1"):
        ops.multi_tensor_distance(anchors, [[targets[0][0], torch.randn(99), targets[0][2]]],
                                  backend="torch")


def test_repeatable_bit_for_bit_and_plans_reused():
    anchors, targets = make_sets([300_007, 999, 5000], 2), make_sets([300_007, 999, 5000], 2,
                                                                      seed=1)
    one = ops.multi_tensor_distance(anchors, targets, backend="torch")
    hits = fallback._staging.cache_info().hits
    two = ops.multi_tensor_distance(anchors, targets, backend="torch")
    assert torch.equal(one, two) and fallback._staging.cache_info().hits == hits + 1


@pytest.mark.parametrize("sums", [None, ("abs_diff", "sq_diff")])
def test_packed_equals_the_list_version(sums):
    shapes = [(5,), (70_000,), (0,), (1025,), (4, 4)]
    a_sets, b_sets = make_sets([5, 70_000, 0, 1025, 16], 2), make_sets([5, 70_000, 0, 1025, 16],
                                                                      1, seed=9)
    a_sets = [[t.reshape(s) for t, s in zip(row, shapes)] for row in a_sets]
    b_sets = [[t.reshape(s) for t, s in zip(row, shapes)] for row in b_sets]
    layout = packed.PackedLayout.from_tensors(a_sets[0])
    anchors, targets = layout.new_buffer(2), layout.new_buffer(1)
    for row, tensors in zip([*anchors, *targets], [*a_sets, *b_sets]):
        layout.pack(tensors, out=row)
    got = packed.packed_distance(anchors, targets, layout, backend="torch", sums=sums)
    want = ops.multi_tensor_distance(a_sets, b_sets, backend="torch", sums=sums)
    asked = columns(sums)
    assert torch.equal(got[..., asked], want[..., asked])
    assert (relative_error(got, a_sets, b_sets)[..., asked] < 1e-6).all()
    assert got[..., [c for c in range(5) if c not in asked]].isnan().all()


def test_integer_tensors_go_to_the_float64_reference():
    a, b = torch.arange(10), torch.arange(10).flip(0)
    got = ops.multi_tensor_distance([[a]], [[b]], backend="torch")[0, 0, 0]
    d = (a - b).double()
    assert got.tolist() == [d.abs().sum().item(), (d * d).sum().item(), float((a * b).sum()),
                            float((a * a).sum()), float((b * b).sum())]
