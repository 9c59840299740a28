"""Every compiled op on its one set of samples (`transfer_fast.testing.sample_inputs`):
equal to float64 math written here, and sound under `torch.library.opcheck`, on each
device."""

import pytest
import torch
from conftest import DEVICES

from transfer_fast.ops import _library
from transfer_fast.testing import KERNEL_CHUNK, sample_inputs

OPS = ["multi_tensor_distance", "packed_distance", "packed_chunks", "channel_stats"]
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5}


def require(op: str, device: str) -> None:
    if op == "packed_chunks" and device != "cpu":
        pytest.skip("packed_chunks runs on the CPU (the layout is planned there)")
    if not _library.has_kernel({"cpu": "CPU", "cuda": "CUDA"}[device], op):
        pytest.skip(f"{op} is not built for {device}")


def pair_sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.detach().double().cpu().flatten(), b.detach().double().cpu().flatten()
    d = a - b
    return torch.stack([d.abs().sum(), (d * d).sum(), (a * b).sum(), (a * a).sum(),
                        (b * b).sum()])


def expected_distance(anchors: list[list[torch.Tensor]], targets: list[list[torch.Tensor]]):
    return torch.stack([torch.stack([torch.stack([pair_sums(a, b) for a, b in zip(aset, bset)])
                                     for bset in targets]) for aset in anchors])


def expected_rows(offsets: torch.Tensor, numels: torch.Tensor) -> list[list[int]]:
    rows = []
    for t, (off, n) in enumerate(zip(offsets.tolist(), numels.tolist())):
        rows += [[t, off + s, off + min(n, s + KERNEL_CHUNK)] for s in range(0, n, KERNEL_CHUNK)]
    return rows


def expected_channel_stats(x, shift, labels, num_classes, channels_last):
    x = x.double().cpu()
    x = x if channels_last else x.transpose(1, 2)  # (N, S, C)
    y = labels.cpu() if labels is not None else torch.zeros(x.shape[0], dtype=torch.long)
    count = torch.zeros(num_classes, dtype=torch.float64)
    mean = torch.zeros(num_classes, x.shape[2], dtype=torch.float64)
    m2 = torch.zeros_like(mean)
    for k in range(num_classes):
        rows = x[y == k].reshape(-1, x.shape[2])
        count[k] = rows.shape[0]
        if rows.shape[0]:
            mean[k] = rows.mean(0)
            m2[k] = ((rows - mean[k]) ** 2).sum(0)
    return count, mean, m2


def split_sets(flat: list[torch.Tensor], num_tensors: int) -> list[list[torch.Tensor]]:
    return [flat[i:i + num_tensors] for i in range(0, len(flat), num_tensors)]


def unpack(buffer: torch.Tensor, rows: list[list[int]], num_tensors: int):
    """Each row of `buffer` cut into the tensors the chunk rows describe."""
    spans = {}
    for t, begin, end in rows:
        first, _ = spans.get(t, (begin, end))
        spans[t] = (first, end)
    return [[row[spans[t][0]:spans[t][1]] if t in spans else row[:0]
             for t in range(num_tensors)] for row in buffer]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_samples_match_float64(op, device):
    require(op, device)
    run = getattr(torch.ops.transfer_fast, op)
    for args in sample_inputs(op, device):
        got = run(*args)
        if op == "multi_tensor_distance":
            flat_a, flat_b, t = args
            want = expected_distance(split_sets(flat_a, t), split_sets(flat_b, t))
            rtol = RTOL[flat_a[0].dtype]
        elif op == "packed_distance":
            anchors, targets, chunks, t = args
            rows = chunks.tolist()
            want = expected_distance(unpack(anchors, rows, t), unpack(targets, rows, t))
            rtol = RTOL[anchors.dtype]
        elif op == "packed_chunks":
            assert got.tolist() == expected_rows(*args)
            continue
        else:
            want, rtol = expected_channel_stats(*args), 1e-9
        for g, w in zip(got if isinstance(got, tuple) else (got,),
                        want if isinstance(want, tuple) else (want,)):
            assert g.dtype == torch.float64 and g.device.type == device
            torch.testing.assert_close(g.cpu(), w, rtol=rtol, atol=1e-9 * (1 + w.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_opcheck_on_every_sample(op, device):
    require(op, device)
    for args in sample_inputs(op, device):
        torch.library.opcheck(getattr(torch.ops.transfer_fast, op).default, args)
