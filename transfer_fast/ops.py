"""One function per op; the single place that chooses between CUDA, C++ and pure torch."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence

import torch

from . import _ext, _meta, reference  # noqa: F401  (_meta registers the fake kernels)

BACKENDS = ("auto", "cuda", "cpu", "torch")
KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


def backend_status() -> dict[str, str]:
    """'available' or the reason it is not, for each backend other than auto."""
    status = {}
    for name, key in _DISPATCH_KEY.items():
        if _ext.has_kernel(key):
            status[name] = "available"
        elif not _ext.loaded:
            status[name] = f"unavailable: {_ext.reason}"
        else:
            status[name] = "unavailable: not built into the compiled library"
    status["torch"] = "available"
    return status


def _fast_route(tensors: list[torch.Tensor], device: torch.device) -> bool:
    """Whether the tensors can go to a compiled kernel as they are (one dtype, contiguous)."""
    dtype = tensors[0].dtype
    return dtype in KERNEL_DTYPES and all(
        x.dtype == dtype and x.device == device and x.is_contiguous() for x in tensors)


def multi_tensor_distance(
    anchors: Sequence[Sequence[torch.Tensor]],
    targets: Sequence[Sequence[torch.Tensor]],
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused sums for every (anchor set, target set, tensor) in one pass over the data.

    anchors: A sets of T tensors (e.g. [θr, θA]); targets: K sets of the same T shapes.
    Returns float64 (A, K, T, 5): sum|a-b|, sum (a-b)^2, sum a*b, sum a^2, sum b^2.
    Mixed dtypes and non-contiguous views are copied to a common dtype (exactly) and
    contiguous memory first; other dtypes (integers, float8) or tensors on several
    devices are reduced by `reference.py`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    num_tensors = len(anchors[0]) if anchors else 0
    for role, sets in (("anchor", anchors), ("target", targets)):
        for s in sets:
            if len(s) != num_tensors:
                raise ValueError(
                    f"every set needs {num_tensors} tensors, a {role} set has {len(s)}")
    if backend == "torch" or num_tensors == 0 or not targets:
        return reference.multi_tensor_distance(anchors, targets)

    device = anchors[0][0].device
    key = _DISPATCH_KEY.get(device.type)
    compiled = key is not None and _ext.has_kernel(key)
    if backend != "auto" and (backend != device.type or not compiled):
        raise RuntimeError(f"backend {backend!r} cannot reduce tensors on {device}: "
                           f"{backend_status().get(backend, 'unknown backend')}")
    if not compiled:
        return reference.multi_tensor_distance(anchors, targets)
    flat_a = [t for s in anchors for t in s]
    flat_b = [t for s in targets for t in s]
    if _fast_route(flat_a + flat_b, device):  # the common case: one call, no regrouping
        return torch.ops.transfer_fast.multi_tensor_distance(flat_a, flat_b, num_tensors)

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
