"""The packed reduction of a scan: plan once per architecture, then one kernel call per batch.

Per architecture (the names, shapes and dtypes of a fine-tuned checkpoint) an `Arch`
holds the Plan, the names of its tensors in θr, θA and the target (prefixes lined up),
and the parts of a flat `PackedLayout` of the plan's tensors with θr and θA read
into a (2, L) anchor buffer once. A batch of K targets is read straight from the
files into a reused (K, L) buffer (pinned when the device is a GPU, then one
non_blocking copy), by reader threads that fill the next buffer while the kernel
reduces this one, and reduced by one `packed_distance` call per part: O(1) host work
per call whatever the number of tensors.

A part is the whole model unless the memory budget says otherwise; a tensor larger
than `segment` elements is read in pieces of that size. Neither K nor the parts
change a number: each tensor's sums depend on its own elements only (fixed kernel
chunks from the tensor's start), pieces are added in order in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .. import ops
from ..errors import TransferFastError
from ..io.names import align_prefixes, strip_prefix
from ..measure.plan import Plan, make_plan
from ..ops.packed import ALIGN_ELEMS

# (name in the file, start, end, offset in the row, stored in the row's dtype)
Read = tuple[str, int, int, int, bool]


@dataclass
class Part:
    """Consecutive pieces of the plan's tensors laid out in one flat buffer."""

    layout: ops.PackedLayout
    index: torch.Tensor  # int64 (P,): the plan tensor of each piece
    reads: list[Read]  # how a target fills its row of this part
    anchors: torch.Tensor | None = None  # (2, L) θr and θA, in the kernel's dtype, on the device
    _splits: dict = field(default_factory=dict, repr=False)

    def split(self, n: int) -> list[list[Read]]:
        """`reads` cut into at most n runs of about equal elements, for n reader threads
        to fill one row together (when a batch has fewer targets than readers)."""
        if n <= 1:
            return [self.reads]
        if n not in self._splits:
            total = sum(e - s for _, s, e, _, _ in self.reads)
            runs, current, filled = [], [], 0
            for read in self.reads:
                current.append(read)
                filled += read[2] - read[1]
                if filled * n >= total * (len(runs) + 1) and len(runs) < n - 1:
                    runs.append(current)
                    current = []
            self._splits[n] = runs + ([current] if current else [])
        return self._splits[n]


@dataclass
class Arch:
    """Everything a batch of one architecture needs, made once per architecture."""

    plan: Plan
    names: list[list[str]]  # per set (θr, θA, target): each plan tensor's name in that file
    numel: torch.Tensor  # float64 (T,)
    dtype: torch.dtype  # of the targets' buffer
    parts: list[Part] = field(default_factory=list)

    def anchor_values(self, i: int, t: int) -> torch.Tensor:
        """Anchor set i's tensor t, from the packed buffers (to name a NaN)."""
        pieces = []
        for part in self.parts:
            where = (part.index == t).nonzero().flatten().tolist()
            for p in where:
                start = part.layout.offsets[p]
                pieces.append(part.anchors[i, start:start + part.layout.numels[p]])
        return torch.cat(pieces) if pieces else torch.zeros(0)


def _stored(names: Mapping, prefix: str, name: str) -> str:
    """The name in the file of the plan's `name`, that set's `prefix` removed."""
    return prefix + name if prefix and prefix + name in names else name


def _promote(dtypes) -> torch.dtype:
    out = None
    for d in dtypes:
        out = d if out is None else torch.promote_types(out, d)
    return out


def read_row(ck, reads: Sequence[Read], row: torch.Tensor) -> None:
    """Fills the flat typed `row` from checkpoint `ck`: pieces of the row's dtype are read
    straight into it (ranges close in the file by one system call), others through a
    scratch buffer and converted."""
    raw = row.view(torch.uint8)
    size = row.element_size()
    direct = []
    for name, start, end, offset, same in reads:
        if same:
            direct.append((name, start, end, raw[offset * size:(offset + end - start) * size]))
        else:
            scratch = torch.empty((end - start) * ck.meta(name).element_size(),
                                  dtype=torch.uint8)
            row[offset:offset + end - start].copy_(ck.read(name, start, end, scratch))
    ck.read_many(direct)


