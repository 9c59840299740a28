"""One function per op; the single place that chooses between CUDA, C++ and pure torch.

Pure torch means `fallback.py` (fast, as accurate as the kernels) for floating inputs
on one device, and `reference.py` (float64, the tests' oracle) for anything else.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import defaultdict
from collections.abc import Collection, Sequence

import torch

from ..errors import TransferFastError
from . import _fake, _library, fallback, reference  # noqa: F401  (_fake registers the fake kernels)

BACKENDS = ("auto", "cuda", "cpu", "torch")
KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}
SUM_NAMES = reference.SUM_NAMES
ALL_SUMS = frozenset(SUM_NAMES)


def backend_status() -> dict[str, str]:
    """'available' or the reason it is not, for each backend other than auto.

    Returns:
        {"cpu": ..., "cuda": ..., "torch": "available"}: "available", or "unavailable: "
        and why (the compiled library's load error, or "not built into the compiled
        library"); "torch" (pure torch) is always available.
    """
    status = {}
    for name, key in _DISPATCH_KEY.items():
        if _library.has_kernel(key):
            status[name] = "available"
        elif not _library.loaded:
            status[name] = f"unavailable: {_library.reason}"
        else:
            status[name] = "unavailable: not built into the compiled library"
    status["torch"] = "available"
    return status


def sum_columns(sums: Collection[str] | None) -> frozenset[str]:
    """The checked set of sum names a caller asks for (None: all of SUM_NAMES)."""
    if sums is None:
        return ALL_SUMS
    try:
        wanted = frozenset([sums] if isinstance(sums, str) else sums)
    except TypeError:  # not iterable, or unhashable items
        wanted = frozenset()
    if not wanted or not wanted <= ALL_SUMS:
        raise TransferFastError(f"sums must name some of {SUM_NAMES}, got {sums!r}")
    return wanted


def keep_columns(out: torch.Tensor, wanted: frozenset[str]) -> torch.Tensor:
    """`out` (..., 5) with the columns not in `wanted` set to NaN, so a result reads the
    same whichever backend computed it (the kernels compute all five in one pass)."""
    for i, name in enumerate(SUM_NAMES):
        if name not in wanted:  # one fill per column: no index tensor, so no sync on a GPU
            out.select(-1, i).fill_(torch.nan)
    return out


def _pure_torch(anchors: Sequence[Sequence[torch.Tensor]],
                targets: Sequence[Sequence[torch.Tensor]], wanted: frozenset[str]
                ) -> torch.Tensor:
    """Distances without a kernel: fallback.py for floating tensors on one device."""
    device = anchors[0][0].device
    if all(x.is_floating_point() and x.device == device for s in (*anchors, *targets) for x in s):
        return fallback.multi_tensor_distance(anchors, targets, wanted)
    return reference.multi_tensor_distance(anchors, targets)


def multi_tensor_distance(
    anchors: Sequence[Sequence[torch.Tensor]],
    targets: Sequence[Sequence[torch.Tensor]],
    *,
    backend: str = "auto",
    sums: Collection[str] | None = None,
) -> torch.Tensor:
    """Fused sums for every (anchor set, target set, tensor) in one pass over the data.

    Args:
        anchors: A sets of T tensors (e.g. [θr, θA]).
        targets: K sets of the same T shapes (element counts).
        backend: "auto" (the compiled kernel of the tensors' device, else pure torch),
            "cpu"/"cuda" (that kernel, or an error), "torch" (pure torch).
        sums: the names (of SUM_NAMES) the caller needs, default all. The other
            columns are NaN. The kernels compute all five in one pass whatever is
            asked; the pure-torch fallback skips what is not asked for, and for the
            difference sums alone (the l1 and l2 metrics) reads large tensors in
            place, which makes it faster than a plain per-tensor loop.
    Returns:
        float64 (A, K, T, 5): sum|a-b|, sum (a-b)^2, sum a*b, sum a^2, sum b^2.
    Raises:
        TransferFastError: unequal set sizes or shapes, an unknown backend or sum name,
            or a backend that cannot reduce tensors on their device.

    Mixed dtypes and non-contiguous views are copied to a common dtype (exactly) and
    contiguous memory first; other dtypes (integers, float8) or tensors on several
    devices are reduced by `reference.py`. backend="torch", or no compiled kernel for
    the device: `fallback.py` (pure torch, float32 blocks added in float64).
    """
    if backend not in BACKENDS:
        raise TransferFastError(f"backend must be one of {BACKENDS}, got {backend!r}")
    wanted = sum_columns(sums)
    return keep_columns(_distance(anchors, targets, backend, wanted), wanted)


def _distance(anchors: Sequence[Sequence[torch.Tensor]],
              targets: Sequence[Sequence[torch.Tensor]], backend: str,
              wanted: frozenset[str]) -> torch.Tensor:
    """multi_tensor_distance's routing: a kernel, the fallback or the reference."""
    num_tensors = len(anchors[0]) if anchors else 0
    for role, sets in (("anchor", anchors), ("target", targets)):
        for s in sets:
            if len(s) != num_tensors:
                raise TransferFastError(
                    f"every set needs {num_tensors} tensors, a {role} set has {len(s)}")
    if num_tensors == 0 or not targets:
        return reference.multi_tensor_distance(anchors, targets)
    if backend == "torch":
        return _pure_torch(anchors, targets, wanted)

    device = anchors[0][0].device
    key = _DISPATCH_KEY.get(device.type)
    compiled = key is not None and _library.has_kernel(key)
    if backend != "auto" and (backend != device.type or not compiled):
        raise TransferFastError(f"backend {backend!r} cannot reduce tensors on {device}: "
                           f"{backend_status().get(backend, 'unknown backend')}")
    if not compiled:
        return _pure_torch(anchors, targets, wanted)
    flat_a = list(itertools.chain.from_iterable(anchors))
    flat_b = list(itertools.chain.from_iterable(targets))
    # The common case (one dtype and device, contiguous) in one call. The kernel checks
    # every tensor before it reads any, in C++: a refusal costs nothing and sends the
    # call to the slow path, where a real error (a shape mismatch) is raised again.
    try:
        return torch.ops.transfer_fast.multi_tensor_distance(flat_a, flat_b, num_tensors)
    except RuntimeError:
        pass

    # Slow path, per tensor index: mixed dtypes are promoted (exactly: float16 and
    # bfloat16 -> float32, float32 -> float64) and views copied contiguous, then
    # reduced by the kernel; other dtypes or devices go to the pure-torch reference.
    out = torch.zeros(len(anchors), len(targets), num_tensors, 5, dtype=torch.float64,
                      device=device)
    columns: dict[int, list[torch.Tensor]] = {}
    buckets: dict[torch.dtype, list[int]] = defaultdict(list)
    slow: list[int] = []
    for t in range(num_tensors):
        column = [s[t] for s in anchors] + [s[t] for s in targets]
        dtype = functools.reduce(torch.promote_types, (x.dtype for x in column))
        if dtype in KERNEL_DTYPES and all(x.device == device for x in column):
            columns[t] = [x.to(dtype).contiguous() for x in column]
            buckets[dtype].append(t)
        else:
            slow.append(t)
    num_anchors, num_targets = len(anchors), len(targets)
    for idx in buckets.values():
        flat_a = [columns[t][i] for i in range(num_anchors) for t in idx]
        flat_b = [columns[t][num_anchors + k] for k in range(num_targets) for t in idx]
        out[:, :, idx] = torch.ops.transfer_fast.multi_tensor_distance(flat_a, flat_b, len(idx))
    if slow:
        pick = lambda sets: [[s[t] for t in slow] for s in sets]  # noqa: E731
        out[:, :, slow] = reference.multi_tensor_distance(pick(anchors), pick(targets)).to(device)
    return out


def _stats_layout(x: torch.Tensor, channels_first: bool) -> tuple[torch.Tensor, bool]:
    """x as (N, C, S) or, channels innermost, (N, S, C), without a copy where possible.

    (N, C) features and, unless channels_first, (N, L, C) tokens -> channels last;
    (N, C, *spatial) (and (N, C, L) when channels_first) contiguous -> (N, C, S); in
    channels_last memory format -> (N, S, C) as a view.
    """
    n, c = x.shape[:2]
    if x.dim() == 2:
        return x.contiguous().unsqueeze(1), True
    if x.dim() == 3 and not channels_first:
        return x.contiguous(), True
    spatial = math.prod(x.shape[2:])  # reshape cannot infer -1 from an empty tensor
    if not x.is_contiguous():
        nhwc = x.movedim(1, -1)
        if nhwc.is_contiguous():  # channels_last(_3d): a view, no copy
            return nhwc.reshape(n, spatial, c), True
        x = x.contiguous()
    return x.reshape(n, c, spatial), False


def channel_stats(
    x: torch.Tensor,
    labels: torch.Tensor | None = None,
    num_classes: int = 1,
    *,
    shift: torch.Tensor | None = None,
    channels_first: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (class, channel) count, mean and centred sum of squares in one pass over x.

    x: (N, C), (N, L, C) or (N, C, *spatial); a 3-D x is read as (N, C, L) with
    channels_first (a BatchNorm1d input), else as (N, L, C). labels: integers (N,) in
    [0, num_classes) (checked by the caller) or None for one class. shift:
    float64 (C,) near the channel means (default: the first sample's values);
    the kernels sum x - shift, which keeps float64 exact for a large mean.
    Returns float64 count (K,), mean (K, C), m2 (K, C); empty classes are zeros.
    """
    if backend not in BACKENDS:
        raise TransferFastError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if x.dim() < 2:
        raise TransferFastError(f"channel_stats expects (N, C), (N, L, C) or (N, C, ...) "
                         f"activations, got shape {tuple(x.shape)}")
    x3, channels_last = _stats_layout(x.detach(), channels_first)
    device = x.device
    if labels is not None and (labels.dtype != torch.long or labels.device != device
                               or not labels.is_contiguous()):
        labels = labels.to(device, torch.long).contiguous()
    if shift is not None and (shift.dtype != torch.float64 or shift.device != device
                              or not shift.is_contiguous()):
        shift = shift.to(device, torch.float64).contiguous()
    key = _DISPATCH_KEY.get(device.type)
    compiled = key is not None and _library.has_kernel(key, "channel_stats")
    if backend not in ("auto", "torch") and (backend != device.type or not compiled):
        raise TransferFastError(f"backend {backend!r} cannot reduce tensors on {device}: "
                           f"{backend_status().get(backend, 'unknown backend')}")
    if backend == "torch" or not compiled or x3.dtype not in KERNEL_DTYPES:
        return fallback.channel_stats(x3, labels, num_classes, channels_last, shift)
    # No shift: the kernel takes each channel's first element, on the device, with no
    # extra launch (any value of the channel keeps d = x - shift near its spread).
    return torch.ops.transfer_fast.channel_stats(x3, shift, labels, num_classes, channels_last)
