"""Fast pure-torch versions of the ops: what runs when no compiled kernel does.

`reference.py` widens every input to float64: exact, but many times slower than a
plain float32 loop. These follow the kernels' own recipe with a few large torch ops
instead, and make no float64 copy of the data:

- distances: the tensors are staged, a chunk of CHUNK_BYTES (all sets and differences
  together) at a time, into one reused buffer where each tensor starts on a block of
  BLOCK (1024) elements; the views of every chunk are planned once per list of shapes. Per
  chunk, one `bmm` gives every set's sum of squares and every (anchor, target) dot
  product per block (the blocks' Gram matrices); the differences a - b of every pair,
  written once into a reused buffer, give the sums of (a - b)^2 (a 2-norm) and, taken
  in place, |a - b| per block. Each block is reduced in the inputs' dtype (float32 for
  float32 and 16-bit inputs) by torch's own vectorised reductions, and the blocks of
  a tensor are added in float64: errors stay near one float32 rounding per block,
  like the CPU kernel's (csrc/cpu/distance_reduce.h). (`cdist` would save the
  buffer, but it adds each block's 1024 terms one after another: 5-10x the error.)
- the difference sums alone (sum |a - b|, sum (a - b)^2: the l1 and l2 metrics): the
  staging copy costs as much as the reduction, so large tensors are read where they
  lie: a - b of each pair is written SLICE elements at a time into one small buffer
  that stays in cache and reduced per block as above (the same values, bit for bit).
  All five sums need the sets side by side for the `bmm` and are staged; they cost
  about 1.4x a plain float32 loop over one sum on ResNet-50 (benchmarks/RESULTS.md).
- channel_stats: shifted sums (x - shift) in float64, a bounded chunk of samples at a
  time, in one pass, finished like the kernels (channel_stats_finish.h).

Results depend only on the shapes and on torch's own reductions: identical from run
to run for a given thread count.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import TransferFastError
from .reference import SUM_NAMES

BLOCK = 1024  # elements reduced in the inputs' dtype before float64 takes over
CHUNK_BYTES = 12 << 20  # staging and difference buffers of one chunk, all sets together
# When only sum |a - b| and sum (a - b)^2 are wanted (the l1 and l2 metrics), tensors
# of at least IN_PLACE_NUMEL elements skip the staging copy, which costs as much as
# the reduction itself: their differences are taken SLICE elements at a time.
DIFFERENCE_SUMS = frozenset({"abs_diff", "sq_diff"})
IN_PLACE_NUMEL = 1 << 16
SLICE = 1 << 18  # 1 MiB of float32 differences: stays in a core's cache


@dataclass
class _Chunk:
    """Consecutive blocks staged together, with every view its ops read and write."""

    pieces: list[tuple[int, int, int]]  # (tensor, first element, end element)
    dst: list[torch.Tensor]  # per set, per piece: where the piece goes (shaped like it)
    pads: list[torch.Tensor]  # the unused end of each tensor's last block: zeroed
    sets: torch.Tensor  # (blocks, A + K, BLOCK) view of the staged sets
    anchors: torch.Tensor  # (A, 1, blocks, BLOCK)
    targets: torch.Tensor  # (1, K, blocks, BLOCK)
    diff: torch.Tensor  # (A, K, blocks, BLOCK): anchor - target
    gram: torch.Tensor  # (blocks, A + K, A + K) slice of the plan's results
    l1: torch.Tensor  # (A, K, blocks) slices of the plan's results
    l2: torch.Tensor


@dataclass
class _Staging:
    """The staging plan of one list of shapes for A anchor and K target sets: built
    once, reused (under `lock`: its buffers are shared by the calls)."""

    numels: tuple[int, ...]
    shapes: tuple[torch.Size, ...]
    chunks: list[_Chunk]
    lengths: torch.Tensor  # int64 (T,): blocks per tensor, on the buffer's device
    gram: torch.Tensor  # (blocks, A + K, A + K) per block: every set's dot with every set
    l1: torch.Tensor  # (A, K, blocks): per block sum |a - b|
    l2: torch.Tensor  # (A, K, blocks): per block sqrt(sum (a - b)^2)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _spans(numels: Sequence[int], chunk_blocks: int) -> list[list[tuple[int, int, int, int]]]:
    """Per chunk, the pieces (tensor, begin, end, offset in the chunk) it stages: the
    tensors in order, each starting on a block, cut where a chunk is full."""
    spans: list[list[tuple[int, int, int, int]]] = [[]]
    used = 0
    for t, n in enumerate(numels):
        begin = 0
        while begin < n:
            if used == chunk_blocks:
                spans.append([])
                used = 0
            take = min(n - begin, (chunk_blocks - used) * BLOCK)
            spans[-1].append((t, begin, begin + take, used * BLOCK))
            used += -(-take // BLOCK)
            begin += take
    return [span for span in spans if span]


@functools.lru_cache(maxsize=4)
def _staging(shapes: tuple[torch.Size, ...], num_anchors: int, num_targets: int,
             dtype: torch.dtype, device: torch.device) -> _Staging:
    A, K = num_anchors, num_targets
    numels = tuple(s.numel() for s in shapes)
    rows = A + K + A * K  # staged sets and differences
    per_row = CHUNK_BYTES // (rows * torch.empty((), dtype=dtype).element_size())
    spans = _spans(numels, max(4, per_row // BLOCK))
    blocks = [-(-(span[-1][3] + span[-1][2] - span[-1][1]) // BLOCK) for span in spans]
    longest = max(blocks, default=0) * BLOCK
    buffer = torch.zeros(A + K, longest, dtype=dtype, device=device)
    diff = torch.empty(A, K, longest, dtype=dtype, device=device)
    total = sum(blocks)
    gram = torch.empty(total, A + K, A + K, dtype=dtype, device=device)
    l1 = torch.empty(A, K, total, dtype=dtype, device=device)
    l2 = torch.empty(A, K, total, dtype=dtype, device=device)
    chunks, first = [], 0
    for span, n in zip(spans, blocks):
        dst, pads = [], []
        for row in buffer:
            for t, b, e, o in span:
                whole = b == 0 and e == numels[t]
                dst.append(row[o:o + e - b].view(shapes[t]) if whole else row[o:o + e - b])
                end = o + -(-(e - b) // BLOCK) * BLOCK
                if end > o + e - b:
                    pads.append(row[o + e - b:end])
        z = buffer[:, :n * BLOCK].view(A + K, n, BLOCK)
        last = first + n
        chunks.append(_Chunk([(t, b, e) for t, b, e, _ in span], dst, pads, z.transpose(0, 1),
                             z[:A, None], z[None, A:],
                             diff[..., :n * BLOCK].view(A, K, n, BLOCK), gram[first:last],
                             l1[..., first:last], l2[..., first:last]))
        first = last
    lengths = torch.tensor([-(-n // BLOCK) for n in numels], dtype=torch.long, device=device)
    return _Staging(numels, shapes, chunks, lengths, gram, l1, l2)


def _sources(sets: Sequence[Sequence[torch.Tensor]], plan: _Staging, what: str
             ) -> list[list[torch.Tensor]]:
    """Each set's tensors in the plan's shapes (a reshaped view where only the shape
    differs), checked element counts; refused with the tensor's index otherwise."""
    _check_numels(sets, what, plan.shapes)
    return [[x if x.shape == shape else x.reshape(shape) for x, shape in zip(tensors, plan.shapes)]
            for tensors in sets]


