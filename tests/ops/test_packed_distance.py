"""packed_distance and packed_chunks against float64 math, on every kernel dtype and device."""

import subprocess
import sys

import pytest
import torch
from conftest import backend_of

from transfer_fast import TransferFastError
from transfer_fast.ops import _library as _ext
from transfer_fast.ops import packed
from transfer_fast.testing import KERNEL_CHUNK

CHUNK = KERNEL_CHUNK  # kChunkElems in csrc/common/distance_sums.h
# Around vector widths, the CPU block (1024), the chunk edge; empty, scalar, odd shapes.
EDGE_SHAPES = [(0,), (), (1,), (3,), (7,), (3, 5, 1), (1023,), (1025,), (CHUNK - 1,), (CHUNK,),
               (CHUNK + 1,), (2 * CHUNK + 5,), (0, 4), (9, 11, 3)]
LOW_PRECISION = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float64, *LOW_PRECISION)

pytestmark = pytest.mark.skipif(not _ext.loaded, reason=f"compiled library: {_ext.reason}")


PackedLayout, packed_distance = packed.PackedLayout, packed.packed_distance


def make_sets(shapes, n_sets, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(s, generator=g) + 0.1 * k).to(device, dtype) for s in shapes]
            for k in range(n_sets)]


def packed_pair(a_sets, b_sets):
    layout = PackedLayout.from_tensors(a_sets[0])
    buffers = []
    for sets in (a_sets, b_sets):
        ref = sets[0][0]
        buf = layout.new_buffer(len(sets), dtype=ref.dtype, device=ref.device)
        for row, tensors in zip(buf, sets):
            layout.pack(tensors, out=row)
        buffers.append(buf)
    return layout, *buffers


def exact_sums(a_sets, b_sets, magnitude=False):
    """Per tensor, plain torch in float64: the oracle. magnitude=True sums |term| instead,
    the scale a rounding error of the sum is proportional to."""
    out = torch.empty(len(a_sets), len(b_sets), len(a_sets[0]), 5, dtype=torch.float64)
    for i, aset in enumerate(a_sets):
        for k, bset in enumerate(b_sets):
            for t, (a, b) in enumerate(zip(aset, bset)):
                a64, b64 = a.double().cpu().flatten(), b.double().cpu().flatten()
                d = a64 - b64
                dot = a64 * b64
                out[i, k, t] = torch.stack([d.abs().sum(), (d * d).sum(),
                                            (dot.abs() if magnitude else dot).sum(),
                                            (a64 * a64).sum(), (b64 * b64).sum()])
    return out


def plain_torch_sums(a_sets, b_sets):
    """The same sums with every step in the inputs' dtype, as plain torch code would."""
    out = torch.empty(len(a_sets), len(b_sets), len(a_sets[0]), 5, dtype=torch.float64)
    for i, aset in enumerate(a_sets):
        for k, bset in enumerate(b_sets):
            for t, (a, b) in enumerate(zip(aset, bset)):
                d = a - b
                out[i, k, t] = torch.stack([d.abs().sum(), (d * d).sum(), (a * b).sum(),
                                            (a * a).sum(), (b * b).sum()]).double().cpu()
    return out


def assert_accurate(got, a_sets, b_sets):
    """float32/float64: within 1e-5 / 1e-12 of each sum's magnitude; float16/bfloat16:
    error vs float64 at most twice plain torch's in that dtype (flash-attention's rule)."""
    exact = exact_sums(a_sets, b_sets)
    err = (got.cpu() - exact).abs()
    dtype = a_sets[0][0].dtype
    if dtype in LOW_PRECISION:
        bound = 2 * (plain_torch_sums(a_sets, b_sets) - exact).abs() + 1e-6 * exact.abs()
    else:
        rel = 1e-12 if dtype == torch.float64 else 1e-5
        bound = rel * exact_sums(a_sets, b_sets, magnitude=True) + 1e-9
    assert (err <= bound).all(), f"worst error/bound {(err / bound).max():.3g}"


