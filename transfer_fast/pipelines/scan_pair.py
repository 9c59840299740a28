"""The run of one (θr, θA) pair of a scan: batches of targets read ahead and reduced packed.

Batches arrive opened (the scan's prefetch thread); each is grouped by architecture
(an `Arch` per architecture, made once: scan_packed.py) and cut into units, one per
part of a group. Reader threads fill the host buffer of the next unit (of this batch
or the next) while this unit is copied to the device and reduced by one
`packed_distance` call; a batch's records come out once its last unit is reduced.
"""

from __future__ import annotations

import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..errors import TransferFastError, first_few
from ..io.sharded import open_streamed
from ..measure.plan import Plan
from ..measure.transferability import result_from_sums
from .scan_journal import ScanRecord, ScanRow, failed_record, record_options
from .scan_packed import Arch, Buffers, make_arch, read_row, reduce_part

MAX_BATCH = 64


def batch_size(target_bytes: int, budget: int) -> int:
    """K: how many targets of `target_bytes` fit twice (two buffers) in `budget`."""
    return max(1, min(MAX_BATCH, budget // max(1, 2 * target_bytes)))


@dataclass
class _Group:
    """The members of one batch that share an architecture, and their sums so far."""

    arch: Arch
    members: list  # [(ScanRow, open checkpoint)]
    sums: torch.Tensor  # float64 (2, K, T, 5), filled part by part
    broken: dict[int, str] = field(default_factory=dict)  # member -> why its read failed


@dataclass
class _Batch:
    opened: list  # [(ScanRow, open checkpoint or None, error)]
    records: dict[str, ScanRecord]
    groups: list[_Group]
    start: float = 0.0


class PairScan:
    """All checkpoints fine-tuned from one (θr, θA) pair: the anchors kept open, an Arch per
    architecture, and the pipelined reading and reduction of the batches."""

    def __init__(self, random: str, pretrained: str, opts: dict, budget: int, segment: int):
        self.opts, self.budget, self.segment = opts, budget, segment
        self.labels = [f"random ({random})", f"pretrained ({pretrained})",
                       "the fine-tuned set"]
        self.anchors = []
        try:
            for path in (random, pretrained):
                self.anchors.append(open_streamed(path, key=opts.get("key")))
        except Exception as exc:
            self.close()
            if isinstance(exc, TransferFastError):
                raise
            raise TransferFastError(f"{path}: {type(exc).__name__}: {exc}") from exc
        self.anchor_keys = [ck.key for ck in self.anchors]
        self.archs: dict[tuple, Arch | str] = {}
        self.packed: dict[tuple, list[torch.Tensor]] = {}  # θr/θA buffers the archs share
        self.first_plan: Plan | None = None
        pretrained_ck = self.anchors[1]
        self.target_bytes = sum(math.prod(s) * pretrained_ck.meta(n).element_size()
                                for n, s in pretrained_ck.shapes.items()
                                if pretrained_ck.meta(n).is_floating_point())
        self.batch = batch_size(self.target_bytes, budget)

    def close(self) -> None:
        for ck in self.anchors:
            ck.close()

    def _arch(self, ck) -> Arch | str:
        """The Arch of this checkpoint's architecture, or why it cannot be measured."""
        key = tuple(sorted((n, s, ck.meta(n).dtype) for n, s in ck.shapes.items()))
        if key not in self.archs:
            try:
                self.archs[key] = make_arch(
                    self.anchors, ck, self.labels, self.opts,
                    part_bytes=self.budget // (2 * self.batch), segment=self.segment,
                    device=self.opts["device"], packed=self.packed)
            except TransferFastError as exc:  # cached as text: no traceback holds buffers
                self.archs[key] = str(exc)
        return self.archs[key]

    def _prepare(self, opened: list) -> _Batch:
        """Groups a batch by architecture; checkpoints that cannot be measured fail here."""
        batch = _Batch(opened, {}, [])
        by_arch: dict[int, _Group] = {}
        for row, ck, error in opened:
            arch = self._arch(ck) if ck is not None else error
            if isinstance(arch, str):
                batch.records[row.resolved] = self._failed(
                    row, f"{row.path}: {arch}" if ck is not None else arch)
                continue
            if id(arch) not in by_arch:
                by_arch[id(arch)] = _Group(arch, [], None)
                batch.groups.append(by_arch[id(arch)])
            by_arch[id(arch)].members.append((row, ck))
        for group in batch.groups:
            group.sums = torch.zeros(2, len(group.members), len(group.arch.plan.names), 5,
                                     dtype=torch.float64)
        return batch

    def _units(self, batches):
        """(batch, group, part index, whether it ends the batch) in order; a batch with
        nothing to reduce is one (batch, None, -1, True)."""
        for opened in batches:
            batch = self._prepare(opened)
            units = [(g, p) for g in batch.groups for p in range(len(g.arch.parts))]
            if not units:
                yield batch, None, -1, True
            for i, (group, p) in enumerate(units):
                yield batch, group, p, i == len(units) - 1

    def run(self, batches, buffers: Buffers, readers: ThreadPoolExecutor, threads: int):
        """Records of each batch of `batches` (lists of opened rows), batch by batch. The
        `threads` readers fill the next part's buffer (of this batch or the next) while
        this one is reduced; when a batch has fewer targets than readers, several share
        a target."""
        self.threads = threads
        units = self._units(batches)
        current, slot = next(units, None), 0
        pending = self._submit(current, slot, buffers, readers)
        while current is not None:
            batch, group, p, last = current
            following = next(units, None)  # opens and plans the next batch meanwhile
            if group is not None:
                batch.start = batch.start or time.perf_counter()
                host, futures = pending
                for k, future in futures:
                    why = future.result()
                    if why:
                        group.broken.setdefault(k, why)
                slot = 1 - slot  # the other buffer: its last reduction is done
            pending = self._submit(following, slot, buffers, readers)
            if group is not None:
                part = group.arch.parts[p]
                sums = reduce_part(part, buffers.on_device(host), self.opts["backend"])
                group.sums.index_add_(2, part.index, sums)
            if last:
                yield self._finish(batch)
            current = following

    def _submit(self, unit, slot: int, buffers: Buffers, readers: ThreadPoolExecutor):
        """Starts reading `unit`'s part of every member into host buffer `slot`."""
        if unit is None or unit[1] is None:
            return None
        _, group, p, _ = unit
        part = group.arch.parts[p]
        host = buffers.host(slot, (len(group.members), part.layout.length), group.arch.dtype)
        runs = part.split(-(-self.threads // len(group.members)))
        futures = [(k, readers.submit(_fill, ck, reads, host[k], k in group.broken))
                   for k, (_, ck) in enumerate(group.members) for reads in runs]
        return host, futures

    def _finish(self, batch: _Batch) -> list[ScanRecord]:
        """The records of a reduced batch, in its order; closes its checkpoints."""
        for group in batch.groups:
            arch, sums = group.arch, group.sums
            self.first_plan = self.first_plan or arch.plan
            # A NaN/Inf makes its set's sum of squares non-finite: only then look closer.
            bad = [f"{arch.plan.names[t]} in {self.labels[i]}" for i, t in
                   (~torch.isfinite(sums[:, 0, :, 3])).nonzero().tolist()
                   if not torch.isfinite(arch.anchor_values(i, t)).all()]
            for k, (row, ck) in enumerate(group.members):
                why = group.broken.get(k) or ck.changed() or (
                    f"NaN or Inf in {first_few(bad, 3)}" if bad else "")
                batch.records[row.resolved] = (self._failed(row, why) if why
                                               else self._record(row, ck, arch, sums[:, k]))
        seconds = (time.perf_counter() - batch.start) / max(1, len(batch.opened)) \
            if batch.start else 0.0
        out = []
        for row, ck, _ in batch.opened:
            batch.records[row.resolved].seconds = seconds  # the batch, shared evenly
            out.append(batch.records[row.resolved])
            if ck is not None:
                ck.close()
        return out

    def _record(self, row: ScanRow, ck, arch: Arch, sums: torch.Tensor) -> ScanRecord:
        plan = arch.plan
        bad = [t for t, sq in enumerate(sums[0, :, 4].tolist()) if not math.isfinite(sq)]
        try:
            bad = [plan.names[t] for t in bad
                   if not torch.isfinite(ck.load(arch.names[2][t])).all()]
        except Exception as exc:  # cut short while NaN/Inf were being named
            return self._failed(row, str(exc))
        if bad:
            return self._failed(row, f"{row.path}: NaN or Inf in {first_few(bad, 3)}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = result_from_sums(sums, plan, arch.numel, metric=self.opts["metric"])
        return ScanRecord(row.resolved, ck.key, self.anchor_keys, "ok", groups=list(res.groups),
                          d_random=list(res.d_random), d_pretrained=list(res.d_pretrained),
                          T=list(res.values), overall=res.overall,
                          options=record_options(self.opts), excluded=dict(res.excluded))

    def _failed(self, row: ScanRow, error: str) -> ScanRecord:
        return failed_record(row, error, self.opts, self.anchor_keys)


def _fill(ck, reads, row: torch.Tensor, skip: bool) -> str:
    """Reads one target's part into its row; returns why it failed ('' when it did not)."""
    if skip:  # an earlier part of this target failed: its sums are discarded anyway
        return ""
    try:
        read_row(ck, reads, row)
    except Exception as exc:  # a file cut short under the scan
        return str(exc) or type(exc).__name__
    return ""