def _check_numels(sets: Sequence[Sequence[torch.Tensor]], what: str,
                  shapes: Sequence[torch.Size]) -> None:
    """Every set's tensor t has as many elements as `shapes[t]` (anchor set 0's)."""
    for i, tensors in enumerate(sets):
        for t, (x, shape) in enumerate(zip(tensors, shapes)):
            if x.numel() != shape.numel():
                raise TransferFastError(f"tensor {t}: anchor set 0 has shape "
                                        f"{tuple(shape)}, {what} set {i} has "
                                        f"{tuple(x.shape)}")


def _staged_sums(anchors: Sequence[Sequence[torch.Tensor]],
                 targets: Sequence[Sequence[torch.Tensor]], dtype: torch.dtype,
                 gram: bool) -> torch.Tensor:
    """All five sums (A, K, T, 5) float64 through the staging buffer; without `gram`
    only the difference sums (columns 0, 1) are computed, the others are left NaN."""
    A, K, T = len(anchors), len(targets), len(anchors[0])
    device = anchors[0][0].device
    plan = _staging(tuple(x.shape for x in anchors[0]), A, K, dtype, device)
    tensors = _sources(anchors, plan, "anchor") + _sources(targets, plan, "target")
    flat: dict[tuple[int, int], torch.Tensor] = {}

    def piece(s: int, t: int, begin: int, end: int) -> torch.Tensor:
        x = tensors[s][t]
        if begin == 0 and end == plan.numels[t]:
            return x
        if (s, t) not in flat:
            flat[s, t] = x.reshape(-1)
        return flat[s, t][begin:end]

    if not plan.chunks:  # every tensor is empty
        return torch.zeros(A, K, T, 5, dtype=torch.float64, device=device)
    # Without the Gram matrices the products and squares stay NaN (not computed).
    out = torch.full((A, K, T, 5), torch.nan, dtype=torch.float64, device=device)
    with plan.lock:
        for c in plan.chunks:
            if c.pads:
                torch._foreach_zero_(c.pads)
            torch._foreach_copy_(c.dst, [piece(s, t, b, e) for s in range(A + K)
                                         for t, b, e in c.pieces])
            if gram:
                torch.bmm(c.sets, c.sets.transpose(1, 2), out=c.gram)
            torch.sub(c.anchors, c.targets, out=c.diff)
            torch.linalg.vector_norm(c.diff, dim=3, out=c.l2)
            torch.sum(c.diff.abs_(), 3, out=c.l1)
        # Per tensor, its blocks' results added in float64: (T, ...).
        l1 = torch.segment_reduce(plan.l1.permute(2, 0, 1).double(), "sum",
                                  lengths=plan.lengths)
        l2 = torch.segment_reduce(plan.l2.permute(2, 0, 1).double().square_(), "sum",
                                  lengths=plan.lengths)
        if gram:
            products = torch.segment_reduce(plan.gram.double(), "sum", lengths=plan.lengths)
    out[..., 0] = l1.permute(1, 2, 0)
    out[..., 1] = l2.permute(1, 2, 0)
    if gram:
        out[..., 2] = products[:, :A, A:].permute(1, 2, 0)
        squares = products.diagonal(dim1=1, dim2=2)  # (T, A + K)
        out[..., 3] = squares[:, :A].T.unsqueeze(1)
        out[..., 4] = squares[:, A:].T.unsqueeze(0)
    return out


