"""The fused distance op against float64 math and the pure-torch reference."""

import pytest
import torch
from conftest import backend_of

from transfer_fast import ops
from transfer_fast.ops import reference
from transfer_fast.testing import KERNEL_CHUNK

CHUNK = KERNEL_CHUNK  # kChunkElems in csrc/common/distance_sums.h
# Sizes around vector widths, the CPU block (1024) and the chunk edge, and empty.
EDGE_SIZES = [0, 1, 3, 7, 8, 9, 31, 33, 1023, 1024, 1025, CHUNK - 1, CHUNK, CHUNK + 1,
              2 * CHUNK + 5, 300_007]


def exact_sums(a_sets, b_sets, magnitude=False):
    """float64 math written out independently of reference.py, as the oracle.

    With magnitude=True, the sums of |term| instead: the scale a rounding error of
    a float32 sum is proportional to (sum a*b can cancel to ~0, its terms do not).
    """
    out = torch.empty(len(a_sets), len(b_sets), len(a_sets[0]), 5, dtype=torch.float64)
    for i, aset in enumerate(a_sets):
        for k, bset in enumerate(b_sets):
            for t, (a, b) in enumerate(zip(aset, bset)):
                a64, b64 = a.double().cpu().flatten(), b.double().cpu().flatten()
                out[i, k, t, 0] = (a64 - b64).abs().sum()
                out[i, k, t, 1] = ((a64 - b64) ** 2).sum()
                out[i, k, t, 2] = (a64 * b64).abs().sum() if magnitude else (a64 * b64).sum()
                out[i, k, t, 3] = (a64 ** 2).sum()
                out[i, k, t, 4] = (b64 ** 2).sum()
    return out


def assert_sums_close(got, a_sets, b_sets, rel=1e-5):
    """Each sum within `rel` of the magnitude of its terms (float32 accumulation)."""
    exact = exact_sums(a_sets, b_sets)
    bound = rel * exact_sums(a_sets, b_sets, magnitude=True) + 1e-9
    err = (got.cpu() - exact).abs()
    assert (err <= bound).all(), f"worst error/bound {(err / bound).max():.3g}"


def make_sets(sizes, n_sets, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(n, generator=g) + 0.1 * s).to(device, dtype) for n in sizes]
            for s in range(n_sets)]


def test_edge_sizes_match_float64(device):
    anchors, targets = make_sets(EDGE_SIZES, 2, device=device), make_sets(EDGE_SIZES, 1,
                                                                           device=device, seed=1)
    got = ops.multi_tensor_distance(anchors, targets, backend=backend_of(device))
    assert got.shape == (2, 1, len(EDGE_SIZES), 5) and got.dtype == torch.float64
    assert_sums_close(got, anchors, targets)
    assert (got[:, :, 0] == 0).all()  # the empty tensor


def test_many_small_tensors_and_several_targets(device):
    sizes = [int(s) for s in torch.randint(1, 300, (2000,), generator=torch.Generator()
                                           .manual_seed(3))]
    anchors, targets = make_sets(sizes, 2, device=device), make_sets(sizes, 3, device=device,
                                                                     seed=4)
    got = ops.multi_tensor_distance(anchors, targets, backend=backend_of(device))
    assert_sums_close(got, anchors, targets)


