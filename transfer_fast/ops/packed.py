"""Distances between sets packed into flat buffers: plan the layout once, run many times.

A `PackedLayout` maps T tensor shapes onto one flat 1-D buffer: the tensors are
concatenated in order, each starting at a multiple of `ALIGN_ELEMS` (16) elements.
That keeps every tensor 16-byte aligned for every kernel dtype (64 bytes, a cache
line, for float32), so the CUDA kernel's vector loads stay aligned, and makes one
layout and one chunk map serve any dtype. Padding elements are never read by the
ops. A anchor sets are then one (A, L) tensor, and
`torch.ops.transfer_fast.packed_distance` costs O(1) host work whatever T is.

    layout = PackedLayout.from_tensors(theta_r)            # once per architecture
    anchors = layout.new_buffer(2, dtype=torch.float32, device="cuda")
    targets = layout.new_buffer(1, dtype=torch.float32, device="cuda")
    for row, tensors in zip([*anchors, *targets], (theta_r, theta_a, theta_b)):
        layout.pack(tensors, out=row)                      # per checkpoint, into reused rows
    sums = packed_distance(anchors, targets, layout)       # (2, 1, T, 5)
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import TransferFastError
from . import _library, fallback, reference
from .dispatch import _DISPATCH_KEY, BACKENDS, KERNEL_DTYPES, keep_columns, sum_columns

ALIGN_ELEMS = 16

def _canonical(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass(frozen=True)
class PackedLayout:
    """Where each of T tensors lives in a flat buffer of `length` elements.

    shapes[t] occupies elements [offsets[t], offsets[t] + numels[t]); offsets are
    multiples of ALIGN_ELEMS. Build with `from_shapes` or `from_tensors`; device
    copies of the derived index tensors are made once per device and cached.
    """

    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    numels: tuple[int, ...]
    length: int
    _cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    @classmethod
    def from_shapes(cls, shapes: Sequence[Sequence[int]]) -> PackedLayout:
        sizes = tuple(torch.Size(s) for s in shapes)
        numels = tuple(s.numel() for s in sizes)
        spans = [-(-n // ALIGN_ELEMS) * ALIGN_ELEMS for n in numels]  # rounded up
        offsets = tuple(itertools.accumulate(spans, initial=0))
        return cls(sizes, offsets[:-1], numels, offsets[-1])

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor]) -> PackedLayout:
        return cls.from_shapes([t.shape for t in tensors])

    def __len__(self) -> int:
        return len(self.shapes)

    def _cached(self, name: str, device: torch.device | str,
                build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """build() (on the CPU) once, then one copy per device."""
        device = _canonical(device)
        if (name, device) not in self._cache:
            cpu = self._cache.get((name, torch.device("cpu")))
            if cpu is None:
                cpu = self._cache[name, torch.device("cpu")] = build()
            self._cache[name, device] = cpu.to(device)
        return self._cache[name, device]

    def chunks_on(self, device: torch.device | str) -> torch.Tensor:
        """int64 (rows, 3) work map of the compiled op, (tensor, begin, end) per chunk."""
        return self._cached("chunks", device, lambda: torch.ops.transfer_fast.packed_chunks(
            torch.tensor(self.offsets, dtype=torch.long),
            torch.tensor(self.numels, dtype=torch.long)))

    @functools.cached_property
    def _segments(self) -> tuple[int, ...]:
        """Each tensor's numel, then the padding after it: 2T sizes covering `length`."""
        ends = [o + n for o, n in zip(self.offsets, self.numels)]
        gaps = [nxt - end for nxt, end in zip((*self.offsets[1:], self.length), ends)]
        return tuple(x for pair in zip(self.numels, gaps) for x in pair)

    def new_buffer(self, num_sets: int, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu", pin_memory: bool = False) -> torch.Tensor:
        """Zeros (num_sets, length); pack() each set into a row of it."""
        return torch.zeros(num_sets, self.length, dtype=dtype, device=device,
                           pin_memory=pin_memory)

    def unpack(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a (length,) buffer with the layout's shapes (they share its memory)."""
        if flat.dim() != 1 or flat.shape[0] != self.length:
            raise ValueError(f"expected a flat buffer of shape ({self.length},), "
                             f"got {tuple(flat.shape)}")
        parts = flat.split(self._segments)[0::2]
        return list(map(torch.Tensor.view, parts, self.shapes))

    def pack(self, tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Copies `tensors` (the layout's shapes, in order) into `out` or a new zeroed
        (length,) buffer of their dtype and device; returns the buffer."""
        if len(tensors) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} tensors, got {len(tensors)}")
        bad = next((t for t, (x, s) in enumerate(zip(tensors, self.shapes)) if x.shape != s),
                   None)
        if bad is not None:  # copy_ would broadcast a wrong shape silently
            raise ValueError(f"tensor {bad} has shape {tuple(tensors[bad].shape)}, the layout "
                             f"has {tuple(self.shapes[bad])}")
        if out is None:
            ref = tensors[0] if tensors else torch.empty(0)
            out = torch.zeros(self.length, dtype=ref.dtype, device=ref.device)
        if tensors:
            torch._foreach_copy_(self.unpack(out), list(tensors))
        return out


def packed_distance(anchors: torch.Tensor, targets: torch.Tensor, layout: PackedLayout, *,
                    backend: str = "auto", sums: Collection[str] | None = None
                    ) -> torch.Tensor:
    """Fused sums for every (anchor set, target set, tensor) of packed buffers.

    anchors: (A, L), targets: (K, L), L = layout.length. Returns float64 (A, K, T, 5):
    sum|a-b|, sum (a-b)^2, sum a*b, sum a^2, sum b^2 per tensor of the layout.
    backend: "auto" (the compiled kernel of the buffers' device, else pure torch),
    "cpu"/"cuda" (that kernel, or an error), "torch" (pure torch: fallback.py, float32
    blocks added in float64; reference.py's float64 sums for non-floating buffers).
    Mixed dtypes are promoted (exactly) and non-contiguous buffers copied first.
    sums: the names (of SUM_NAMES) the caller needs, default all; the other columns
    are NaN (see `multi_tensor_distance`).
    """
    if backend not in BACKENDS:
        raise TransferFastError(f"backend must be one of {BACKENDS}, got {backend!r}")
    wanted = sum_columns(sums)
    return keep_columns(_packed(anchors, targets, layout, backend, wanted), wanted)


def _packed(anchors: torch.Tensor, targets: torch.Tensor, layout: PackedLayout, backend: str,
            wanted: frozenset[str]) -> torch.Tensor:
    """packed_distance's routing: the kernel, the fallback or the reference."""
    for role, x in (("anchors", anchors), ("targets", targets)):
        if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] != layout.length:
            raise TransferFastError(f"expected {role} of shape (sets >= 1, {layout.length}), "
                                    f"got {tuple(x.shape)}")
    if backend == "torch":
        return _pure_torch(anchors, targets, layout, wanted)
    device = anchors.device
    key = _DISPATCH_KEY.get(device.type)
    compiled = key is not None and _library.has_kernel(key, "packed_distance")
    if backend != "auto" and backend != device.type:
        raise TransferFastError(f"backend {backend!r} cannot reduce buffers on {device}")
    if backend != "auto" and not compiled:
        reason = _library.reason or "packed_distance is not built into the compiled library"
        raise TransferFastError(f"backend {backend!r} is unavailable: {reason}")
    dtype = torch.promote_types(anchors.dtype, targets.dtype)
    if not compiled or dtype not in KERNEL_DTYPES or targets.device != device:
        return _pure_torch(anchors, targets, layout, wanted)
    return torch.ops.transfer_fast.packed_distance(
        anchors.to(dtype).contiguous(), targets.to(dtype).contiguous(), layout.chunks_on(device),
        len(layout))


def _pure_torch(anchors: torch.Tensor, targets: torch.Tensor, layout: PackedLayout,
                wanted: frozenset[str]) -> torch.Tensor:
    if (anchors.is_floating_point() and targets.is_floating_point()
            and anchors.device == targets.device):
        return fallback.packed_distance(anchors, targets, layout, wanted)
    return reference.packed_distance(anchors, targets, layout)