def test_layout_aligns_every_tensor_and_round_trips():
    tensors = make_sets(EDGE_SHAPES, 1)[0]
    layout = PackedLayout.from_tensors(tensors)
    assert all(o % packed.ALIGN_ELEMS == 0 for o in layout.offsets)
    assert layout.length % packed.ALIGN_ELEMS == 0
    assert layout == PackedLayout.from_shapes(EDGE_SHAPES) and hash(layout) is not None
    flat = layout.pack(tensors)
    views = layout.unpack(flat)
    assert all(torch.equal(v, t) for v, t in zip(views, tensors))
    assert views[3].data_ptr() == flat.data_ptr() + 4 * layout.offsets[3]  # views, not copies
    with pytest.raises(ValueError, match=r"tensor 1 has shape \(2,\)"):
        layout.pack([tensors[0], torch.zeros(2), *tensors[2:]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_pack_copies_host_tensors_into_a_device_buffer():
    tensors = make_sets([(3, 4), (CHUNK + 1,), ()], 1, torch.float16)[0]
    layout = PackedLayout.from_tensors(tensors)
    buf = layout.new_buffer(1, dtype=torch.float32, device="cuda")
    layout.pack(tensors, out=buf[0])
    assert all(torch.equal(v.cpu(), t.float()) for v, t in zip(layout.unpack(buf[0]), tensors))
    assert layout.chunks_on("cuda").device.type == "cuda"


def test_explicit_backend_on_the_wrong_device_is_refused():
    layout = PackedLayout.from_shapes([(3,)])
    with pytest.raises(TransferFastError, match="backend 'cuda' cannot reduce buffers on cpu"):
        packed_distance(layout.new_buffer(1), layout.new_buffer(1), layout, backend="cuda")


def test_chunk_rows_cover_each_tensor_in_order():
    layout = PackedLayout.from_shapes([(5,), (0,), (2 * CHUNK + 3,), (1,)])
    rows = layout.chunks_on("cpu").tolist()
    o = layout.offsets
    assert rows == [[0, 0, 5], [2, o[2], o[2] + CHUNK], [2, o[2] + CHUNK, o[2] + 2 * CHUNK],
                    [2, o[2] + 2 * CHUNK, o[2] + 2 * CHUNK + 3], [3, o[3], o[3] + 1]]
    assert layout.chunks_on("cpu") is layout.chunks_on(torch.device("cpu"))  # built once
    with pytest.raises(RuntimeError, match="expected both >= 0"):
        torch.ops.transfer_fast.packed_chunks(torch.tensor([0]), torch.tensor([-1]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_sizes_every_dtype(device, dtype):
    a_sets = make_sets(EDGE_SHAPES, 2, dtype, device)
    b_sets = make_sets(EDGE_SHAPES, 3, dtype, device, seed=1)
    layout, anchors, targets = packed_pair(a_sets, b_sets)
    got = packed_distance(anchors, targets, layout, backend=backend_of(device))
    assert got.shape == (2, 3, len(EDGE_SHAPES), 5) and got.dtype == torch.float64
    assert got.device.type == device
    assert_accurate(got, a_sets, b_sets)
    assert (got[:, :, 0] == 0).all() and (got[:, :, 12] == 0).all()  # the empty tensors


def test_many_small_odd_tensors(device):
    g = torch.Generator().manual_seed(3)
    shapes = [(int(n),) for n in torch.randint(1, 300, (2000,), generator=g)]
    a_sets, b_sets = make_sets(shapes, 2, device=device), make_sets(shapes, 3, device=device,
                                                                    seed=4)
    layout, anchors, targets = packed_pair(a_sets, b_sets)
    assert_accurate(packed_distance(anchors, targets, layout, backend=backend_of(device)),
                    a_sets, b_sets)


@pytest.mark.parametrize("num_targets", range(1, 18))
def test_two_anchors_any_number_of_targets(device, num_targets):
    shapes = [(1,), (8,), (1027,), (CHUNK + 9,)]
    a_sets = make_sets(shapes, 2, device=device)
    b_sets = make_sets(shapes, num_targets, device=device, seed=7)
    layout, anchors, targets = packed_pair(a_sets, b_sets)
    got = packed_distance(anchors, targets, layout, backend=backend_of(device))
    assert got.shape == (2, num_targets, len(shapes), 5)
    assert_accurate(got, a_sets, b_sets)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_equal_to_the_list_op(device, dtype):
    """Same chunking and reduction order as multi_tensor_distance: identical sums."""
    a_sets = make_sets(EDGE_SHAPES, 2, dtype, device)
    b_sets = make_sets(EDGE_SHAPES, 2, dtype, device, seed=2)
    layout, anchors, targets = packed_pair(a_sets, b_sets)
    got = packed_distance(anchors, targets, layout, backend=backend_of(device))
    listed = torch.ops.transfer_fast.multi_tensor_distance(
        [t for s in a_sets for t in s], [t for s in b_sets for t in s], len(EDGE_SHAPES))
    assert torch.equal(got, listed)


def test_cpu_result_identical_for_one_and_two_threads():
    shapes = [(3 * CHUNK + 11,), (999,), (5000,), (CHUNK,)]
    layout, anchors, targets = packed_pair(make_sets(shapes, 2), make_sets(shapes, 2, seed=1))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = packed_distance(anchors, targets, layout, backend="cpu")
        torch.set_num_threads(2)
        two = packed_distance(anchors, targets, layout, backend="cpu")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_torch_backend_gives_the_same_numbers(device):
    shapes = [(5,), (70_000,), (0,), (1025,), (4, 4)]
    a_sets, b_sets = make_sets(shapes, 2, device=device), make_sets(shapes, 2, device=device,
                                                                    seed=9)
    layout, anchors, targets = packed_pair(a_sets, b_sets)
    slow = packed_distance(anchors, targets, layout, backend="torch")
    assert slow.device.type == device
    assert_accurate(slow, a_sets, b_sets)
    fast = packed_distance(anchors, targets, layout, backend=backend_of(device))
    bound = 1e-5 * exact_sums(a_sets, b_sets, magnitude=True) + 1e-9
    assert ((fast - slow).abs().cpu() <= bound).all()


def test_mixed_dtypes_and_views_are_promoted_not_refused(device):
    shapes = [(33,), (CHUNK + 2,)]
    a_sets = make_sets(shapes, 2, torch.float16, device)
    b_sets = make_sets(shapes, 1, torch.float32, device, seed=3)
    layout, anchors, targets = packed_pair(a_sets, b_sets)
    wide = torch.zeros(2, 2 * layout.length, dtype=anchors.dtype, device=device)
    wide[:, ::2] = anchors  # a strided view with the same values
    got = packed_distance(wide[:, ::2], targets, layout, backend=backend_of(device))
    assert_accurate(got, [[t.float() for t in s] for s in a_sets], b_sets)


def test_buffers_of_the_wrong_length_are_refused():
    layout = PackedLayout.from_shapes([(3,), (5,)])
    with pytest.raises(ValueError, match=rf"targets of shape \(sets >= 1, {layout.length}\)"):
        packed_distance(layout.new_buffer(1), torch.zeros(1, 7), layout)


def test_kernel_refuses_bad_arguments_with_clear_messages():
    op = torch.ops.transfer_fast.packed_distance
    layout = PackedLayout.from_shapes([(3,), (CHUNK + 1,)])
    a, b, chunks = layout.new_buffer(2), layout.new_buffer(1), layout.chunks_on("cpu")
    with pytest.raises(RuntimeError, match=r"targets of shape \(K, \d+\).*got shape \[1, 5\]"):
        op(a, torch.zeros(1, 5), chunks, 2)
    with pytest.raises(RuntimeError, match="targets of dtype Double on cpu like the anchors, "
                                           "got Float"):
        op(a.double(), b, chunks, 2)
    with pytest.raises(RuntimeError, match="expected chunks int64 \\(rows, 3\\)"):
        op(a, b, chunks.int(), 2)
    with pytest.raises(RuntimeError, match="expected float32"):
        op(a.long(), b.long(), chunks, 2)
    with pytest.raises(RuntimeError, match=r"chunks row 1 is .*tensor in \[0, num_tensors=1\)"):
        op(a, b, chunks, 1)
    bad = chunks.clone()
    bad[2, 2] = layout.length + 1
    with pytest.raises(RuntimeError, match=r"chunks row 2 is \(1, \d+, \d+\)"):
        op(a, b, bad, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_kernel_reads_rows_outside_the_buffer_as_empty():
    """It cannot raise without a synchronisation; it must never read out of bounds."""
    shapes = [(100,), (CHUNK + 1,)]
    layout, anchors, targets = packed_pair(make_sets(shapes, 2, device="cuda"),
                                           make_sets(shapes, 1, device="cuda", seed=1))
    good = packed_distance(anchors, targets, layout)
    bad = layout.chunks_on("cuda").clone()
    bad[1, 2] = 1 << 40  # far past the end
    got = torch.ops.transfer_fast.packed_distance(anchors, targets, bad, 2)
    assert torch.equal(got[:, :, 0], good[:, :, 0])
    assert torch.isfinite(got).all()




@pytest.mark.parametrize("mode,error", [(1, RuntimeError), (2, ValueError), (3, RuntimeError)])
def test_self_check_errors_reach_python(mode, error):
    assert torch.ops.transfer_fast._self_check(0).tolist() == [0]
    with pytest.raises(error, match=f"raised on request.*mode {mode}"):
        torch.ops.transfer_fast._self_check(mode)


def test_self_check_error_in_a_fresh_process_is_an_exception_not_a_crash():
    code = ("import torch, transfer_fast\n"
            "try:\n    torch.ops.transfer_fast._self_check(1)\n"
            "except RuntimeError:\n    print('caught')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "caught", done.stderr