@pytest.mark.parametrize("num_anchors,num_targets", [(1, 1), (3, 2), (5, 10)])
def test_any_number_of_anchor_and_target_sets(device, num_anchors, num_targets):
    sizes = [1, 8, 1025, CHUNK + 9]
    anchors = make_sets(sizes, num_anchors, device=device)
    targets = make_sets(sizes, num_targets, device=device, seed=7)
    got = ops.multi_tensor_distance(anchors, targets, backend=backend_of(device))
    assert got.shape == (num_anchors, num_targets, len(sizes), 5)
    assert_sums_close(got, anchors, targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_views_with_storage_offsets_stay_exact(device, dtype):
    """Contiguous slices start 1 or 4 elements into their storage: unaligned vector loads."""
    g = torch.Generator().manual_seed(11)
    base = [torch.randn(CHUNK + 40, generator=g).to(device, dtype) for _ in range(3)]
    sets = [[x[1:CHUNK + 2], x[4:1029], x[3:4]] for x in base]
    assert all(t.is_contiguous() for s in sets for t in s)
    got = ops.multi_tensor_distance(sets[:2], sets[2:], backend=backend_of(device))
    assert_sums_close(got, sets[:2], sets[2:], rel=1e-5)


def test_matches_reference_backend(device):
    anchors, targets = make_sets([5, 70_000, 1025], 2, device=device), make_sets(
        [5, 70_000, 1025], 2, device=device, seed=9)
    fast = ops.multi_tensor_distance(anchors, targets, backend=backend_of(device))
    slow = ops.multi_tensor_distance(anchors, targets, backend="torch")
    bound = 1e-5 * exact_sums(anchors, targets, magnitude=True) + 1e-9
    assert ((fast - slow).abs().cpu() <= bound).all()


def test_float64_inputs_are_exact(device):
    anchors = make_sets([CHUNK + 3, 17], 1, torch.float64, device)
    targets = make_sets([CHUNK + 3, 17], 1, torch.float64, device, seed=2)
    got = ops.multi_tensor_distance(anchors, targets, backend=backend_of(device))
    torch.testing.assert_close(got.cpu(), exact_sums(anchors, targets), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_plain_torch_error(device, dtype):
    """flash-attention's rule: error vs float64 at most twice plain torch's in that dtype."""
    sizes = [CHUNK + 77, 4099, 10]
    anchors, targets = make_sets(sizes, 1, dtype, device), make_sets(sizes, 1, dtype, device, 5)
    got = ops.multi_tensor_distance(anchors, targets, backend=backend_of(device)).cpu()
    exact = exact_sums(anchors, targets)
    for t, (a, b) in enumerate(zip(anchors[0], targets[0])):
        d = a - b  # plain torch: every step in the low dtype
        plain = torch.stack([d.abs().sum(), (d * d).sum(), (a * b).sum(), (a * a).sum(),
                             (b * b).sum()]).double().cpu()
        err_plain = (plain - exact[0, 0, t]).abs()
        err_ours = (got[0, 0, t] - exact[0, 0, t]).abs()
        assert (err_ours <= 2 * err_plain + 1e-6 * exact[0, 0, t].abs()).all(), (t, err_ours,
                                                                                 err_plain)


def test_non_contiguous_and_mixed_dtypes_take_the_slow_path(device):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=g).to(device)
    anchors = [[base.t(), torch.randn(100, generator=g).to(device)]]  # transposed view
    targets = [[torch.randn(48, 64, generator=g).to(device),
                torch.randn(100, generator=g).to(device, torch.float64)]]  # mixed dtype
    got = ops.multi_tensor_distance(anchors, targets, backend=backend_of(device))
    assert_sums_close(got, anchors, targets)


def test_cpu_result_identical_for_one_and_two_threads():
    anchors, targets = make_sets([3 * CHUNK + 11, 999, 5000], 2), make_sets(
        [3 * CHUNK + 11, 999, 5000], 2, seed=1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.multi_tensor_distance(anchors, targets, backend="cpu")
        torch.set_num_threads(2)
        two = ops.multi_tensor_distance(anchors, targets, backend="cpu")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)



def test_works_under_torch_compile():
    anchors, targets = make_sets([100, 2000], 2), make_sets([100, 2000], 1, seed=1)

    def fn(a0, a1, a2, a3, b0, b1):
        return torch.ops.transfer_fast.multi_tensor_distance([a0, a1, a2, a3], [b0, b1], 2)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got = compiled(*anchors[0], *anchors[1], *targets[0])
    assert_sums_close(got, anchors, targets)


def test_kernel_refuses_bad_arguments_with_clear_messages():
    a, b = torch.randn(4), torch.randn(5)
    with pytest.raises(RuntimeError, match=r"shape \[5\].*shape \[4\]"):
        torch.ops.transfer_fast.multi_tensor_distance([a], [b], 1)
    with pytest.raises(RuntimeError, match="multiple of num_tensors"):
        torch.ops.transfer_fast.multi_tensor_distance([a, a, a], [a, a], 2)
    with pytest.raises(RuntimeError, match="not contiguous"):
        torch.ops.transfer_fast.multi_tensor_distance([a], [torch.randn(8)[::2]], 1)
    with pytest.raises(RuntimeError, match="expected float32"):
        torch.ops.transfer_fast.multi_tensor_distance([a.long()], [a.long()], 1)


def test_reference_is_the_documented_formula():
    a, b = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.5, 1.0, 3.0])
    got = reference.multi_tensor_distance([[a]], [[b]])[0, 0, 0].tolist()
    assert got == [0.5 + 3.0, 0.25 + 9.0, 0.5 - 2.0 + 9.0, 14.0, 10.25]