def make_arch(anchors: Sequence, target, labels: list[str], opts: dict, *,
              part_bytes: int, segment: int, device: torch.device,
              packed: dict | None = None) -> Arch:
    """The Arch of `target`'s architecture: names lined up, the plan, the parts, and θr/θA
    (the open checkpoints `anchors`) read into each part's anchor buffer. `packed` keeps
    those buffers for the next architectures: targets that differ only in what the plan
    leaves out (heads of other class counts) share them."""
    metas = [{n: ck.meta(n) for n in ck.shapes} for ck in (*anchors, target)]
    prefixes = align_prefixes(metas, labels)
    states = [strip_prefix(m, p) for m, p in zip(metas, prefixes)]
    plan = make_plan(states, opts["preset"], labels=labels, groups=opts.get("groups"),
                     classifier=opts.get("classifier"), strict=opts.get("strict", False))
    names = [[_stored(m, p, n) for n in plan.names] for m, p in zip(metas, prefixes)]
    dtypes = [[m[n].dtype for n in set_names] for m, set_names in zip(metas, names)]
    target_dtype = _promote(dtypes[2])
    kernel = _promote([*dtypes[0], *dtypes[1], target_dtype])
    numels = [states[2][n].numel() for n in plan.names]
    arch = Arch(plan, names, torch.tensor(numels, dtype=torch.float64), target_dtype)
    pieces = [(t, s, min(s + segment, n)) for t, n in enumerate(numels)
              for s in range(0, n, segment)]
    # Bytes per element of a target in flight: its buffer, plus a promoted copy when the
    # kernel runs in a wider dtype than the target is stored in.
    elem = target_dtype.itemsize + (kernel.itemsize if kernel != target_dtype else 0)
    cap = max(1, part_bytes // elem)
    groups, current, filled = [], [], 0
    for piece in pieces:
        length = -(-(piece[2] - piece[1]) // ALIGN_ELEMS) * ALIGN_ELEMS
        if current and filled + length > cap:
            groups.append(current)
            current, filled = [], 0
        current.append(piece)
        filled += length
    groups += [current] if current else []
    key = (tuple(names[0]), tuple(names[1]), kernel, tuple(map(tuple, groups)))
    shared = packed.get(key) if packed is not None else None
    for p, group in enumerate(groups):
        layout = ops.PackedLayout.from_shapes([(e - s,) for _, s, e in group])
        reads = [(names[2][t], s, e, off, dtypes[2][t] == target_dtype)
                 for (t, s, e), off in zip(group, layout.offsets)]
        part = Part(layout, torch.tensor([t for t, _, _ in group], dtype=torch.long), reads)
        if shared is not None:
            part.anchors = shared[p]
        else:
            buf = layout.new_buffer(2, dtype=kernel)
            for i, ck in enumerate(anchors):
                read_row(ck, [(names[i][t], s, e, off, dtypes[i][t] == kernel)
                              for (t, s, e), off in zip(group, layout.offsets)], buf[i])
            part.anchors = buf.to(device)
        arch.parts.append(part)
    for ck in anchors:
        why = ck.changed()
        if why:
            raise TransferFastError(why)
    if packed is not None and shared is None:
        packed[key] = [part.anchors for part in arch.parts]
    return arch


class Buffers:
    """Two reused host buffers (pinned for a GPU) and, for a GPU, one device buffer: the
    readers fill one host buffer while the kernel reduces the other."""

    def __init__(self, device: torch.device):
        self.device = device
        self._host: list[torch.Tensor | None] = [None, None]
        self._device: torch.Tensor | None = None

    def host(self, slot: int, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """A (K, L) view of host buffer `slot` (grown when too small; contents undefined)."""
        nbytes = math.prod(shape) * dtype.itemsize
        buf = self._host[slot]
        if buf is None or buf.numel() < nbytes:
            buf = self._host[slot] = torch.empty(
                nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        return buf[:nbytes].view(dtype).view(shape)

    def on_device(self, host: torch.Tensor) -> torch.Tensor:
        """`host` on the device: itself on the CPU, else one asynchronous copy."""
        if self.device.type == "cpu":
            return host
        nbytes = host.numel() * host.element_size()
        if self._device is None or self._device.numel() < nbytes:
            self._device = None  # the old buffer goes before the new one is made
            self._device = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        out = self._device[:nbytes].view(host.dtype).view(host.shape)
        return out.copy_(host, non_blocking=True)


def reduce_part(part: Part, targets: torch.Tensor, backend: str) -> torch.Tensor:
    """float64 (2, K, P, 5) CPU sums of one part: one packed_distance call."""
    try:
        return ops.packed_distance(part.anchors, targets, part.layout, backend=backend).cpu()
    except RuntimeError as exc:  # e.g. a backend that cannot run here: one line, exit 2
        raise TransferFastError(str(exc).splitlines()[0]) from exc
