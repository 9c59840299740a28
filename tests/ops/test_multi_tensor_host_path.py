"""multi_tensor_distance's host path: metadata staged in reused pinned memory on CUDA."""

import pytest
import torch

from transfer_fast.ops import _library as _ext

needs_cuda_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.has_kernel("CUDA")), reason="needs a GPU build")


def reference(anchors, targets):
    out = torch.empty(len(anchors), len(targets), len(anchors[0]), 5, dtype=torch.float64)
    for i, aset in enumerate(anchors):
        for k, bset in enumerate(targets):
            for t, (a, b) in enumerate(zip(aset, bset)):
                a64, b64 = a.double().cpu(), b.double().cpu()
                d = a64 - b64
                out[i, k, t] = torch.stack([d.abs().sum(), (d * d).sum(), (a64 * b64).sum(),
                                            (a64 * a64).sum(), (b64 * b64).sum()])
    return out


@needs_cuda_kernel
def test_calls_queued_behind_a_busy_gpu_keep_their_own_metadata():
    """Each call's pointer table must survive until its copy ran, though the host
    enqueues the next calls (with other tensors and sizes) long before that."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for n in range(1, 25):
        sizes = [int(s) for s in torch.randint(1, 70_000, (n,), generator=g)]
        sets = [[torch.randn(s, generator=g).cuda() for s in sizes] for _ in range(3)]
        cases.append(sets)
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # keeps the stream busy while the calls are enqueued
    results = [torch.ops.transfer_fast.multi_tensor_distance(s[0] + s[1], s[2], len(s[0]))
               for s in cases]
    for sets, got in zip(cases, results):
        exact = reference(sets[:2], sets[2:])
        torch.testing.assert_close(got.cpu(), exact, rtol=1e-5, atol=1e-3)


@needs_cuda_kernel
def test_side_stream_and_second_call_agree():
    g = torch.Generator().manual_seed(1)
    sets = [[torch.randn(s, generator=g).cuda() for s in (5, 70_000, 1)] for _ in range(3)]
    first = torch.ops.transfer_fast.multi_tensor_distance(sets[0] + sets[1], sets[2], 3)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        second = torch.ops.transfer_fast.multi_tensor_distance(sets[0] + sets[1], sets[2], 3)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(first, second)


def test_check_pass_names_the_offending_tensor():
    a, b = torch.randn(4), torch.randn(4)
    with pytest.raises(RuntimeError, match=r"targets\[1\] is not contiguous"):
        torch.ops.transfer_fast.multi_tensor_distance([a, a], [b, torch.randn(8)[::2]], 2)
    with pytest.raises(RuntimeError, match=r"anchors\[1\] has dtype Double, expected Float"):
        torch.ops.transfer_fast.multi_tensor_distance([a, a.double()], [b, b], 2)