def _difference_sums_in_place(anchors: Sequence[Sequence[torch.Tensor]],
                              targets: Sequence[Sequence[torch.Tensor]],
                              wanted: frozenset[str]) -> torch.Tensor:
    """sum |a - b| and sum (a - b)^2 (A, K, T, 2) float64 of large tensors of the
    compute dtype, read where they lie: a - b of each pair is written a SLICE at a
    time into one small buffer that stays in cache, and reduced per block of BLOCK
    like the staged route (float32 blocks added in float64), without staging copies."""
    A, K = len(anchors), len(targets)
    ref = anchors[0][0]
    lengths = [-(-x.numel() // BLOCK) for x in anchors[0]]
    parts = torch.zeros(2, A, K, sum(lengths), dtype=ref.dtype, device=ref.device)
    buffer = torch.empty(SLICE, dtype=ref.dtype, device=ref.device)
    first = 0
    for t, blocks_t in enumerate(lengths):
        a_flat = [s[t].reshape(-1) for s in anchors]
        b_flat = [s[t].reshape(-1) for s in targets]
        n = a_flat[0].numel()
        for start in range(0, n, SLICE):
            m = min(SLICE, n - start)
            blocks = -(-m // BLOCK)
            rows = buffer[:blocks * BLOCK].view(blocks, BLOCK)
            at = slice(first + start // BLOCK, first + start // BLOCK + blocks)
            for i, a in enumerate(a_flat):
                for k, b in enumerate(b_flat):
                    if m % BLOCK:
                        buffer[m:blocks * BLOCK].zero_()  # the last block's unused end
                    torch.sub(a[start:start + m], b[start:start + m], out=buffer[:m])
                    if "sq_diff" in wanted:
                        torch.linalg.vector_norm(rows, dim=1, out=parts[1, i, k, at])
                    if "abs_diff" in wanted:
                        torch.sum(rows.abs_(), 1, out=parts[0, i, k, at])
        first += blocks_t
    segments = torch.tensor(lengths, dtype=torch.long, device=ref.device)
    l1 = torch.segment_reduce(parts[0].permute(2, 0, 1).double(), "sum", lengths=segments)
    l2 = torch.segment_reduce(parts[1].permute(2, 0, 1).double().square_(), "sum",
                              lengths=segments)
    return torch.stack([l1, l2], dim=-1).permute(1, 2, 0, 3)


@torch.no_grad()
def multi_tensor_distance(anchors: Sequence[Sequence[torch.Tensor]],
                          targets: Sequence[Sequence[torch.Tensor]],
                          sums: Collection[str] = SUM_NAMES) -> torch.Tensor:
    """Per (anchor set, target set, tensor): sum|a-b|, sum (a-b)^2, sum a*b, sum a^2,
    sum b^2 as float64 (A, K, T, 5), like the kernels; see the module docstring.

    Every tensor must be a floating dtype on the device of anchors[0][0] (the
    dispatcher sends anything else to reference.py). float64 inputs are reduced in
    float64, the rest in float32. `sums`: the columns the caller needs; when they are
    only difference sums, the products and squares are not computed (NaN) and tensors
    of at least IN_PLACE_NUMEL elements of the compute dtype are read where they lie.
    Columns outside `sums` may hold values or NaN; the dispatcher makes them NaN.
    """
    A, K, T = len(anchors), len(targets), len(anchors[0])
    if T == 0:
        return torch.zeros(A, K, 0, 5, dtype=torch.float64)
    sets = list(anchors) + list(targets)
    wide = any(x.dtype == torch.float64 for s in sets for x in s)
    dtype = torch.float64 if wide else torch.float32
    wanted = frozenset(sums)
    if not wanted <= DIFFERENCE_SUMS:
        return _staged_sums(anchors, targets, dtype, gram=True)
    shapes = [x.shape for x in anchors[0]]
    _check_numels(anchors, "anchor", shapes)
    _check_numels(targets, "target", shapes)
    in_place = [t for t in range(T) if anchors[0][t].numel() >= IN_PLACE_NUMEL
                and all(s[t].dtype == dtype for s in sets)]
    if not in_place:
        return _staged_sums(anchors, targets, dtype, gram=False)
    pick = lambda idx: ([[s[t] for t in idx] for s in anchors],  # noqa: E731
                        [[s[t] for t in idx] for s in targets])
    out = torch.full((A, K, T, 5), torch.nan, dtype=torch.float64, device=sets[0][0].device)
    out[:, :, in_place, :2] = _difference_sums_in_place(*pick(in_place), wanted)
    chosen = set(in_place)
    staged = [t for t in range(T) if t not in chosen]
    if staged:
        out[:, :, staged] = _staged_sums(*pick(staged), dtype, gram=False)
    return out


def packed_distance(anchors: torch.Tensor, targets: torch.Tensor, layout,
                    sums: Collection[str] = SUM_NAMES) -> torch.Tensor:
    """packed_distance (anchors (A, L), targets (K, L) of a PackedLayout): the list
    version on the layout's views of each row."""
    return multi_tensor_distance([layout.unpack(row) for row in anchors],
                                 [layout.unpack(row) for row in targets], sums)


def channel_stats(x: torch.Tensor, labels: torch.Tensor | None, num_classes: int,
                  channels_last: bool, shift: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (class, channel) count, mean and centred sum of squares, like the kernels.

    x: (N, C, S), or (N, S, C) when channels_last; labels: int64 (N,) in
    [0, num_classes) or None (one class); shift: float64 (C,) (default: each channel's
    first element). Sums of x - shift and its square in float64, samples in chunks of
    about a million elements. Returns float64 (K,), (K, C), (K, C); empty classes
    get zeros.
    """
    x = x.detach()
    n, c = x.shape[0], x.shape[2] if channels_last else x.shape[1]
    inner = x.shape[1] if channels_last else x.shape[2]
    f64 = dict(dtype=torch.float64, device=x.device)
    if shift is None:
        first = x[0, 0, :] if channels_last else x[0, :, 0]
        shift = first.to(**f64) if x.numel() else torch.zeros(c, **f64)
    shift = shift.to(**f64).view((1, 1, c) if channels_last else (1, c, 1))
    y = labels if labels is not None else torch.zeros(n, dtype=torch.long, device=x.device)
    s1 = torch.zeros(num_classes, c, **f64)
    s2 = torch.zeros(num_classes, c, **f64)
    step = max(1, (1 << 20) // max(1, c * inner))
    axis = 1 if channels_last else 2
    for start in range(0, n if c * inner else 0, step):
        d = x[start:start + step].to(torch.float64) - shift
        s1.index_add_(0, y[start:start + step], d.sum(axis))
        s2.index_add_(0, y[start:start + step], d.square_().sum(axis))
    count = torch.bincount(y, minlength=num_classes).to(torch.float64) * inner
    safe = count.clamp_min(1).unsqueeze(1)
    delta = s1 / safe
    m2 = (s2 - s1 * delta).clamp_min_(0.0)
    mean = shift.reshape(1, c) + delta
    empty = (count == 0).unsqueeze(1)
    return count, mean.masked_fill_(empty, 0.0), m2.masked_fill_(empty, 0.0)

