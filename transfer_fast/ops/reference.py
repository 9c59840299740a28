"""Float64 versions of every op: the tests' oracle, and the route for inputs that
neither a kernel nor fallback.py takes (integer dtypes, tensors on several devices).

Written for clarity, not speed: each sum is computed in float64 from the inputs
widened to float64, so it is as exact as the kernels can hope to be.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import TransferFastError

# Column order of the last dimension, shared with csrc/common/distance_sums.h.
SUM_NAMES = ("abs_diff", "sq_diff", "dot", "anchor_sq", "target_sq")


def multi_tensor_distance(
    anchors: Sequence[Sequence[torch.Tensor]], targets: Sequence[Sequence[torch.Tensor]]
) -> torch.Tensor:
    """Per (anchor set, target set, tensor): sum|a-b|, sum (a-b)^2, sum a*b, sum a^2, sum b^2.

    anchors: A sets of T tensors; targets: K sets of the same T shapes.
    Returns float64 (A, K, T, 5) on the device of the first tensor (CPU if none).
    """
    num_tensors = len(anchors[0]) if anchors else 0
    device = anchors[0][0].device if num_tensors else torch.device("cpu")
    out = torch.zeros(len(anchors), len(targets), num_tensors, 5, dtype=torch.float64,
                      device=device)
    for t in range(num_tensors):
        for i, anchor_set in enumerate(anchors):
            a = anchor_set[t].detach().reshape(-1).to(device, torch.float64)
            for k, target_set in enumerate(targets):
                b = target_set[t].detach().reshape(-1).to(device, torch.float64)
                if a.numel() != b.numel():
                    raise TransferFastError(f"tensor {t}: anchor set {i} has shape "
                                     f"{tuple(anchor_set[t].shape)}, target set {k} has "
                                     f"{tuple(target_set[t].shape)}")
                d = a - b
                out[i, k, t] = torch.stack([d.abs().sum(), (d * d).sum(), (a * b).sum(),
                                            (a * a).sum(), (b * b).sum()])
    return out


def channel_stats(x: torch.Tensor, labels: torch.Tensor | None, num_classes: int,
                  channels_last: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (class, channel) count, mean and centred sum of squares, like the kernels.

    x: (N, C, S), or (N, S, C) when channels_last; labels: int64 (N,) or None (one
    class). Returns float64 (K,), (K, C), (K, C); empty classes get zeros. Two passes
    in float64: the exact mean, then the squares about it.
    """
    d = x.detach().to(torch.float64)
    d = d if channels_last else d.transpose(1, 2)  # (N, S, C)
    n, s, c = d.shape
    y = torch.zeros(n, dtype=torch.long, device=x.device) if labels is None else labels
    count = torch.bincount(y, minlength=num_classes).to(torch.float64) * s
    sums = torch.zeros(num_classes, c, dtype=torch.float64, device=x.device)
    sums.index_add_(0, y, d.sum(1))
    safe = count.clamp_min(1).unsqueeze(1)
    mean = sums / safe
    centred = d - mean[y].unsqueeze(1)
    m2 = torch.zeros_like(sums).index_add_(0, y, (centred * centred).sum(1))
    return count, mean, m2


def packed_distance(anchors: torch.Tensor, targets: torch.Tensor, layout) -> torch.Tensor:
    """packed_distance in float64 (anchors (A, L), targets (K, L) of a PackedLayout):
    segment sums, one pass per (anchor, target).

    Each set is widened to float64 only while it is used, so memory stays a few
    float64 copies of one set whatever A and K are.
    """
    A, K, T = anchors.shape[0], targets.shape[0], len(layout)
    device = anchors.device
    out = torch.zeros(A, K, T, 5, dtype=torch.float64, device=device)
    if T == 0 or layout.length == 0:
        return out
    lengths = layout._cached("segments", device,
                             lambda: torch.tensor(layout._segments, dtype=torch.long))

    def sums(x: torch.Tensor) -> torch.Tensor:  # (length,) float64 -> (T,), padding dropped
        return torch.segment_reduce(x, "sum", lengths=lengths)[0::2]

    def widened(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to(device, torch.float64)

    for k in range(K):
        b = widened(targets[k])
        out[:, k, :, 4] = sums(b * b)
    for i in range(A):
        a = widened(anchors[i])
        out[i, :, :, 3] = sums(a * a)
        for k in range(K):
            b = widened(targets[k])
            d = a - b
            out[i, k, :, 0] = sums(d.abs())
            out[i, k, :, 1] = sums(d * d)
            out[i, k, :, 2] = sums(a * b)
    return out
